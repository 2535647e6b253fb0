// CUDA implementations of the ops whose schemas dsa_ops/ops.py defines. Each binding
// checks what its kernel assumes, allocates outputs and launches on the current stream.
// Built twice: by nvcc's toolchain for the CUDA dispatch key, and with the host emulation
// of the kernels for the CPU dispatch key (kernel_device.h says which).
#include <limits>
#include <utility>

#include <torch/library.h>
#include <torch/types.h>

#include "attention_kl/launch.cuh"
#include "kernel_device.h"
#include "masked_attention/launch.cuh"
#include "partition.cuh"

namespace dsa_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> partition_indices_cuda(const at::Tensor& mask) {
  TORCH_CHECK(on_kernel_device(mask), "partition_indices: mask must be ", kKernelTensors, ", got ",
              mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "partition_indices: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, "partition_indices: mask must have shape (B, L), got ", mask.sizes());
  TORCH_CHECK(mask.size(1) <= std::numeric_limits<int32_t>::max(),
              "partition_indices: L must fit in int32, got ", mask.size(1));
  const KernelDeviceGuard guard(mask.device());
  auto index = kernel_output(at::empty(mask.sizes(), mask.options().dtype(at::kInt)));
  auto count = kernel_output(at::empty({mask.size(0)}, mask.options().dtype(at::kInt)));
  check_launch(launch_partition_indices(mask.data_ptr<bool>(), mask.stride(0), mask.stride(1),
                                        index.data_ptr<int32_t>(), count.data_ptr<int32_t>(),
                                        mask.size(0), mask.size(1), kernel_stream()),
               "partition_indices");
  return {index, count};
}

// ----------------------------------------------------------------------------- attention
namespace ma = masked_attention;

ma::ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ma::ScalarKind::kFloat32;
    case at::kHalf: return ma::ScalarKind::kFloat16;
    case at::kBFloat16: return ma::ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

// The kernels need unit stride along the head dimension only; anything else is copied.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

ma::MatrixArg matrix_arg(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 3 && t.stride(2) == 1);
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

struct Partition {
  at::Tensor index, count;
  ma::RowSetArg set(bool complement) const {
    return {index.data_ptr<int32_t>(), count.data_ptr<int32_t>(), complement};
  }
};

Partition partition_of(const at::Tensor& mask) {
  auto [index, count] = partition_indices_cuda(mask);
  return {index, count};
}

// A partition handed back by the backward op: the forward's output for `mask`, checked
// against what the kernels index with it (an int32 list per sample and a count per sample).
Partition saved_partition(const char* op, const char* index_name, const at::Tensor& index,
                          const char* count_name, const at::Tensor& count, const at::Tensor& mask) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{index_name, index},
                                {count_name, count}}) {
    TORCH_CHECK(t.device() == mask.device(), op, ": ", name, " is on ", t.device(),
                " but the mask is on ", mask.device());
    TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name,
                " (the forward's partition) must be int32, got ", t.scalar_type());
  }
  TORCH_CHECK(index.sizes() == mask.sizes(), op, ": ", index_name, " must have shape (B, L) = ",
              mask.sizes(), ", got ", index.sizes());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == mask.size(0), op, ": ", count_name,
              " must have shape (B,) = (", mask.size(0), "), got ", count.sizes());
  return {index.contiguous(), count.contiguous()};
}

// Checks one attention problem's tensors: device, dtype, shapes, supported head sizes.
// `op` and the argument names make the messages point at the caller's argument.
struct AttentionShape {
  int64_t batch, length, qk_dim, v_dim;
};

AttentionShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const char* q_name = "q", const char* k_name = "k",
                         const char* v_name = "v") {
  TORCH_CHECK(on_kernel_device(q), op, ": ", q_name, " must be ", kKernelTensors, ", got ",
              q.device());
  TORCH_CHECK(q.dim() == 3, op, ": ", q_name, " must have shape (B, L, Dqk), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              op, ": ", q_name, " must be float32, float16 or bfloat16, got ", q.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{k_name, k}, {v_name, v}}) {
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but ", q_name,
                " is on ", q.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of ",
                q_name, " (", q.scalar_type(), "), got ", t.scalar_type());
  }
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": ", k_name, " must have the shape of ", q_name, " ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == q.size(0) && v.size(1) == q.size(1), op, ": ", v_name,
              " must have shape (B, L, Dv) = (", q.size(0), ", ", q.size(1), ", Dv), got ",
              v.sizes());
  const AttentionShape shape{q.size(0), q.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(shape.qk_dim >= ma::kMinQkDim && shape.qk_dim <= ma::kMaxQkDim, op,
              ": the CUDA kernels support Dqk (last dim of ", q_name, ", ", k_name, ") in ",
              ma::kMinQkDim, "..", ma::kMaxQkDim, ", got ", shape.qk_dim,
              "; use backend='reference' or 'triton' for other sizes");
  TORCH_CHECK(shape.v_dim >= ma::kMinVDim && shape.v_dim <= ma::kMaxVDim, op,
              ": the CUDA kernels support Dv (last dim of ", v_name, ") in ", ma::kMinVDim, "..",
              ma::kMaxVDim, ", got ", shape.v_dim,
              "; use backend='reference' or 'triton' for other sizes");
  TORCH_CHECK(shape.batch <= 65535, op, ": batch size must be at most 65535 (grid limit), got ",
              shape.batch);
  // Slot arithmetic (tile ends, rotated complement lists) is int32: keep L well clear of
  // its limit. 2^30 positions is far beyond any map that fits in memory.
  TORCH_CHECK(shape.length <= (int64_t{1} << 30), op, ": L must be at most 2^30, got ",
              shape.length);
  return shape;
}

void check_mask(const char* op, const char* name, const at::Tensor& mask, const at::Tensor& q) {
  TORCH_CHECK(mask.device() == q.device(), op, ": ", name, " is on ", mask.device(),
              " but q is on ", q.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": ", name, " must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == q.size(1), op, ": ",
              name, " must have shape (B, L) = (", q.size(0), ", ", q.size(1), "), got ",
              mask.sizes());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name,
              " ", like.sizes(), ", got ", t.sizes());
}

void check_lse(const char* op, const char* name, const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.device() == q.device(), op, ": ", name, " is on ", lse.device(),
              " but q is on ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": ", name,
              " (the forward's log-sum-exp) must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1), op, ": ",
              name, " must have shape (B, L) = (", q.size(0), ", ", q.size(1), "), got ",
              lse.sizes());
}

// The tensors of one forward branch after stride fixes, kept alive until the launch.
struct ForwardTensors {
  at::Tensor q, k, v, out, lse;
  ForwardTensors(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_)
      : q(with_unit_last_stride(q_)), k(with_unit_last_stride(k_)), v(with_unit_last_stride(v_)),
        out(kernel_output(
            at::empty(v_.sizes(), v_.options().memory_format(at::MemoryFormat::Contiguous)))),
        lse(kernel_output(at::empty({q_.size(0), q_.size(1)}, q_.options().dtype(at::kFloat)))) {}

  ma::ForwardBranch branch(ma::RowSetArg queries, ma::RowSetArg keys) {
    ma::ForwardBranch b;
    b.q = matrix_arg(q);
    b.k = matrix_arg(k);
    b.v = matrix_arg(v);
    b.out = matrix_arg(out);
    b.lse = lse.data_ptr<float>();
    b.queries = queries;
    b.keys = keys;
    return b;
  }
};

struct BackwardTensors {
  at::Tensor grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, workspace;
  BackwardTensors(const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_,
                  const at::Tensor& v_, const at::Tensor& out_, const at::Tensor& lse_)
      : grad_out(with_unit_last_stride(grad_out_)), q(with_unit_last_stride(q_)),
        k(with_unit_last_stride(k_)), v(with_unit_last_stride(v_)),
        out(with_unit_last_stride(out_)), lse(lse_.contiguous()),
        grad_q(kernel_output(
            at::empty(q_.sizes(), q_.options().memory_format(at::MemoryFormat::Contiguous)))),
        grad_k(kernel_output(
            at::empty(k_.sizes(), k_.options().memory_format(at::MemoryFormat::Contiguous)))),
        grad_v(kernel_output(
            at::empty(v_.sizes(), v_.options().memory_format(at::MemoryFormat::Contiguous)))),
        workspace(kernel_output(at::empty(
            {ma::backward_workspace_floats(scalar_kind(q_), static_cast<int>(q_.size(0)),
                                           static_cast<int>(q_.size(1)),
                                           static_cast<int>(q_.size(2)),
                                           static_cast<int>(v_.size(2)))},
            q_.options().dtype(at::kFloat)))) {}

  ma::BackwardBranch branch(ma::RowSetArg queries, ma::RowSetArg keys) {
    ma::BackwardBranch b;
    b.grad_out = matrix_arg(grad_out);
    b.q = matrix_arg(q);
    b.k = matrix_arg(k);
    b.v = matrix_arg(v);
    b.out = matrix_arg(out);
    b.lse = lse.data_ptr<float>();
    b.grad_q = matrix_arg(grad_q);
    b.grad_k = matrix_arg(grad_k);
    b.grad_v = matrix_arg(grad_v);
    b.workspace = workspace.data_ptr<float>();
    b.queries = queries;
    b.keys = keys;
    return b;
  }
};

template <typename Launch>
void fill_sizes(Launch& launch, const AttentionShape& shape, const at::Tensor& q, double scale) {
  launch.dtype = scalar_kind(q);
  launch.batch = static_cast<int>(shape.batch);
  launch.length = static_cast<int>(shape.length);
  launch.qk_dim = static_cast<int>(shape.qk_dim);
  launch.v_dim = static_cast<int>(shape.v_dim);
  launch.scale = static_cast<float>(scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
masked_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& query_mask,
    const at::Tensor& key_mask, double scale) {
  constexpr const char* op = "masked_attention_fwd_cuda";
  const AttentionShape shape = check_qkv(op, q, k, v);
  check_mask(op, "query_mask", query_mask, q);
  check_mask(op, "key_mask", key_mask, q);
  const KernelDeviceGuard guard(q.device());
  const Partition queries = partition_of(query_mask), keys = partition_of(key_mask);
  ForwardTensors tensors(q, k, v);
  ma::ForwardLaunch launch;
  fill_sizes(launch, shape, q, scale);
  launch.branch[0] = tensors.branch(queries.set(false), keys.set(false));
  check_launch(ma::launch_forward(launch, kernel_stream()), op);
  return {tensors.out, tensors.lse, queries.index, queries.count, keys.index, keys.count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& query_mask,
    const at::Tensor& key_mask, const at::Tensor& query_index, const at::Tensor& query_count,
    const at::Tensor& key_index, const at::Tensor& key_count, double scale) {
  constexpr const char* op = "masked_attention_bwd_cuda";
  const AttentionShape shape = check_qkv(op, q, k, v);
  check_like(op, "grad_out", grad_out, v, "v");
  check_like(op, "out", out, v, "v");
  check_lse(op, "lse", lse, q);
  check_mask(op, "query_mask", query_mask, q);
  check_mask(op, "key_mask", key_mask, q);
  const KernelDeviceGuard guard(q.device());
  const Partition queries =
      saved_partition(op, "query_index", query_index, "query_count", query_count, query_mask);
  const Partition keys = saved_partition(op, "key_index", key_index, "key_count", key_count, key_mask);
  BackwardTensors tensors(grad_out, q, k, v, out, lse);
  ma::BackwardLaunch launch;
  fill_sizes(launch, shape, q, scale);
  launch.branch[0] = tensors.branch(queries.set(false), keys.set(false));
  check_launch(ma::launch_backward(launch, kernel_stream()), op);
  return {tensors.grad_q, tensors.grad_k, tensors.grad_v};
}

// ----------------------------------------------------------------------------- dual
// Dual Spatial Attention: both branches take the foreground as queries; the cross branch
// attends to the background, the self branch to the foreground. One partition of the
// foreground mask yields both key lists, and each kernel covers both branches in one grid.
AttentionShape check_dual(const char* op, const at::Tensor& q_cross, const at::Tensor& k_cross,
                          const at::Tensor& v_cross, const at::Tensor& q_self,
                          const at::Tensor& k_self, const at::Tensor& v_self,
                          const at::Tensor& foreground) {
  const AttentionShape shape =
      check_qkv(op, q_cross, k_cross, v_cross, "q_cross", "k_cross", "v_cross");
  check_qkv(op, q_self, k_self, v_self, "q_self", "k_self", "v_self");
  check_like(op, "q_self", q_self, q_cross, "q_cross");
  TORCH_CHECK(v_self.sizes() == v_cross.sizes(), op, ": v_self must have the shape of v_cross ",
              v_cross.sizes(), ", got ", v_self.sizes());
  check_mask(op, "foreground", foreground, q_cross);
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_masked_attention_fwd_cuda(
    const at::Tensor& q_cross, const at::Tensor& k_cross, const at::Tensor& v_cross,
    const at::Tensor& q_self, const at::Tensor& k_self, const at::Tensor& v_self,
    const at::Tensor& foreground, double scale) {
  constexpr const char* op = "dual_masked_attention_fwd_cuda";
  const AttentionShape shape =
      check_dual(op, q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground);
  const KernelDeviceGuard guard(q_cross.device());
  const Partition fg = partition_of(foreground);
  ForwardTensors cross(q_cross, k_cross, v_cross), self(q_self, k_self, v_self);
  ma::ForwardLaunch launch;
  fill_sizes(launch, shape, q_cross, scale);
  launch.branches = 2;
  launch.branch[0] = cross.branch(fg.set(false), fg.set(true));
  launch.branch[1] = self.branch(fg.set(false), fg.set(false));
  check_launch(ma::launch_forward(launch, kernel_stream()), op);
  return {cross.out, cross.lse, self.out, self.lse, fg.index, fg.count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_masked_attention_bwd_cuda(const at::Tensor& grad_out_cross, const at::Tensor& grad_out_self,
                               const at::Tensor& q_cross, const at::Tensor& k_cross,
                               const at::Tensor& v_cross, const at::Tensor& q_self,
                               const at::Tensor& k_self, const at::Tensor& v_self,
                               const at::Tensor& out_cross, const at::Tensor& lse_cross,
                               const at::Tensor& out_self, const at::Tensor& lse_self,
                               const at::Tensor& foreground, const at::Tensor& foreground_index,
                               const at::Tensor& foreground_count, double scale) {
  constexpr const char* op = "dual_masked_attention_bwd_cuda";
  const AttentionShape shape =
      check_dual(op, q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground);
  check_like(op, "grad_out_cross", grad_out_cross, v_cross, "v_cross");
  check_like(op, "grad_out_self", grad_out_self, v_self, "v_self");
  check_like(op, "out_cross", out_cross, v_cross, "v_cross");
  check_like(op, "out_self", out_self, v_self, "v_self");
  check_lse(op, "lse_cross", lse_cross, q_cross);
  check_lse(op, "lse_self", lse_self, q_self);
  const KernelDeviceGuard guard(q_cross.device());
  const Partition fg = saved_partition(op, "foreground_index", foreground_index,
                                       "foreground_count", foreground_count, foreground);
  BackwardTensors cross(grad_out_cross, q_cross, k_cross, v_cross, out_cross, lse_cross);
  BackwardTensors self(grad_out_self, q_self, k_self, v_self, out_self, lse_self);
  ma::BackwardLaunch launch;
  fill_sizes(launch, shape, q_cross, scale);
  launch.branches = 2;
  launch.branch[0] = cross.branch(fg.set(false), fg.set(true));
  launch.branch[1] = self.branch(fg.set(false), fg.set(false));
  check_launch(ma::launch_backward(launch, kernel_stream()), op);
  return {cross.grad_q, cross.grad_k, cross.grad_v, self.grad_q, self.grad_k, self.grad_v};
}

// ----------------------------------------------------------------------------- attention KL
// KL(E_oracle‖E) per query row (dsa_ops.attention_kl): q, k of the prediction, q_oracle,
// k_oracle of the oracle pass, all (B, L, Dqk) of one dtype; float32 statistics.
namespace kl = attention_kl;

struct KlTensors {
  at::Tensor q, k, q_oracle, k_oracle;
  Partition queries, keys;
};

void check_kl_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& q_oracle, const at::Tensor& k_oracle,
                     const at::Tensor& query_mask, const at::Tensor& key_mask) {
  check_qkv(op, q, k, q);  // no values: q stands in for v
  check_like(op, "q_oracle", q_oracle, q, "q");
  check_like(op, "k_oracle", k_oracle, q, "q");
  check_mask(op, "query_mask", query_mask, q);
  check_mask(op, "key_mask", key_mask, q);
}

// After the checks, on the kernels' device: unit-stride inputs and the two partitions.
KlTensors kl_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_oracle,
                     const at::Tensor& k_oracle, Partition queries, Partition keys) {
  return {with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(q_oracle),
          with_unit_last_stride(k_oracle), std::move(queries), std::move(keys)};
}

kl::KlInputs kl_inputs(const KlTensors& t, double scale) {
  kl::KlInputs in;
  in.q = matrix_arg(t.q);
  in.k = matrix_arg(t.k);
  in.q_oracle = matrix_arg(t.q_oracle);
  in.k_oracle = matrix_arg(t.k_oracle);
  in.queries = t.queries.set(false);
  in.keys = t.keys.set(false);
  in.dtype = scalar_kind(t.q);
  in.batch = static_cast<int>(t.q.size(0));
  in.length = static_cast<int>(t.q.size(1));
  in.qk_dim = static_cast<int>(t.q.size(2));
  in.scale = static_cast<float>(scale);
  return in;
}

// Returns (kl, lse, lse_oracle) and the masks' partitions, which the backward takes back.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_kl_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_oracle,
    const at::Tensor& k_oracle, const at::Tensor& query_mask, const at::Tensor& key_mask,
    double scale) {
  constexpr const char* op = "attention_kl_fwd_cuda";
  check_kl_inputs(op, q, k, q_oracle, k_oracle, query_mask, key_mask);
  const KernelDeviceGuard guard(q.device());
  const KlTensors tensors =
      kl_tensors(q, k, q_oracle, k_oracle, partition_of(query_mask), partition_of(key_mask));
  auto statistic = [&] {
    return kernel_output(at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat)));
  };
  at::Tensor kl_out = statistic(), lse = statistic(), lse_oracle = statistic();
  kl::KlForwardLaunch launch;
  launch.in = kl_inputs(tensors, scale);
  launch.kl = kl_out.data_ptr<float>();
  launch.lse = lse.data_ptr<float>();
  launch.lse_oracle = lse_oracle.data_ptr<float>();
  check_launch(kl::launch_forward(launch, kernel_stream()), op);
  return {kl_out, lse, lse_oracle, tensors.queries.index, tensors.queries.count,
          tensors.keys.index, tensors.keys.count};
}

std::tuple<at::Tensor, at::Tensor> attention_kl_bwd_cuda(
    const at::Tensor& grad_kl, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_oracle, const at::Tensor& k_oracle, const at::Tensor& lse,
    const at::Tensor& lse_oracle, const at::Tensor& query_mask, const at::Tensor& key_mask,
    const at::Tensor& query_index, const at::Tensor& query_count, const at::Tensor& key_index,
    const at::Tensor& key_count, double scale) {
  constexpr const char* op = "attention_kl_bwd_cuda";
  check_kl_inputs(op, q, k, q_oracle, k_oracle, query_mask, key_mask);
  check_lse(op, "lse", lse, q);
  check_lse(op, "lse_oracle", lse_oracle, q);
  TORCH_CHECK(grad_kl.device() == q.device(), op, ": grad_kl is on ", grad_kl.device(),
              " but q is on ", q.device());
  TORCH_CHECK(grad_kl.dim() == 2 && grad_kl.size(0) == q.size(0) && grad_kl.size(1) == q.size(1),
              op, ": grad_kl must have shape (B, L) = (", q.size(0), ", ", q.size(1), "), got ",
              grad_kl.sizes());
  TORCH_CHECK(at::isFloatingType(grad_kl.scalar_type()), op,
              ": grad_kl must be a floating-point tensor, got ", grad_kl.scalar_type());
  const KernelDeviceGuard guard(q.device());
  const KlTensors tensors = kl_tensors(
      q, k, q_oracle, k_oracle,
      saved_partition(op, "query_index", query_index, "query_count", query_count, query_mask),
      saved_partition(op, "key_index", key_index, "key_count", key_count, key_mask));
  // The kernels read float32 statistics; the forward's kl is float32 already.
  const at::Tensor grad = grad_kl.to(at::kFloat).contiguous();
  const at::Tensor lse_c = lse.contiguous(), lse_oracle_c = lse_oracle.contiguous();
  auto gradient = [](const at::Tensor& like) {
    return kernel_output(
        at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous)));
  };
  at::Tensor grad_q = gradient(q), grad_k = gradient(k);
  kl::KlBackwardLaunch launch;
  launch.in = kl_inputs(tensors, scale);
  launch.grad_kl = grad.data_ptr<float>();
  launch.lse = lse_c.data_ptr<float>();
  launch.lse_oracle = lse_oracle_c.data_ptr<float>();
  launch.grad_q = matrix_arg(grad_q);
  launch.grad_k = matrix_arg(grad_k);
  check_launch(kl::launch_backward(launch, kernel_stream()), op);
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, DSA_OPS_KERNEL_DISPATCH_KEY, m) {
  m.impl("partition_indices", &partition_indices_cuda);
  m.impl("masked_attention_fwd_cuda", &masked_attention_fwd_cuda);
  m.impl("masked_attention_bwd_cuda", &masked_attention_bwd_cuda);
  m.impl("dual_masked_attention_fwd_cuda", &dual_masked_attention_fwd_cuda);
  m.impl("dual_masked_attention_bwd_cuda", &dual_masked_attention_bwd_cuda);
  m.impl("attention_kl_fwd_cuda", &attention_kl_fwd_cuda);
  m.impl("attention_kl_bwd_cuda", &attention_kl_bwd_cuda);
}

}  // namespace dsa_ops
