// Forward of masked attention: out = softmax(scale·Q Kᵀ) V over each sample's query and key
// sets, FlashAttention-2 style (online softmax, no L×L buffer).
//
// Grid: x = tiles of 64 slots of the query partition (all L slots, so the tiles past the
// query count write the zero rows and +inf log-sum-exps of the non-query positions and
// no separate zero-fill pass is needed), y = sample, z = branch × V part. A block gathers
// its query rows once, then streams 64-key tiles of the gathered keys, K and V double
// buffered: the cp.async copies of tile i + 1 are issued before tile i is computed, so they
// overlap its math. Per tile and warp (16 query rows): S = Q·Kᵀ (tensor cores with
// ldmatrix operands for 16-bit dtypes), running max / sum in float32 registers in natural
// units (exp2 of differences, exp_difference), P rounded to the dtype in registers (no
// shared-memory round trip) and P·V accumulated in float32 over the block's V width.
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

// P·V runs in two 32-key halves, so float32's P strip needs a 16 × 32 scratch per warp.
constexpr int kPvKeyTiles = kBlockCols / 16;

// Query tile; two K and two V tiles (double buffering); float32's per-warp P scratch.
template <typename T, int D, int VW>
struct ForwardSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(VW);
  static constexpr int kKTile = kBlockCols * kQkPitch;
  static constexpr int kVTile = kBlockCols * kVPitch;
  static constexpr int kPScratch = acc_a_scratch_elements<T, kPvKeyTiles>();
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockRows * kQkPitch;
  static constexpr int kV = kK + 2 * kKTile;
  static constexpr int kP = kV + 2 * kVTile;
  static constexpr int kElements = kP + kWarps * kPScratch;
  static constexpr int kBytes = kElements * static_cast<int>(sizeof(T));
  static_assert(rows_16_byte_aligned<T>(kQkPitch) && rows_16_byte_aligned<T>(kVPitch),
                "cp.async and ldmatrix need 16-byte aligned tile rows");
  static_assert(kBytes <= 99 * 1024, "every instantiation fits sm_86/89's 99 KiB per block");
};

template <typename T, int D, int VW>
__global__ void __launch_bounds__(kThreads, 1)
forward_kernel(const __grid_constant__ ForwardLaunch launch) {
  using Smem = ForwardSmem<T, D, VW>;
  constexpr int kScoreTiles = kBlockCols / 8;
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
  const int key_tiles = (keys.size + kBlockCols - 1) / kBlockCols;

  // Issues the gathers of key tile `tile` into buffer tile % 2.
  auto load_key_tile = [&](int tile) {
    const int key0 = tile * kBlockCols;
    const int rows = min(kBlockCols, keys.size - key0);
    load_tile_async<T, kBlockCols, D>(smem + Smem::kK + (tile % 2) * Smem::kKTile,
                                      Smem::kQkPitch, k, keys, sample, key0, rows, 0,
                                      launch.qk_dim);
    load_tile_async<T, kBlockCols, VW>(smem + Smem::kV + (tile % 2) * Smem::kVTile,
                                       Smem::kVPitch, v, keys, sample, key0, rows, col0,
                                       launch.v_dim);
  };
  load_tile_async<T, kBlockRows, D>(q_s, Smem::kQkPitch, q, queries, sample, slot0, query_rows, 0,
                                    launch.qk_dim);
  if (key_tiles > 0) load_key_tile(0);
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
    // barrier every thread's have landed and every warp is done with tile - 1, whose
    // buffers the next tile's copies overwrite.
    device::cp_async_wait<0>();
    device::block_barrier();
    if (tile + 1 < key_tiles) {
      load_key_tile(tile + 1);
      device::cp_async_commit();
    }
    const T* const k_s = smem + Smem::kK + (tile % 2) * Smem::kKTile;
    const T* const v_s = smem + Smem::kV + (tile % 2) * Smem::kVTile;
    const int key_cols = min(kBlockCols, keys.size - tile * kBlockCols);

    float s[kScoreTiles][4];
    zero_fill(s);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(s, q_warp, Smem::kQkPitch, k_s, Smem::kQkPitch);

    // Only a sample's last key tile can be partial: full tiles skip the column test.
    if (key_cols < kBlockCols) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (lane.col(j, e) >= key_cols) s[j][e] = -INFINITY;
        }
      }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] *= scale;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
      }
    }
    float rescale[2], shift[2];
    rows.advance(tile_max, shift, rescale);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp_of_shifted<T>(s[j][e], shift[e / 2]);
        rows.sum[e / 2] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] *= rescale[e / 2];
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float(&p)[kPvKeyTiles][4] =
          *reinterpret_cast<const float(*)[kPvKeyTiles][4]>(&s[half * kPvKeyTiles]);
      warp_gemm_acc_a<T, kPvKeyTiles, kOutTiles, BLayout::kKN>(
          acc, p, v_s + half * (kBlockCols / 2) * Smem::kVPitch, Smem::kVPitch, p_scratch);
    }
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
      status = launch_with_smem(forward_kernel<T, D, VW>, grid, ForwardSmem<T, D, VW>::kBytes,
                                stream, launch);
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
