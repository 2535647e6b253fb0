// The online softmax (FlashAttention's running max and exp-sum per row) in the warp layout of
// device/warp_gemm.cuh, shared by the masked-attention forward and both passes of the
// attention-KL forward.
#pragma once

#include <cmath>
#include <type_traits>

#include "device/warp_gemm.cuh"

namespace dsa_ops {
namespace device {

constexpr float kLog2e = 1.4426950408889634f;

// exp(x) for a difference x of scaled scores, through exp2. Softmax statistics (row max,
// lse) stay in natural units and only these small differences are scaled by log2 e: the
// lse that crosses the op boundary is then used by the backward exactly as the forward
// produced it (converting a large lse between bases loses float32 precision).
__device__ inline float exp_difference(float x) { return exp2f(x * kLog2e); }

// exp(s − shift) of a scaled score s, as the softmax's P for dtype T. For 16-bit dtypes one
// fma forms the exponent, s·log2 e − shift·log2 e (FlashAttention-2's form): the rounding of
// shift·log2 e moves P by at most |shift|·2⁻²⁴ relative, far below the 16-bit rounding P
// gets before P·V. float32 keeps exp_difference of the exact difference, since there P is
// used as computed.
template <typename T>
__device__ inline float exp_of_shifted(float s, float shift) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_difference(s - shift);
  } else {
    return exp2f(fmaf(s, kLog2e, -shift * kLog2e));
  }
}

// Online-softmax state of the two rows (g and g + 8 of the warp's strip) a lane touches.
struct OnlineSoftmaxRows {
  float max[2] = {-INFINITY, -INFINITY};
  float sum[2] = {0.f, 0.f};  // this lane's share of exp(s − max), summed over its columns

  // One step: takes in a tile's per-lane row maxima (of the scaled scores, -inf where
  // masked); returns in `shift` the max to subtract from this tile's scores and in
  // `rescale` the factor for everything accumulated against the old max (the sums here
  // are rescaled already; the caller rescales its own accumulators).
  __device__ void advance(const float (&tile_max)[2], float (&shift)[2], float (&rescale)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float new_max = fmaxf(max[i], row_max(tile_max[i]));
      // A row that has seen only -inf scores keeps a finite shift so exp2 never sees
      // (-inf) - (-inf).
      shift[i] = new_max == -INFINITY ? 0.f : new_max;
      rescale[i] = exp_difference(max[i] - shift[i]);
      max[i] = new_max;
      sum[i] *= rescale[i];
    }
  }
};

}  // namespace device
}  // namespace dsa_ops
