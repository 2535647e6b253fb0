// One warp-level matrix product that runs on tensor cores (mma.sync m16n8k16, operands by
// ldmatrix) for float16/bfloat16 and on FMA units for float32 with the same register
// layout, so every kernel body is written once for all three dtypes; the products whose A
// operand is an accumulator strip (P·V, dS·K) keep it in registers; a strip's way out to
// global memory (store_rows) and the reductions over the four lanes that share a row.
#pragma once

#include <cstdint>

#include "device/primitives.cuh"
#include "device/tiles.cuh"

namespace dsa_ops {
namespace device {

// ----------------------------------------------------------------------------- warp GEMM
// Accumulator layout (PTX ISA, mma.m16n8k16 with f32 accumulators), lane = 4·g + t:
// element e of n-tile j holds row g + 8·(e / 2), column 8·j + 2·t + e % 2.
struct LaneCoords {
  int g;
  int t;
  __device__ LaneCoords() : g((threadIdx.x % 32) / 4), t(threadIdx.x % 4) {}
  __device__ int row(int e) const { return g + 8 * (e / 2); }
  __device__ int col(int j, int e) const { return 8 * j + 2 * t + e % 2; }
};

// How B(k, n) sits in shared memory: kNK = stored [n][k] (e.g. K rows for Q·Kᵀ),
// kKN = stored [k][n] (e.g. V rows for P·V).
enum class BLayout { kNK, kKN };

// How A(m, k) sits in shared memory: kMK = stored [m][k] (rows of Q), kKM = stored [k][m]
// (dSᵀ strips as the A operand dS of dS·K).
enum class ALayout { kMK, kKM };

// B fragments (k 16 × n 8) of n-tiles j, j + 1 (PAIR) or j alone, k from k0, by ldmatrix:
// kNK rows are n (plain: a lane gets a k pair), kKN rows are k (.trans). Lanes 8i..8i+7
// address matrix i: x4 = (j, k0), (j, k0 + 8), (j + 1, k0), (j + 1, k0 + 8).
template <BLayout LAYOUT, bool PAIR, typename T>
__device__ inline void load_b_fragments(uint32_t (&frag)[PAIR ? 4 : 2], const T* b, int ldb,
                                        int k0, int j) {
  const int lane = threadIdx.x % 32;
  const int within = lane % 8;
  const int k_half = (lane / 8) % 2;
  const int n_tile = PAIR ? j + lane / 16 : j;
  if constexpr (LAYOUT == BLayout::kNK) {
    device::ldmatrix<PAIR ? 4 : 2, false>(frag, b + (8 * n_tile + within) * ldb + k0 + 8 * k_half);
  } else {
    device::ldmatrix<PAIR ? 4 : 2, true>(frag, b + (k0 + 8 * k_half + within) * ldb + 8 * n_tile);
  }
}

// acc (16 × 8·NT) += A (16 × 16) · B (16 × 8·NT) on tensor cores, A as its mma fragment,
// B rows (kKN) or columns (kNK) k0..k0 + 15 in shared memory. Each fragment pair is loaded
// just before its two MMAs: loading them all first was 14 % slower under the simulator
// (the bursts of ldmatrix, then of MMAs, each fill their pipe while the other idles).
template <typename T, int NT, BLayout LAYOUT>
__device__ inline void mma_row_strip(float (&acc)[NT][4], const uint32_t (&a_frag)[4],
                                     const T* b, int ldb, int k0) {
#pragma unroll
  for (int j = 0; j + 1 < NT; j += 2) {
    uint32_t b_frag[4];
    load_b_fragments<LAYOUT, true>(b_frag, b, ldb, k0, j);
    const uint32_t first[2] = {b_frag[0], b_frag[1]}, second[2] = {b_frag[2], b_frag[3]};
    device::mma_m16n8k16<T>(acc[j], a_frag, first);
    device::mma_m16n8k16<T>(acc[j + 1], a_frag, second);
  }
  if constexpr (NT % 2 == 1) {
    uint32_t b_frag[2];
    load_b_fragments<LAYOUT, false>(b_frag, b, ldb, k0, NT - 1);
    device::mma_m16n8k16<T>(acc[NT - 1], a_frag, b_frag);
  }
}

// acc (16 × 8·NT) += A (16 × K) · B (K × 8·NT), A and B in shared memory with the given
// layouts and pitches (A at a[m·lda + k] for kMK, a[k·lda + m] for kKM); every row of A and
// B 16-byte aligned (pitches from padded_pitch, see rows_16_byte_aligned). K must be a
// multiple of 16. The caller's warp owns the 16 rows of A; all 32 lanes must call.
template <typename T, int K, int NT, BLayout LAYOUT, ALayout A_LAYOUT = ALayout::kMK>
__device__ inline void warp_gemm(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb) {
  static_assert(K % 16 == 0, "warp_gemm needs K in multiples of 16");
  constexpr bool kAByK = A_LAYOUT == ALayout::kKM;
  if constexpr (DTypeTraits<T>::kTensorCores) {
    // A fragment by ldmatrix.x4: matrices (rows 0-7, k0), (rows 8-15, k0), (rows 0-7,
    // k0 + 8), (rows 8-15, k0 + 8) are registers a0..a3 of mma.m16n8k16. Stored by k, lane
    // 8i + r addresses k row k0 + 8·(i / 2) + r of matrix i, and .trans hands each lane
    // the (m, k pair) a row-major load would.
    const int lane = threadIdx.x % 32;
    const T* const a_row = kAByK ? a + (8 * (lane / 16) + lane % 8) * lda + 8 * ((lane / 8) % 2)
                                 : a + (lane % 16) * lda + 8 * (lane / 16);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a_frag[4];
      device::ldmatrix<4, kAByK>(a_frag, a_row + (kAByK ? k0 * lda : k0));
      mma_row_strip<T, NT, LAYOUT>(acc, a_frag, b, ldb, k0);
    }
  } else {
    // float32: plain FMAs into the same accumulator layout (no TF32: full precision).
    const LaneCoords lane;
    auto b_at = [&](int k, int n) -> T {
      return LAYOUT == BLayout::kNK ? b[n * ldb + k] : b[k * ldb + n];
    };
    auto a_at = [&](int m, int k) -> T { return kAByK ? a[k * lda + m] : a[m * lda + k]; };
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float a_lo = a_at(lane.g, k);
      const float a_hi = a_at(lane.g + 8, k);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float b0 = b_at(k, 8 * j + 2 * lane.t);
        const float b1 = b_at(k, 8 * j + 2 * lane.t + 1);
        acc[j][0] = fmaf(a_lo, b0, acc[j][0]);
        acc[j][1] = fmaf(a_lo, b1, acc[j][1]);
        acc[j][2] = fmaf(a_hi, b0, acc[j][2]);
        acc[j][3] = fmaf(a_hi, b1, acc[j][3]);
      }
    }
  }
}

template <int NT>
__device__ inline void zero_fill(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }
}

// Stores a warp's accumulator strip (16 × 8·NT), times `factor`, into shared memory as T:
// float32's A operand of the next product (P for P·V, dS for dS·K), or an output strip on
// its way to global memory (store_rows).
template <typename T, int NT>
__device__ inline void store_strip(T* dst, int pitch, const float (&acc)[NT][4],
                                   float factor = 1.f) {
  const LaneCoords lane;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dst[lane.row(e) * pitch + lane.col(j, e)] = DTypeTraits<T>::from_float(acc[j][e] * factor);
    }
  }
}

// The mma A fragment (16 × 16, rounded to T) of two accumulator n-tiles of a warp's strip,
// columns 16kk.. (lo = n-tile 2kk, hi = 2kk + 1): each lane's own accumulator pairs (c0, c1),
// (c2, c3) are exactly its A registers, so no data moves between lanes.
template <typename T>
__device__ inline void pack_a_fragment(uint32_t (&frag)[4], const float (&lo)[4],
                                       const float (&hi)[4]) {
  using Traits = DTypeTraits<T>;
  frag[0] = Traits::pack(lo[0], lo[1]);
  frag[1] = Traits::pack(lo[2], lo[3]);
  frag[2] = Traits::pack(hi[0], hi[1]);
  frag[3] = Traits::pack(hi[2], hi[3]);
}

// Elements of the float32 scratch strip warp_gemm_acc_a needs per warp (none for 16-bit
// dtypes, whose A operand stays in registers).
template <typename T, int KTILES>
constexpr int acc_a_scratch_elements() {
  return DTypeTraits<T>::kTensorCores ? 0 : kWarpRows * padded_pitch<T>(8 * KTILES);
}

// acc (16 × 8·NT) += A (16 × 8·KTILES) · B, A a warp's accumulator strip (P for P·V, dS
// for dS·K) and B in shared memory as for warp_gemm. 16-bit: A stays in registers; the
// accumulators of n-tiles 2kk, 2kk + 1 are the A fragment of k-block kk once rounded to T
// and packed in pairs ((c0, c1), (c2, c3) of each). float32: A goes through the warp's
// `f32_scratch` strip (acc_a_scratch_elements; ignored for 16-bit) to the FMA path.
template <typename T, int KTILES, int NT, BLayout LAYOUT>
__device__ inline void warp_gemm_acc_a(float (&acc)[NT][4], const float (&a)[KTILES][4],
                                       const T* b, int ldb, T* f32_scratch) {
  static_assert(KTILES % 2 == 0, "the A strip is whole 16-column k-blocks");
  using Traits = DTypeTraits<T>;
  if constexpr (Traits::kTensorCores) {
#pragma unroll
    for (int kk = 0; kk < KTILES / 2; ++kk) {
      uint32_t a_frag[4];
      pack_a_fragment<T>(a_frag, a[2 * kk], a[2 * kk + 1]);
      mma_row_strip<T, NT, LAYOUT>(acc, a_frag, b, ldb, 16 * kk);
    }
  } else {
    constexpr int kPitch = padded_pitch<T>(8 * KTILES);
    device::warp_barrier();  // every lane is done reading the strip of the previous call
    store_strip<T>(f32_scratch, kPitch, a);
    device::warp_barrier();
    warp_gemm<T, 8 * KTILES, NT, LAYOUT>(acc, f32_scratch, kPitch, b, ldb);
  }
}

// Writes a warp's 16 × 8·NT accumulator strip, times `factor`, to the rows of `dst` at the
// slots slot0 + (strip rows) that are inside `set`, columns col0 + (strip cols) < columns.
// The strip goes out through `staging`, 16 rows × `pitch` (rows 16-byte aligned) of shared
// memory that no other warp touches meanwhile (e.g. the warp's own rows of an operand tile
// after its last product): in the accumulator layout a lane holds two adjacent elements of
// a row, so direct stores would be 16-bit scalars; staged, a row leaves in whole 16-byte
// chunks (store_rows_chunked), one position lookup per chunk.
template <typename T, int NT>
__device__ void store_rows(const Rows<T>& dst, const SampleRowSet& set, int sample, int slot0,
                           int col0, int columns, const float (&acc)[NT][4], float factor,
                           T* staging, int pitch) {
  device::warp_barrier();  // every lane is done reading `staging` as an operand
  store_strip<T>(staging, pitch, acc, factor);
  device::warp_barrier();
  const int rows = min(kWarpRows, set.size - slot0);
  if (rows <= 0) return;
  store_rows_chunked<T, 8 * NT>(dst, set, sample, slot0, rows, col0, columns, staging, pitch,
                                static_cast<int>(threadIdx.x % 32), 32);
}

// Sum / max over the four lanes (t = 0..3) that share a row.
__device__ inline float row_sum(float x) {
  x += device::shfl_xor(x, 1);
  x += device::shfl_xor(x, 2);
  return x;
}

// Sum over the 32 lanes of a warp, in every lane.
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) x += device::shfl_xor(x, mask);
  return x;
}

__device__ inline float row_max(float x) {
  x = fmaxf(x, device::shfl_xor(x, 1));
  x = fmaxf(x, device::shfl_xor(x, 2));
  return x;
}

}  // namespace device
}  // namespace dsa_ops
