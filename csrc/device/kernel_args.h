// What every op's launchers take from its bindings: plain structs of pointers and strides
// (no ATen types, so kernel files compile without torch headers), and the head sizes the
// shared tile layer supports (dispatch_qk_dim pads Dqk to 16, 32 or 64).
#pragma once

#include <cstdint>

namespace dsa_ops {

// Dqk the kernels accept (dsa_ops/ops/registry.py FUSED_QK_DIMS mirrors these): zero-padded in
// shared memory to 16, 32 or 64.
constexpr int kMinQkDim = 8;
constexpr int kMaxQkDim = 64;

enum class ScalarKind { kFloat32, kFloat16, kBFloat16 };

// A (B, L, D) tensor whose last dimension has unit stride; strides in elements.
struct MatrixArg {
  const void* data = nullptr;
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
};

// A set of positions per sample as a stable partition of a mask (partition_indices):
// index (B, L) int32 contiguous, count (B,) int32. complement = the set is the mask's
// false positions (index[b, count[b]:]) instead of its true ones.
struct RowSetArg {
  const int32_t* index = nullptr;
  const int32_t* count = nullptr;
  bool complement = false;
};

}  // namespace dsa_ops
