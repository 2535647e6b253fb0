// Forward of masked attention: out = softmax(scale·Q Kᵀ) V over each sample's query and key
// sets, FlashAttention-2 style (online softmax, no L×L buffer).
//
// Grid: x = tiles of 64 slots of the query partition (all L slots, so the tiles past the
// query count write the zero rows and +inf log-sum-exps of the non-query positions and
// no separate zero-fill pass is needed), y = sample, z = branch × V part. A block gathers
// its query rows once, then streams key tiles (64 keys, or 128 where two such blocks fit an
// SM: kWideKeyTiles) of the gathered keys, K and V double buffered: the cp.async copies of
// tile i + 1 are issued before tile i is computed, so they overlap its math, and their key
// positions were staged in shared memory during tile i - 1. Per tile and warp (16 query
// rows): S = Q·Kᵀ (tensor cores with ldmatrix operands for 16-bit dtypes), running max /
// sum in float32 registers in natural units, the scale folded into the row max and the
// exponent (exp_of_scaled), P rounded to the dtype in registers (no shared-memory round
// trip) and P·V accumulated in float32 over the block's V width.
//
// Much of the order inside a tile is for issue order: the simulated H100 issues each warp's
// PTX in order (docs/simulated-gpu.md), so every stage is a loop of independent operations
// (the max in four partial chains a row, the sums in two), the rescale's exp2 is issued
// before the tile's exponentials and used after them, and a fragment pair's ldmatrix stays
// just before its two MMAs. ptxas reorders SASS on hardware; the order costs nothing there.
//
// V width: a block holds VW columns of V, chosen by Dv from 64, 128, 256 for 16-bit dtypes,
// so for Dv ≤ 256 Q·Kᵀ and the softmax are computed once; Dv in (256, 512] takes two parts
// of 256 (grid z). float32 keeps VW = 64 (a part per 64 columns): at VW = 128 its
// double-buffered tiles take 126 KiB, which sm_80/90 hold (and ptxas fits it in 254
// registers without spills) but sm_86/89's 99 KiB per block do not; every width here fits
// those (static_assert below).
//
// Included by one instantiation file per dtype (forward_float32.cu, ...), which ninja builds
// in parallel; forward.cu dispatches the dtype.
#pragma once

#include "device/kernel.cuh"
#include "masked_attention/launch.cuh"

namespace dsa_ops {
namespace masked_attention {

using namespace device;  // the shared tile layer, which this kernel is written in

// The forward for inputs of dtype T (every head size); instantiated per dtype.
template <typename T>
cudaError_t launch_forward_for(const ForwardLaunch& launch, cudaStream_t stream);

namespace {

// The widest V part of one block.
template <typename T>
constexpr int kMaxVWidth = DTypeTraits<T>::kTensorCores ? 256 : 64;

// Keys per tile: 64, or 128 for 16-bit dtypes with VW ≤ 128 and Dqk ≤ 32 where two such
// blocks fit one SM's shared memory (85–96 KiB each: sm_90's 228 KiB; not sm_80's 164 or
// sm_86/89's 100), so that occupancy stays two blocks an SM, as the registers allow
// either way. At 128 the per-tile costs (the barrier, the row-max shuffles and the
// rescale, the gathers' setup) are paid per 128 keys: 0.76 → 0.69× FlashAttention-2's time
// for the same query-key pairs on the simulated H100 (docs/simulated-gpu.md). VW = 256,
// Dqk = 64 and float32 keep 64: their double-buffered 128-key tiles would not fit a block.
template <typename T, int D, int VW>
constexpr bool kWideKeyTiles = DTypeTraits<T>::kTensorCores && VW <= 128 && D <= 32;

// Query tile; two K and two V tiles (double buffering); float32's per-warp P scratch; two
// lists of staged key positions (int32, after the tiles).
template <typename T, int D, int VW, int KC>
struct ForwardSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(VW);
  static constexpr int kKTile = KC * kQkPitch;
  static constexpr int kVTile = KC * kVPitch;
  // P·V runs in two halves of the key tile, so float32's P strip needs a 16 × KC / 2
  // scratch per warp.
  static constexpr int kPvKeyTiles = KC / 16;
  static constexpr int kPScratch = acc_a_scratch_elements<T, kPvKeyTiles>();
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockRows * kQkPitch;
  static constexpr int kV = kK + 2 * kKTile;
  static constexpr int kP = kV + 2 * kVTile;
  static constexpr int kElements = kP + kWarps * kPScratch;
  static constexpr int kPositionsByte = (kElements * static_cast<int>(sizeof(T)) + 15) / 16 * 16;
  static constexpr int kBytes = kPositionsByte + 2 * KC * static_cast<int>(sizeof(int));
  static_assert(rows_16_byte_aligned<T>(kQkPitch) && rows_16_byte_aligned<T>(kVPitch),
                "cp.async and ldmatrix need 16-byte aligned tile rows");
  static_assert(kBytes <= 99 * 1024, "every instantiation fits sm_86/89's 99 KiB per block");
};

template <typename T, int D, int VW, int KC>
__global__ void __launch_bounds__(kThreads, 1)
forward_kernel(const __grid_constant__ ForwardLaunch launch) {
  using Smem = ForwardSmem<T, D, VW, KC>;
  constexpr int kPvKeyTiles = Smem::kPvKeyTiles;
  static_assert(KC <= kThreads, "a thread stages at most one key position");
  constexpr int kScoreTiles = KC / 8;
  constexpr int kOutTiles = VW / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const q_s = smem + Smem::kQ;

  const int v_parts = (launch.v_dim + VW - 1) / VW;
  const int branch_id = blockIdx.z / v_parts;
  const int col0 = (blockIdx.z % v_parts) * VW;
  const ForwardBranch& branch = branch_id == 0 ? launch.branch[0] : launch.branch[1];
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<const T> q = typed<const T>(branch.q), k = typed<const T>(branch.k),
                      v = typed<const T>(branch.v);
  const Rows<T> out = typed<T>(branch.out);
  float* const lse = branch.lse + static_cast<int64_t>(sample) * length;

  // Slots of this tile outside the query set: zero output, +inf log-sum-exp.
  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, queries.size);
  if (outside_begin < tile_end) {
    zero_rows<T, VW>(out, queries, sample, outside_begin, tile_end, col0, launch.v_dim);
    if (col0 == 0) {
      for (int s = outside_begin + threadIdx.x; s < tile_end; s += kThreads) {
        lse[queries.position(s)] = INFINITY;
      }
    }
  }
  if (slot0 >= queries.size) return;
  const int query_rows = min(kBlockRows, queries.size - slot0);
  const int key_tiles = (keys.size + KC - 1) / KC;

  // Key positions, staged one tile ahead in shared memory: while tile i is computed, threads
  // 0..KC-1 hold the positions of tile i + 2 in a register (loaded before the math, stored
  // after it), and the gathers of tile i + 1, issued at the top of iteration i, read their
  // positions from shared memory instead of waiting on global index loads.
  int* const staged_positions = reinterpret_cast<int*>(smem_raw + Smem::kPositionsByte);
  auto positions_of = [&](int tile) { return staged_positions + (tile % 2) * KC; };
  const bool stages_positions = threadIdx.x < KC;

  // Issues the gathers of key tile `tile` into buffer tile % 2, rows at `rows`.
  auto load_key_tile = [&](int tile, const auto& rows) {
    gather_rows_async<T, KC, D>(smem + Smem::kK + (tile % 2) * Smem::kKTile, Smem::kQkPitch,
                                k, sample, rows, 0, launch.qk_dim);
    gather_rows_async<T, KC, VW>(smem + Smem::kV + (tile % 2) * Smem::kVTile, Smem::kVPitch,
                                 v, sample, rows, col0, launch.v_dim);
  };
  load_tile_async<T, kBlockRows, D>(q_s, Smem::kQkPitch, q, queries, sample, slot0, query_rows, 0,
                                    launch.qk_dim);
  if (key_tiles > 0) {
    load_key_tile(0, TileRows{keys, 0, min(KC, keys.size)});
  }
  if (key_tiles > 1 && stages_positions) {
    positions_of(1)[threadIdx.x] = position_to_stage(keys, KC, threadIdx.x);
  }
  device::cp_async_commit();

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const float scale = launch.scale;
  const T* const q_warp = q_s + warp * kWarpRows * Smem::kQkPitch;
  T* const p_scratch = smem + Smem::kP + warp * Smem::kPScratch;

  OnlineSoftmaxRows rows;  // rows g and g + 8 of the warp's strip
  float acc[kOutTiles][4];
  zero_fill(acc);

  for (int tile = 0; tile < key_tiles; ++tile) {
    // The only pending copies are this tile's (and, first, the query tile's). After the
    // barrier every thread's have landed, every warp is done with tile - 1, whose buffers
    // the next tile's copies overwrite, and the positions staged for tile + 1 are visible.
    device::cp_async_wait<0>();
    device::block_barrier();
    if (tile + 1 < key_tiles) {
      load_key_tile(tile + 1, StagedRows{positions_of(tile + 1)});
      device::cp_async_commit();
    }
    const bool stage_next = tile + 2 < key_tiles && stages_positions;
    const int next_position =
        stage_next ? position_to_stage(keys, (tile + 2) * KC, threadIdx.x) : -1;
    const T* const k_s = smem + Smem::kK + (tile % 2) * Smem::kKTile;
    const T* const v_s = smem + Smem::kV + (tile % 2) * Smem::kVTile;
    const int key_cols = min(KC, keys.size - tile * KC);

    float s[kScoreTiles][4];
    zero_fill(s);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(s, q_warp, Smem::kQkPitch, k_s, Smem::kQkPitch);

    // The softmax step on the raw scores s (the scale goes into the max and the exponent's
    // fma). Each stage is a loop of its own, so a warp's instructions come in independent
    // runs (every score's max, then every exponential, then the sums) rather than one chain
    // through each score. Only a sample's last key tile can be partial: full tiles skip the
    // column tests, and its masked columns are left out of the max and get P = 0.
    const bool partial_tile = key_cols < KC;
    if (partial_tile) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (lane.col(j, e) >= key_cols) s[j][e] = masked_raw_score(scale);
        }
      }
    }
    float tile_max[2];
    scaled_row_max(s, scale, tile_max);
    float rescale[2], shift[2];
    rows.advance_max(tile_max, shift, rescale);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp_of_scaled<T>(s[j][e], scale, shift[e / 2]);
    }
    if (partial_tile) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (lane.col(j, e) >= key_cols) s[j][e] = 0.f;
        }
      }
    }
    float part_sum[2][2] = {};  // [row][n-tile parity]: two short chains a row
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) part_sum[e / 2][j % 2] += s[j][e];
    }
    const float tile_sum[2] = {part_sum[0][0] + part_sum[0][1], part_sum[1][0] + part_sum[1][1]};
    rows.add_tile_sums(rescale, tile_sum);
    // The accumulators keep their scale unless a row's max rose somewhere in the warp
    // (rescale is exactly 1 otherwise): a skipped multiply per accumulator and tile, which
    // FlashAttention-4 takes further with a threshold.
    if (device::any(rescale[0] != 1.f || rescale[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < kOutTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] *= rescale[e / 2];
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float(&p)[kPvKeyTiles][4] =
          *reinterpret_cast<const float(*)[kPvKeyTiles][4]>(&s[half * kPvKeyTiles]);
      warp_gemm_acc_a<T, kPvKeyTiles, kOutTiles, BLayout::kKN>(
          acc, p, v_s + half * (KC / 2) * Smem::kVPitch, Smem::kVPitch, p_scratch);
    }
    // The list of tile + 2 replaces that of tile, which every thread read before this
    // iteration's barrier.
    if (stage_next) positions_of(tile + 2)[threadIdx.x] = next_position;
  }
  device::cp_async_wait<0>();  // no key tiles: the query tile's copies, never used

  // Normalise, then scatter each row in 16-byte stores through the warp's rows of the V
  // buffer that tile key_tiles would have used: every warp finished reading it before the
  // last tile's barrier, and no copies are pending into it.
  float inverse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    rows.sum[i] = row_sum(rows.sum[i]);
    inverse[i] = rows.sum[i] > 0.f ? 1.f / rows.sum[i] : 0.f;  // no keys: zero row
  }
#pragma unroll
  for (int j = 0; j < kOutTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] *= inverse[e / 2];
  }
  T* const out_strip = smem + Smem::kV + (key_tiles % 2) * Smem::kVTile +
                       warp * kWarpRows * Smem::kVPitch;
  const int warp_slot0 = slot0 + warp * kWarpRows;
  store_rows<T>(out, queries, sample, warp_slot0, col0, launch.v_dim, acc, 1.f, out_strip,
                Smem::kVPitch);
  if (col0 == 0 && lane.t == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int slot = warp_slot0 + lane.g + 8 * i;
      const float total = rows.sum[i];
      if (slot < queries.size) {
        lse[queries.position(slot)] = total > 0.f ? rows.max[i] + logf(total) : INFINITY;
      }
    }
  }
}

// Calls f(integral_constant<int, VW>{}) for the V width of T's blocks at this Dv: the
// smallest of 64, 128, 256 (up to kMaxVWidth<T>) that holds an equal share of Dv over
// ceil(Dv / kMaxVWidth<T>) parts; the kernel's part count ceil(Dv / VW) is that count.
template <typename T, typename F>
void dispatch_v_width(int v_dim, F&& f) {
  constexpr int kMax = kMaxVWidth<T>;
  const int parts = (v_dim + kMax - 1) / kMax;
  const int share = (v_dim + parts - 1) / parts;
  if constexpr (kMax >= 256) {
    if (share > 128) return f(std::integral_constant<int, 256>{});
  }
  if constexpr (kMax >= 128) {
    if (share > 64) return f(std::integral_constant<int, 128>{});
  }
  f(std::integral_constant<int, 64>{});
}

}  // namespace

template <typename T>
cudaError_t launch_forward_for(const ForwardLaunch& launch, cudaStream_t stream) {
  cudaError_t status = cudaSuccess;
  dispatch_qk_dim(launch.qk_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_v_width<T>(launch.v_dim, [&](auto width) {
      constexpr int VW = decltype(width)::value;
      const int v_parts = (launch.v_dim + VW - 1) / VW;
      const dim3 grid((launch.length + kBlockRows - 1) / kBlockRows, launch.batch,
                      v_parts * launch.branches);
      auto run = [&](auto key_cols) {
        constexpr int KC = decltype(key_cols)::value;
        status = launch_with_smem(forward_kernel<T, D, VW, KC>, grid,
                                  ForwardSmem<T, D, VW, KC>::kBytes, stream, launch);
      };
      if constexpr (kWideKeyTiles<T, D, VW>) {
        // A block also takes 1 KiB of the SM's shared memory for the system.
        constexpr int kWideBlockBytes = ForwardSmem<T, D, VW, 128>::kBytes + 1024;
        if (2 * kWideBlockBytes <= launch.shared_memory_per_sm) {
          return run(std::integral_constant<int, 128>{});
        }
      }
      run(std::integral_constant<int, kBlockCols>{});
    });
  });
  return status;
}

// Each dtype's instantiation is compiled once, in forward_<dtype>.cu: the other files that
// include this header (forward.cu) only call it.
extern template cudaError_t launch_forward_for<float>(const ForwardLaunch&, cudaStream_t);
extern template cudaError_t launch_forward_for<__half>(const ForwardLaunch&, cudaStream_t);
extern template cudaError_t launch_forward_for<__nv_bfloat16>(const ForwardLaunch&, cudaStream_t);

}  // namespace masked_attention
}  // namespace dsa_ops
