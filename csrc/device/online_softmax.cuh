// The online softmax (FlashAttention's running max and exp-sum per row) in the warp layout of
// device/warp_gemm.cuh, shared by the masked-attention forward (and its P, exp_of_scaled,
// with the backward) and both passes of the attention-KL forward.
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

// exp(scale·s − shift) of a raw score s, as the softmax's P for dtype T; the forward and
// the backward's key kernel form P with it, from the same rounded values. 16-bit dtypes
// fold the scale into the exponent's fma, s·(scale·log2 e) − shift·log2 e
// (FlashAttention-2's scale_apply_exp2: no multiply per score): the roundings of
// scale·log2 e and shift·log2 e move the exponent by at most
// 2⁻²⁴·(|scale·s| + |shift|)·log2 e, far below the 16-bit rounding P gets before P·V.
// float32 rounds scale·s on its own first, as the reference does, and takes the exact
// difference: at |scale·s| ≈ 10³ an fma's unrounded product would move P by 10⁻⁴ against
// the lse the backward recomputes it with (tests/test_backends.py, large-magnitude).
template <typename T>
__device__ inline float exp_of_scaled(float s, float scale, float shift) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_difference(device::mul_rn(s, scale) - shift);
  } else {
    return exp2f(fmaf(s, scale * kLog2e, -shift * kLog2e));
  }
}

// The value a masked raw score takes so that scaled_row_max passes over it: scale·s is
// largest where s is largest for scale ≥ 0, where it is smallest below.
__device__ inline float masked_raw_score(float scale) { return scale >= 0.f ? -INFINITY : INFINITY; }

// Four partial maxima (ASCENDING) or minima of each of the rows g and g + 8 of a strip, by
// element and n-tile parity: four independent chains a row, a quarter of one chain's length.
template <bool ASCENDING, int NT>
__device__ inline void partial_row_extremes(const float (&s)[NT][4], float start,
                                            float (&part)[4][2]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) part[p][0] = part[p][1] = start;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& m = part[e % 2 + 2 * (j % 2)][e / 2];
      m = ASCENDING ? fmaxf(m, s[j][e]) : fminf(m, s[j][e]);
    }
  }
}

// This lane's maximum of scale·s over its columns of rows g and g + 8 of a strip of raw
// scores s: scale·max(s) for scale ≥ 0, scale·min(s) below (no multiply per score), -inf
// where every column is masked (masked_raw_score). The partial extremes cut the dependency
// chain a warp waits through to a quarter: a max waits longer than an add.
template <int NT>
__device__ inline void scaled_row_max(const float (&s)[NT][4], float scale, float (&row_max)[2]) {
  static_assert(NT % 2 == 0, "a strip of whole n-tile pairs");
  const bool ascending = scale >= 0.f;
  const float masked = masked_raw_score(scale);
  float part[4][2];  // [e % 2 + 2·(j % 2)][row]
  if (ascending) {
    partial_row_extremes<true>(s, masked, part);
  } else {
    partial_row_extremes<false>(s, masked, part);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float extreme =
        ascending ? fmaxf(fmaxf(part[0][i], part[1][i]), fmaxf(part[2][i], part[3][i]))
                  : fminf(fminf(part[0][i], part[1][i]), fminf(part[2][i], part[3][i]));
    row_max[i] = extreme == masked ? -INFINITY : scale * extreme;
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
    advance_max(tile_max, shift, rescale);
#pragma unroll
    for (int i = 0; i < 2; ++i) sum[i] *= rescale[i];
  }

  // advance without touching the sums: the caller adds the tile's exponentials with
  // add_tile_sums, after them, so the wait for the rescale's exp2 (the slowest unit) is
  // spent issuing the tile's own exponentials rather than in front of them.
  __device__ void advance_max(const float (&tile_max)[2], float (&shift)[2], float (&rescale)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float new_max = fmaxf(max[i], row_max(tile_max[i]));
      // A row that has seen only -inf scores keeps a finite shift so exp2 never sees
      // (-inf) - (-inf).
      shift[i] = new_max == -INFINITY ? 0.f : new_max;
      rescale[i] = exp_difference(max[i] - shift[i]);
      max[i] = new_max;
    }
  }

  // The sums after advance_max: the old ones rescaled, plus this tile's.
  __device__ void add_tile_sums(const float (&rescale)[2], const float (&tile_sum)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) sum[i] = fmaf(sum[i], rescale[i], tile_sum[i]);
  }
};

}  // namespace device
}  // namespace dsa_ops
