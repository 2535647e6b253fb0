// Device-side building blocks shared by the masked-attention kernels: tile sizes, dtype
// traits, gathered row access through partition index lists, tile loads into shared
// memory, and one warp-level matrix product that runs on tensor cores (mma.sync
// m16n8k16) for float16/bfloat16 and on FMA units for float32 with the same register
// layout, so every kernel body is written once for all three dtypes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/primitives.cuh"
#include "masked_attention/launch.cuh"

namespace dsa_ops {
namespace masked_attention {

// ----------------------------------------------------------------------------- tiles
// Four warps; each owns a strip of 16 rows of a 64-row tile (FlashAttention-2 layout:
// no cross-warp reductions inside the softmax).
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;
constexpr int kBlockRows = kWarps * kWarpRows;  // query rows (forward, dQ) or key rows (dK, dV)
constexpr int kBlockCols = 64;                  // key columns (forward, dQ) or query columns
constexpr int kVChunk = 64;                     // columns of V / dO handled per pass

constexpr float kLog2e = 1.4426950408889634f;

// exp(x) for a difference x of scaled scores, through exp2. Softmax statistics (row max,
// lse) stay in natural units and only these small differences are scaled by log2 e: the
// lse that crosses the op boundary is then used by the backward exactly as the forward
// produced it (converting a large lse between bases loses float32 precision).
__device__ inline float exp_difference(float x) { return exp2f(x * kLog2e); }

// ----------------------------------------------------------------------------- dtypes
template <typename T>
struct DTypeTraits;

template <>
struct DTypeTraits<float> {
  static constexpr bool kTensorCores = false;
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
};

template <>
struct DTypeTraits<__half> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Shared-memory row pitch: 16 bytes of padding per row, so the eight rows a warp reads in
// one fragment load start in different banks.
template <typename T>
constexpr int padded_pitch(int width) {
  return width + 16 / static_cast<int>(sizeof(T));
}

// ----------------------------------------------------------------------------- rows
// A (B, L, D) tensor with unit stride along D, addressed by (sample, position).
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride;
  int64_t row_stride;

  __device__ T* row(int64_t sample, int64_t position) const {
    return data + sample * batch_stride + position * row_stride;
  }
};

template <typename T>
__device__ Rows<T> typed(const MatrixArg& arg) {
  return Rows<T>{static_cast<T*>(const_cast<void*>(arg.data)), arg.batch_stride, arg.row_stride};
}

// One sample's row set, read off a stable partition (index, count) of a mask. Slots
// [0, size) are the members in increasing position order, slots [size, L) the other
// positions: for a plain set the list is index[0..L); for the complement of the mask
// (the background in the dual kernel) it is index rotated by count, so the same
// partition serves both sets.
struct SampleRowSet {
  const int32_t* index;  // this sample's (L,) partition
  int begin;
  int size;
  int length;

  __device__ SampleRowSet(const RowSetArg& set, int sample, int length_)
      : index(set.index + static_cast<int64_t>(sample) * length_), length(length_) {
    const int count = set.count[sample];
    begin = set.complement ? count : 0;
    size = set.complement ? length_ - count : count;
  }

  __device__ int position(int slot) const {
    int i = begin + slot;
    if (i >= length) i -= length;
    return index[i];
  }
};

// Gathers `rows` rows (slots slot0.. of `set`) of `src`, columns col0..col0+WIDTH, into
// dst[ROWS][pitch]. Rows past `valid_rows` and columns past `columns` are zero, which makes
// padded dot products exact.
template <typename T, int ROWS, int WIDTH>
__device__ void load_tile(T* dst, int pitch, const Rows<const T>& src, const SampleRowSet& set,
                          int sample, int slot0, int valid_rows, int col0, int columns) {
  for (int i = threadIdx.x; i < ROWS * WIDTH; i += kThreads) {
    const int r = i / WIDTH;
    const int c = i % WIDTH;
    T value = DTypeTraits<T>::from_float(0.f);
    if (r < valid_rows && col0 + c < columns) {
      value = src.row(sample, set.position(slot0 + r))[col0 + c];
    }
    dst[r * pitch + c] = value;
  }
}

// Writes zeros into the rows of `dst` (columns col0..col0+WIDTH, clipped to `columns`) whose
// slots in [first, last) are outside the set: the part of a tile past the set's size.
template <typename T, int WIDTH>
__device__ void zero_rows(const Rows<T>& dst, const SampleRowSet& set, int sample, int first,
                          int last, int col0, int columns) {
  const int rows = last - first;
  for (int i = threadIdx.x; i < rows * WIDTH; i += kThreads) {
    const int r = i / WIDTH;
    const int c = i % WIDTH;
    if (col0 + c < columns) {
      dst.row(sample, set.position(first + r))[col0 + c] = DTypeTraits<T>::from_float(0.f);
    }
  }
}

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

template <typename T>
__device__ inline uint32_t pack_pair(T lo, T hi) {
  static_assert(sizeof(T) == 2, "pack_pair packs 16-bit values");
  const uint32_t lo_bits = *reinterpret_cast<const uint16_t*>(&lo);
  const uint32_t hi_bits = *reinterpret_cast<const uint16_t*>(&hi);
  return lo_bits | (hi_bits << 16);
}

// acc (16 × 8·NT) += A (16 × K) · B (K × 8·NT), A row-major at a[row·lda + k], B in shared
// memory with the given layout and pitch. K must be a multiple of 16. The caller's warp
// owns the 16 rows of A; all 32 lanes must call.
template <typename T, int K, int NT, BLayout LAYOUT>
__device__ inline void warp_gemm(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb) {
  static_assert(K % 16 == 0, "warp_gemm needs K in multiples of 16");
  const LaneCoords lane;
  auto b_at = [&](int k, int n) -> T {
    return LAYOUT == BLayout::kNK ? b[n * ldb + k] : b[k * ldb + n];
  };
  if constexpr (DTypeTraits<T>::kTensorCores) {
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      const T* a_lo = a + lane.g * lda + k0 + 2 * lane.t;
      const T* a_hi = a_lo + 8 * lda;
      // Pairs along k are adjacent in A (even offsets of a 16-byte aligned buffer with an
      // even pitch), so each register is one 32-bit shared-memory load.
      const uint32_t a_frag[4] = {*reinterpret_cast<const uint32_t*>(a_lo),
                                  *reinterpret_cast<const uint32_t*>(a_hi),
                                  *reinterpret_cast<const uint32_t*>(a_lo + 8),
                                  *reinterpret_cast<const uint32_t*>(a_hi + 8)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = 8 * j + lane.g;
        const int k = k0 + 2 * lane.t;
        uint32_t b_frag[2];
        if constexpr (LAYOUT == BLayout::kNK) {
          b_frag[0] = *reinterpret_cast<const uint32_t*>(b + n * ldb + k);
          b_frag[1] = *reinterpret_cast<const uint32_t*>(b + n * ldb + k + 8);
        } else {
          b_frag[0] = pack_pair(b_at(k, n), b_at(k + 1, n));
          b_frag[1] = pack_pair(b_at(k + 8, n), b_at(k + 9, n));
        }
        device::mma_m16n8k16<T>(acc[j], a_frag, b_frag);
      }
    }
  } else {
    // float32: plain FMAs into the same accumulator layout (no TF32: full precision).
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float a_lo = a[lane.g * lda + k];
      const float a_hi = a[(lane.g + 8) * lda + k];
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

// Stores a warp's accumulator strip (16 × 8·NT) into shared memory as T: the A operand of
// the next product (P for P·V, dS for dS·K).
template <typename T, int NT>
__device__ inline void store_strip(T* dst, int pitch, const float (&acc)[NT][4]) {
  const LaneCoords lane;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dst[lane.row(e) * pitch + lane.col(j, e)] = DTypeTraits<T>::from_float(acc[j][e]);
    }
  }
}

// Writes a warp's 16 × 8·NT accumulator strip, times `factor`, to the rows of `dst` at the
// slots slot0 + (strip rows) that are inside `set`, columns col0 + (strip cols) < columns.
template <typename T, int NT>
__device__ void store_rows(const Rows<T>& dst, const SampleRowSet& set, int sample, int slot0,
                           int col0, int columns, const float (&acc)[NT][4], float factor) {
  const LaneCoords lane;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = slot0 + lane.g + 8 * i;
    if (slot >= set.size) continue;
    T* const row = dst.row(sample, set.position(slot));
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 2 * i; e < 2 * i + 2; ++e) {
        const int col = col0 + lane.col(j, e);
        if (col < columns) row[col] = DTypeTraits<T>::from_float(acc[j][e] * factor);
      }
    }
  }
}

// Sum / max over the four lanes (t = 0..3) that share a row.
__device__ inline float row_sum(float x) {
  x += device::shfl_xor(x, 1);
  x += device::shfl_xor(x, 2);
  return x;
}

__device__ inline float row_max(float x) {
  x = fmaxf(x, device::shfl_xor(x, 1));
  x = fmaxf(x, device::shfl_xor(x, 2));
  return x;
}

// Dispatch a padded head size (16, 32 or 64) to a template parameter.
template <typename F>
void dispatch_qk_dim(int qk_dim, F&& f) {
  if (qk_dim <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (qk_dim <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(ScalarKind dtype, F&& f) {
  switch (dtype) {
    case ScalarKind::kFloat32: f(TypeTag<float>{}); break;
    case ScalarKind::kFloat16: f(TypeTag<__half>{}); break;
    case ScalarKind::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
  }
}

// Raises the dynamic shared-memory limit of a kernel (needed above 48 KiB) and launches.
template <typename Kernel, typename... Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream,
                             Args... args) {
  const cudaError_t status = device::ensure_dynamic_shared_memory(kernel, smem_bytes);
  if (status != cudaSuccess) return status;
  return device::launch(kernel, grid, kThreads, smem_bytes, stream, args...);
}

}  // namespace masked_attention
}  // namespace dsa_ops
