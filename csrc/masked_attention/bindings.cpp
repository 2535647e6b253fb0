// masked_attention and dual_masked_attention for the kernels' dispatch key (the schemas are in
// dsa_ops/ops/masked_attention/op.py and dual.py): each binding checks what its kernels assume,
// allocates the outputs and launches on the current stream. Built twice: by nvcc's toolchain for
// the CUDA dispatch key, and with the host emulation of the kernels for the CPU key
// (common/kernel_device.h).
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/kernel_device.h"
#include "common/partition.h"
#include "masked_attention/launch.cuh"

namespace dsa_ops {
namespace masked_attention {
namespace {

constexpr VDimRange kVDims{kMinVDim, kMaxVDim};

// The tensors of one forward branch after stride fixes, kept alive until the launch.
struct ForwardTensors {
  at::Tensor q, k, v, out, lse;
  ForwardTensors(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_)
      : q(with_unit_last_stride(q_)), k(with_unit_last_stride(k_)), v(with_unit_last_stride(v_)),
        out(new_output(v_, v_.sizes(), v_.scalar_type())),
        lse(new_output(q_, {q_.size(0), q_.size(1)}, at::kFloat)) {}

  ForwardBranch branch(RowSetArg queries, RowSetArg keys) {
    ForwardBranch b;
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
        grad_q(new_output(q_, q_.sizes(), q_.scalar_type())),
        grad_k(new_output(k_, k_.sizes(), k_.scalar_type())),
        grad_v(new_output(v_, v_.sizes(), v_.scalar_type())),
        workspace(new_output(
            q_,
            {backward_workspace_floats(scalar_kind(q_), static_cast<int>(q_.size(0)),
                                       static_cast<int>(q_.size(1)), static_cast<int>(q_.size(2)),
                                       static_cast<int>(v_.size(2)))},
            at::kFloat)) {}

  BackwardBranch branch(RowSetArg queries, RowSetArg keys) {
    BackwardBranch b;
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
  const AttentionShape shape = check_qkv(op, q, k, &v, kVDims);
  check_mask(op, "query_mask", query_mask, q);
  check_mask(op, "key_mask", key_mask, q);
  const KernelDeviceGuard guard(q.device());
  const Partition queries = partition_of(query_mask), keys = partition_of(key_mask);
  ForwardTensors tensors(q, k, v);
  ForwardLaunch launch;
  fill_sizes(launch, shape, q, scale);
  launch.branch[0] = tensors.branch(queries.set(false), keys.set(false));
  check_launch(launch_forward(launch, kernel_stream()), op);
  return {tensors.out, tensors.lse, queries.index, queries.count, keys.index, keys.count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& query_mask,
    const at::Tensor& key_mask, const at::Tensor& query_index, const at::Tensor& query_count,
    const at::Tensor& key_index, const at::Tensor& key_count, double scale) {
  constexpr const char* op = "masked_attention_bwd_cuda";
  const AttentionShape shape = check_qkv(op, q, k, &v, kVDims);
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
  BackwardLaunch launch;
  fill_sizes(launch, shape, q, scale);
  launch.branch[0] = tensors.branch(queries.set(false), keys.set(false));
  check_launch(launch_backward(launch, kernel_stream()), op);
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
      check_qkv(op, q_cross, k_cross, &v_cross, kVDims, "q_cross", "k_cross", "v_cross");
  check_qkv(op, q_self, k_self, &v_self, kVDims, "q_self", "k_self", "v_self");
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
  ForwardLaunch launch;
  fill_sizes(launch, shape, q_cross, scale);
  launch.branches = 2;
  launch.branch[0] = cross.branch(fg.set(false), fg.set(true));
  launch.branch[1] = self.branch(fg.set(false), fg.set(false));
  check_launch(launch_forward(launch, kernel_stream()), op);
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
  BackwardLaunch launch;
  fill_sizes(launch, shape, q_cross, scale);
  launch.branches = 2;
  launch.branch[0] = cross.branch(fg.set(false), fg.set(true));
  launch.branch[1] = self.branch(fg.set(false), fg.set(false));
  check_launch(launch_backward(launch, kernel_stream()), op);
  return {cross.grad_q, cross.grad_k, cross.grad_v, self.grad_q, self.grad_k, self.grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, DSA_OPS_KERNEL_DISPATCH_KEY, m) {
  m.impl("masked_attention_fwd_cuda", &masked_attention_fwd_cuda);
  m.impl("masked_attention_bwd_cuda", &masked_attention_bwd_cuda);
  m.impl("dual_masked_attention_fwd_cuda", &dual_masked_attention_fwd_cuda);
  m.impl("dual_masked_attention_bwd_cuda", &dual_masked_attention_bwd_cuda);
}

}  // namespace masked_attention
}  // namespace dsa_ops
