// attention_kl for the kernels' dispatch key (the schemas are dsa_ops/ops/attention_kl/op.py's):
// KL(E_oracle‖E) per query row (dsa_ops.attention_kl) from q, k of the prediction and
// q_oracle, k_oracle of the oracle pass, all (B, L, Dqk) of one dtype; float32 statistics.
// Built for CUDA and for the host emulation as masked_attention/bindings.cpp.
#include <tuple>
#include <utility>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "attention_kl/launch.cuh"
#include "common/checks.h"
#include "common/kernel_device.h"
#include "common/partition.h"

namespace dsa_ops {
namespace attention_kl {
namespace {

struct KlTensors {
  at::Tensor q, k, q_oracle, k_oracle;
  Partition queries, keys;
};

void check_kl_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& q_oracle, const at::Tensor& k_oracle,
                     const at::Tensor& query_mask, const at::Tensor& key_mask) {
  check_qkv(op, q, k, nullptr, {});  // no values
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

KlInputs kl_inputs(const KlTensors& t, double scale) {
  KlInputs in;
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
  auto statistic = [&] { return new_output(q, {q.size(0), q.size(1)}, at::kFloat); };
  at::Tensor kl_out = statistic(), lse = statistic(), lse_oracle = statistic();
  KlForwardLaunch launch;
  launch.in = kl_inputs(tensors, scale);
  launch.kl = kl_out.data_ptr<float>();
  launch.lse = lse.data_ptr<float>();
  launch.lse_oracle = lse_oracle.data_ptr<float>();
  check_launch(launch_forward(launch, kernel_stream()), op);
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
  check_same_device(op, "grad_kl", grad_kl, q);
  check_row_shape(op, "grad_kl", grad_kl, q);
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
    return new_output(like, like.sizes(), like.scalar_type());
  };
  at::Tensor grad_q = gradient(q), grad_k = gradient(k);
  KlBackwardLaunch launch;
  launch.in = kl_inputs(tensors, scale);
  launch.grad_kl = grad.data_ptr<float>();
  launch.lse = lse_c.data_ptr<float>();
  launch.lse_oracle = lse_oracle_c.data_ptr<float>();
  launch.grad_q = matrix_arg(grad_q);
  launch.grad_k = matrix_arg(grad_k);
  check_launch(launch_backward(launch, kernel_stream()), op);
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, DSA_OPS_KERNEL_DISPATCH_KEY, m) {
  m.impl("attention_kl_fwd_cuda", &attention_kl_fwd_cuda);
  m.impl("attention_kl_bwd_cuda", &attention_kl_bwd_cuda);
}

}  // namespace attention_kl
}  // namespace dsa_ops
