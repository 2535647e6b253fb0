// The tile layer every attention-like kernel is built from: the block's warp layout, dtype
// traits, rows addressed through partition index lists (SampleRowSet), tile gathers into
// shared memory (cp.async in 16-byte chunks), chunked row stores, and the double-buffered
// pipeline step. Kernels of every op (masked_attention/, attention_kl/) include this; it
// includes no op's headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/kernel_args.h"
#include "device/primitives.cuh"

namespace dsa_ops {
namespace device {

// ----------------------------------------------------------------------------- tiles
// Four warps; each owns a strip of 16 rows of a 64-row tile (FlashAttention-2 layout:
// no cross-warp reductions inside the softmax).
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;
constexpr int kBlockRows = kWarps * kWarpRows;  // query rows (forward, dQ) or key rows (dK, dV)
constexpr int kBlockCols = 64;                  // key columns (forward, dQ) or query columns

// The head sizes the tiles hold: Dqk (kMinQkDim..kMaxQkDim) zero-padded to 16, 32 or 64.
__host__ __device__ constexpr int padded_qk_dim(int qk_dim) {
  return qk_dim <= 16 ? 16 : qk_dim <= 32 ? 32 : 64;
}

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
  // (lo, hi) rounded and packed into one register, lo in the low half: one
  // cvt.rn.f16x2.f32 where two conversions and a move would be three instructions.
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static uint32_t pack(float lo, float hi) {  // as __half's: cvt.rn.bf16x2.f32
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
};

// Shared-memory row pitch: 16 bytes of padding per row, so the eight rows a warp reads in
// one fragment load start in different banks. For a width in whole 16-byte chunks every
// row stays 16-byte aligned, as ldmatrix and cp.async need (rows_16_byte_aligned).
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

// Tiles are gathered in 16-byte chunks (8 halves or 4 floats): the unit of cp.async and of
// ldmatrix rows.
template <typename T>
constexpr int kChunkElements = 16 / static_cast<int>(sizeof(T));

// A tile pitch whose rows all start 16-byte aligned (cp.async destinations, uint4 stores,
// ldmatrix rows): padded_pitch of a width in whole chunks.
template <typename T>
constexpr bool rows_16_byte_aligned(int pitch) {
  return (pitch * static_cast<int>(sizeof(T))) % 16 == 0;
}

// The slow path of a gathered chunk: `count` (< chunk) leading elements of a row end, or a
// chunk whose global address is not 16-byte aligned (rows of odd pitch, odd channel
// offsets). Kept out of line so the kernels' tile loops hold only vector copies.
template <typename T>
__device__ __noinline__ void copy_chunk_scalar(T* dst, const T* src, int count) {
#pragma unroll 1
  for (int c = 0; c < kChunkElements<T>; ++c) {
    dst[c] = c < count ? src[c] : DTypeTraits<T>::from_float(0.f);
  }
}

// The row positions of a tile gather, by tile row r (negative: a zero row).
// TileRows looks them up in a row set's partition (global memory); StagedRows reads a list
// a kernel staged in shared memory ahead of time (position_to_stage), so that the gather's
// copies need not wait on global index loads.
struct TileRows {
  const SampleRowSet& set;
  int slot0;
  int valid_rows;
  __device__ int operator()(int r) const { return r < valid_rows ? set.position(slot0 + r) : -1; }
};

struct StagedRows {
  const int* positions;  // shared memory, one per tile row
  __device__ int operator()(int r) const { return positions[r]; }
};

// Issues the gather of the rows of `src` at positions `rows` (RowPositions: TileRows or
// StagedRows) of sample `sample`, columns col0..col0+WIDTH, into dst[ROWS][pitch] (rows
// 16-byte aligned); zero rows and columns past `columns` become zero, which makes padded
// dot products exact. Aligned chunks inside `columns` go by cp.async (they land at the
// caller's cp_async_commit + cp_async_wait + block_barrier), zero chunks by a 16-byte
// shared store, the rest through copy_chunk_scalar. Does not commit: the caller groups
// tiles as it double-buffers. THREADS: the block's threads, which share the chunks.
//
// Thread t keeps one chunk column (t % kRowChunks) and takes every kRowStep-th row from
// t / kRowChunks: the column's bounds are decided once, and the thread's row positions are
// all read before the first copy, as independent loads whose latencies overlap. (The form
// that looked up a position per chunk, each copy waiting on its own index load, was a
// third of the forward's instructions under the simulator: docs/simulated-gpu.md.) What
// does not depend on the row is decided once too: the column's address in the sample, and
// whether every row's chunk is 16-byte aligned (an aligned column and a row stride of whole
// 16 bytes), so a row costs a multiply-add and its copy.
template <typename T, int ROWS, int WIDTH, int THREADS = kThreads, typename RowPositions>
__device__ inline void gather_rows_async(T* dst, int pitch, const Rows<const T>& src, int sample,
                                         const RowPositions& rows, int col0, int columns) {
  constexpr int kChunk = kChunkElements<T>;
  constexpr int kRowChunks = WIDTH / kChunk;
  static_assert(WIDTH % kChunk == 0, "tile widths are whole 16-byte chunks");
  static_assert(THREADS % kRowChunks == 0, "every thread keeps one chunk column");
  constexpr int kRowStep = THREADS / kRowChunks;
  constexpr int kRowsPerThread = (ROWS + kRowStep - 1) / kRowStep;
  if (threadIdx.x >= THREADS) return;  // a wider block: its other threads have no share
  const int c = (threadIdx.x % kRowChunks) * kChunk;
  const int first_row = threadIdx.x / kRowChunks;
  const int col = col0 + c;
  const bool in_columns = col < columns;
  const bool whole_chunk = col + kChunk <= columns;
  int position[kRowsPerThread];  // -1: a zero chunk
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int r = first_row + j * kRowStep;
    position[j] = in_columns && (ROWS % kRowStep == 0 || r < ROWS) ? rows(r) : -1;
  }
  const T* const column = src.row(sample, 0) + col;
  const bool aligned_rows = whole_chunk && reinterpret_cast<uintptr_t>(column) % 16 == 0 &&
                            (src.row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  T* const first_chunk = dst + first_row * pitch + c;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    if (ROWS % kRowStep != 0 && first_row + j * kRowStep >= ROWS) break;
    T* const chunk = first_chunk + j * kRowStep * pitch;
    if (position[j] < 0) {
      *reinterpret_cast<uint4*>(chunk) = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    const T* const from = column + position[j] * src.row_stride;
    if (aligned_rows || (whole_chunk && reinterpret_cast<uintptr_t>(from) % 16 == 0)) {
      device::cp_async_16(chunk, from);
    } else {
      copy_chunk_scalar(chunk, from, min(kChunk, columns - col));
    }
  }
}

// The gather of `valid_rows` rows at slots slot0.. of `set` (positions looked up here).
template <typename T, int ROWS, int WIDTH, int THREADS = kThreads>
__device__ inline void load_tile_async(T* dst, int pitch, const Rows<const T>& src,
                                       const SampleRowSet& set, int sample, int slot0,
                                       int valid_rows, int col0, int columns) {
  gather_rows_async<T, ROWS, WIDTH, THREADS>(dst, pitch, src, sample,
                                             TileRows{set, slot0, valid_rows}, col0, columns);
}

// The position a thread stages for row `row` (< ROWS) of the tile at slot0 of `set`, -1 past
// the set: threads 0..ROWS-1 each load one (issue early), then store it into the staged list
// after work that hides the load's latency (a block barrier before a StagedRows gather).
__device__ inline int position_to_stage(const SampleRowSet& set, int slot0, int row) {
  return TileRows{set, slot0, set.size - slot0}(row);
}

// The synchronous form: the tile is in shared memory for the calling thread on return
// (a block_barrier before other threads read it stays the caller's).
template <typename T, int ROWS, int WIDTH>
__device__ void load_tile(T* dst, int pitch, const Rows<const T>& src, const SampleRowSet& set,
                          int sample, int slot0, int valid_rows, int col0, int columns) {
  load_tile_async<T, ROWS, WIDTH>(dst, pitch, src, set, sample, slot0, valid_rows, col0, columns);
  device::cp_async_commit();
  device::cp_async_wait<0>();
}

// The slow path of a scattered chunk store: `count` (≤ chunk) leading elements of src, or
// zeros when src is null; for a partial chunk at the end of `columns` or a chunk whose
// global address is not 16-byte aligned. Out of line, as copy_chunk_scalar.
template <typename T>
__device__ __noinline__ void store_chunk_scalar(T* dst, const T* src, int count) {
#pragma unroll 1
  for (int c = 0; c < count; ++c) {
    dst[c] = src != nullptr ? src[c] : DTypeTraits<T>::from_float(0.f);
  }
}

// Writes `rows` rows to the rows of `dst` at slots slot0.. of `set`, columns
// col0..col0+WIDTH clipped to `columns`: row r from src + r·pitch (shared memory, rows
// 16-byte aligned), or zeros when src is null. Thread `thread` of `threads` takes every
// threads-th chunk, one position lookup per chunk: whole aligned chunks as 16-byte stores,
// the rest through store_chunk_scalar.
template <typename T, int WIDTH>
__device__ void store_rows_chunked(const Rows<T>& dst, const SampleRowSet& set, int sample,
                                   int slot0, int rows, int col0, int columns, const T* src,
                                   int pitch, int thread, int threads) {
  constexpr int kChunk = kChunkElements<T>;
  constexpr int kRowChunks = WIDTH / kChunk;
  static_assert(WIDTH % kChunk == 0, "row widths are whole 16-byte chunks");
  // Not unrolled: the epilogue is once per block, and unrolling it pushed a kernel near its
  // register bound into spills (the former dQ kernel at Dqk 64, Dv ≤ 64: past 128).
#pragma unroll 1
  for (int i = thread; i < rows * kRowChunks; i += threads) {
    const int r = i / kRowChunks;
    const int c = (i % kRowChunks) * kChunk;
    const int col = col0 + c;
    if (col >= columns) continue;
    T* const to = dst.row(sample, set.position(slot0 + r)) + col;
    const T* const from = src != nullptr ? src + r * pitch + c : nullptr;
    if (col + kChunk <= columns && reinterpret_cast<uintptr_t>(to) % 16 == 0) {
      *reinterpret_cast<uint4*>(to) =
          from != nullptr ? *reinterpret_cast<const uint4*>(from) : make_uint4(0u, 0u, 0u, 0u);
    } else {
      store_chunk_scalar(to, from, min(kChunk, columns - col));
    }
  }
}

// Writes zeros into the rows of `dst` (columns col0..col0+WIDTH, clipped to `columns`) whose
// slots in [first, last) are outside the set: the part of a tile past the set's size.
template <typename T, int WIDTH, int THREADS = kThreads>
__device__ void zero_rows(const Rows<T>& dst, const SampleRowSet& set, int sample, int first,
                          int last, int col0, int columns) {
  store_rows_chunked<T, WIDTH>(dst, set, sample, first, last - first, col0, columns, nullptr, 0,
                               threadIdx.x, THREADS);
}


// One step of a double-buffered cp.async pipeline: issues the next stage's copies when
// there is one (`issue_next` commits them as one group) and waits until at most those are
// in flight, so this thread's copies of the current stage have landed. The caller's block
// barrier then makes every thread's copies visible.
// `meanwhile` runs between the issue and the wait: work that hides the copies' latency and
// needs nothing of the stage that is landing.
template <typename IssueNext, typename Meanwhile>
__device__ inline void pipeline_step(bool has_next, IssueNext&& issue_next, Meanwhile&& meanwhile) {
  if (has_next) issue_next();
  meanwhile();
  if (has_next) {
    device::cp_async_wait<1>();
  } else {
    device::cp_async_wait<0>();
  }
}

template <typename IssueNext>
__device__ inline void pipeline_step(bool has_next, IssueNext&& issue_next) {
  pipeline_step(has_next, issue_next, [] {});
}

}  // namespace device
}  // namespace dsa_ops
