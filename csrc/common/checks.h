// The argument checks every op's bindings share, and the conversions from tensors to the
// launchers' plain structs (device/kernel_args.h). Each check names the op and the
// argument, so a bad input is one clear line (TORCH_CHECK) before any kernel runs.
#pragma once

#include <cstdint>
#include <utility>

#include <ATen/core/Tensor.h>

#include "common/kernel_device.h"
#include "device/kernel_args.h"

namespace dsa_ops {

inline ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

// The kernels need unit stride along the head dimension only; anything else is copied.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

inline MatrixArg matrix_arg(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 3 && t.stride(2) == 1);
  return {t.data_ptr(), t.stride(0), t.stride(1)};
}

// An empty contiguous tensor of `sizes` with `like`'s device and the given dtype, as the
// kernels' output (kernel_output: NaN-filled under the emulation).
inline at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  return kernel_output(like.new_empty(sizes, like.options().dtype(dtype)));
}

struct AttentionShape {
  int64_t batch, length, qk_dim, v_dim;
};

// The Dv an op's kernels accept.
struct VDimRange {
  int min, max;
};

// Checks one attention problem's tensors: device, dtype, shapes, supported head sizes.
// `op` and the argument names make the messages point at the caller's argument. `v` may be
// null for an op without values (attention_kl); then v_dim is Dqk and `v_dims` unused.
inline AttentionShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor* v, VDimRange v_dims, const char* q_name = "q",
                                const char* k_name = "k", const char* v_name = "v") {
  TORCH_CHECK(on_kernel_device(q), op, ": ", q_name, " must be ", kKernelTensors, ", got ",
              q.device());
  TORCH_CHECK(q.dim() == 3, op, ": ", q_name, " must have shape (B, L, Dqk), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              op, ": ", q_name, " must be float32, float16 or bfloat16, got ", q.scalar_type());
  using Named = std::pair<const char*, const at::Tensor*>;
  for (const auto& [name, t] : {Named{k_name, &k}, Named{v_name, v}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but ", q_name,
                " is on ", q.device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of ",
                q_name, " (", q.scalar_type(), "), got ", t->scalar_type());
  }
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": ", k_name, " must have the shape of ", q_name, " ",
              q.sizes(), ", got ", k.sizes());
  if (v != nullptr) {
    TORCH_CHECK(v->dim() == 3 && v->size(0) == q.size(0) && v->size(1) == q.size(1), op, ": ",
                v_name, " must have shape (B, L, Dv) = (", q.size(0), ", ", q.size(1),
                ", Dv), got ", v->sizes());
  }
  const int64_t v_dim = v != nullptr ? v->size(2) : q.size(2);
  const AttentionShape shape{q.size(0), q.size(1), q.size(2), v_dim};
  TORCH_CHECK(shape.qk_dim >= kMinQkDim && shape.qk_dim <= kMaxQkDim, op,
              ": the CUDA kernels support Dqk (last dim of ", q_name, ", ", k_name, ") in ",
              kMinQkDim, "..", kMaxQkDim, ", got ", shape.qk_dim,
              "; use backend='reference' or 'triton' for other sizes");
  if (v != nullptr) {
    TORCH_CHECK(shape.v_dim >= v_dims.min && shape.v_dim <= v_dims.max, op,
                ": the CUDA kernels support Dv (last dim of ", v_name, ") in ", v_dims.min, "..",
                v_dims.max, ", got ", shape.v_dim,
                "; use backend='reference' or 'triton' for other sizes");
  }
  TORCH_CHECK(shape.batch <= 65535, op, ": batch size must be at most 65535 (grid limit), got ",
              shape.batch);
  // Slot arithmetic (tile ends, rotated complement lists) is int32: keep L well clear of
  // its limit. 2^30 positions is far beyond any map that fits in memory.
  TORCH_CHECK(shape.length <= (int64_t{1} << 30), op, ": L must be at most 2^30, got ",
              shape.length);
  return shape;
}

// `t` is on q's device.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& q, const char* q_name = "q") {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but ", q_name,
              " is on ", q.device());
}

// `t` has one value per row of q, (B, L): a mask, a log-sum-exp, grad_kl.
inline void check_row_shape(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(1), op, ": ", name,
              " must have shape (B, L) = (", q.size(0), ", ", q.size(1), "), got ", t.sizes());
}

inline void check_mask(const char* op, const char* name, const at::Tensor& mask,
                       const at::Tensor& q) {
  check_same_device(op, name, mask, q);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": ", name, " must be bool, got ",
              mask.scalar_type());
  check_row_shape(op, name, mask, q);
}

// A saved log-sum-exp (the forward's float32 statistic per row).
inline void check_lse(const char* op, const char* name, const at::Tensor& lse,
                      const at::Tensor& q) {
  check_same_device(op, name, lse, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": ", name,
              " (the forward's log-sum-exp) must be float32, got ", lse.scalar_type());
  check_row_shape(op, name, lse, q);
}

inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ",
              like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name,
              " ", like.sizes(), ", got ", t.sizes());
}

}  // namespace dsa_ops
