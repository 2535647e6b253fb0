// Backward of masked attention, FlashAttention-2 form, deterministic (no atomics): every
// gradient row is owned by exactly one block, which sums its contributions in a fixed order.
//
// With P = exp(scale·Q Kᵀ − lse) recomputed from the saved log-sum-exp, dP = dO Vᵀ and
// Δᵢ = rowsum(dO∘O)ᵢ:  dS = P∘(dP − Δ),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dV = Pᵀ dO.
//
// Two kernels (three launches when the key side splits V: 16-bit Dv > 256), over tiles of
// 64 slots of a partition (tiles past the set size write the zero gradient rows of the
// positions outside the set, so there is no zero-fill pass); gathers by cp.async, operands by ldmatrix, P and dS kept
// in registers between their two products (warp_gemm_acc_a):
//   dq_kernel   a block per query tile. Q and dO stay resident (dO over the whole Dv for
//               16-bit dtypes where the device's shared memory holds it, else streamed
//               with V); the block first computes Δ of its rows (reading O once) and
//               writes it to the float32 workspace for the key side, then streams
//               (key tile, V column chunk) stages, double-buffered: dP is summed over all of
//               Dv once per tile pair, and dS = P∘(dP − Δ) feeds dQ += dS·K.
//   key_kernel  a block per (key tile, V column chunk): K and its V columns resident (all of
//               Dv up to 256 for 16-bit dtypes, so Dv = 512 is two halves; 64 for float32),
//               streams query tiles (Q, dO columns, lse, Δ; double-buffered). The
//               transposed problem (Sᵀ = K Qᵀ) keeps the forward's warp layout: Pᵀ feeds
//               dV += Pᵀ·dO and, with dPᵀ = V·dOᵀ, dSᵀ feeds dK += dSᵀ·Q. A warp's dV strip
//               (16 × its columns, in registers) holds 128 columns, so a 256-column block
//               runs two groups of four warps that split the columns and share Pᵀ and dPᵀ
//               (KeyTiling): each tile's exponentials are computed once per block.
//   dk_reduce_kernel  only when V is split: each chunk's block wrote a partial dK from
//               Pᵀ∘(dPᵀ_c − [c = 0]·Δ) into the workspace; this sums the chunks in order.
// Why not one kernel: dQ sums over keys and dK, dV over queries; without atomics each needs
// its own owner of the rows, and dP is recomputed once on each side (FlashAttention-2).
// dq_kernel runs first on the stream: the key side reads its Δ.
//
// Included by one instantiation file per dtype (backward_float32.cu, ...), which ninja builds
// in parallel; backward.cu dispatches the dtype.
#pragma once

#include "device/kernel.cuh"
#include "masked_attention/launch.cuh"

namespace dsa_ops {
namespace masked_attention {

using namespace device;  // the shared tile layer, which these kernels are written in

// The backward for inputs of dtype T (every head size); instantiated per dtype. `launch`
// carries the device's shared_memory_limit (launch_backward sets it).
template <typename T>
cudaError_t launch_backward_for(const BackwardLaunch& launch, cudaStream_t stream);

namespace {

// Columns of V (and dO) per dQ-side stage: 64 when Dv fits in it (no wasted columns), else
// 128 for 16-bit dtypes (the dP strip sums over stages, so the width only sets the stage
// size) and 64 for float32 (no tensor cores, so speed is not the point; sm_80's 163 KiB).
template <typename T>
__host__ __device__ constexpr int dq_v_chunk(int v_dim) {
  return v_dim <= 64 || !DTypeTraits<T>::kTensorCores ? 64 : 128;
}

// Columns of V (and dO) a key-side block owns: its warps hold their dV rows over all of them
// in registers. 16-bit: the smallest of 64, 128, 256 that holds Dv, so Dv ≤ 256 is one block
// per key tile and Dv = 512 two halves; float32: 64.
template <typename T>
__host__ __device__ constexpr int key_v_width(int v_dim) {
  if (v_dim <= 64 || !DTypeTraits<T>::kTensorCores) return 64;
  return v_dim <= 128 ? 128 : 256;
}

template <typename T>
__host__ __device__ constexpr int key_v_chunks(int v_dim) {
  return (v_dim + key_v_width<T>(v_dim) - 1) / key_v_width<T>(v_dim);
}

// The two widths as template arguments (float32 instantiates only 64).
template <typename T, typename F>
void dispatch_dq_v_chunk(int v_dim, F&& f) {
  if constexpr (DTypeTraits<T>::kTensorCores) {
    if (dq_v_chunk<T>(v_dim) == 128) return f(std::integral_constant<int, 128>{});
  }
  f(std::integral_constant<int, 64>{});
}

template <typename T, typename F>
void dispatch_key_v_width(int v_dim, F&& f) {
  if constexpr (DTypeTraits<T>::kTensorCores) {
    if (key_v_width<T>(v_dim) == 256) return f(std::integral_constant<int, 256>{});
    if (key_v_width<T>(v_dim) == 128) return f(std::integral_constant<int, 128>{});
  }
  f(std::integral_constant<int, 64>{});
}

__device__ inline const BackwardBranch& select_branch(const BackwardLaunch& launch, int id) {
  return id == 0 ? launch.branch[0] : launch.branch[1];
}

// Workspace layout (backward_workspace_floats): Δ (B, L) by query slot, then, when V is
// split, the partial dK (chunks, B, L, Dqk) by key slot.
__device__ inline float* delta_of(const BackwardBranch& branch) { return branch.workspace; }

__device__ inline float* partial_grad_k_of(const BackwardBranch& branch, int batch, int length) {
  return branch.workspace + static_cast<int64_t>(batch) * length;
}

// ----------------------------------------------------------------------------- dQ
// float32 keeps dO resident only up to this width (64 × 128 floats); wider dO is streamed
// chunk by chunk next to V, so the block stays inside sm_80's 163 KiB.
constexpr int kFloat32ResidentWidth = 128;

template <typename T, int D, int VC>
struct DqSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kChunkPitch = padded_pitch<T>(VC);
  static constexpr int kQkTile = kBlockRows * kQkPitch;
  static constexpr int kChunkTile = kBlockCols * kChunkPitch;
  static constexpr int kStrip = acc_a_scratch_elements<T, kBlockCols / 8>();  // per warp
  int chunks;
  bool resident;        // dO held whole (else one chunk per stage, double-buffered)
  int grad_out_pitch;   // of the dO buffer: whole width or one chunk
  // Element offsets: Q, K ×2, V chunk ×2, dO (resident or ×2), float32's dS strips.
  int q, k, v, grad_out, strip, elements, bytes;

  // dO is resident when the dtype allows it and the whole layout fits `shared_limit`
  // (sm_80/90 hold every width; the 99 KiB of sm_86/89 hold 16-bit dO up to 256 columns).
  __host__ __device__ DqSmem(int v_dim, int shared_limit) {
    chunks = (v_dim + VC - 1) / VC;
    resident = (sizeof(T) == 2 || chunks * VC <= kFloat32ResidentWidth) &&
               elements_with(chunks, true) * static_cast<int>(sizeof(T)) <= shared_limit;
    grad_out_pitch = resident ? padded_pitch<T>(chunks * VC) : kChunkPitch;
    q = 0;
    k = q + kQkTile;
    v = k + 2 * kQkTile;
    grad_out = v + 2 * kChunkTile;
    elements = elements_with(chunks, resident);
    strip = elements - kWarps * kStrip;
    bytes = elements * static_cast<int>(sizeof(T));
  }

  // The layout's size in elements: Q, K ×2, V chunk ×2, dO (resident or ×2), the strips.
  __host__ __device__ static int elements_with(int chunks, bool resident) {
    const int grad_out_tiles =
        resident ? kBlockRows * padded_pitch<T>(chunks * VC) : 2 * kChunkTile;
    return 3 * kQkTile + 2 * kChunkTile + grad_out_tiles + kWarps * kStrip;
  }
};

template <typename T, int D, int VC>
__global__ void __launch_bounds__(kThreads) dq_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Traits = DTypeTraits<T>;
  using Layout = DqSmem<T, D, VC>;
  constexpr int kScoreTiles = kBlockCols / 8;
  constexpr int kGradTiles = D / 8;
  const Layout layout(launch.v_dim, launch.shared_memory_limit);
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const q_s = smem + layout.q;

  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int v_dim = launch.v_dim;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_q = typed<T>(branch.grad_q);

  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, queries.size);
  if (outside_begin < tile_end) {
    zero_rows<T, D>(grad_q, queries, sample, outside_begin, tile_end, 0, launch.qk_dim);
  }
  if (slot0 >= queries.size) return;
  const int query_rows = min(kBlockRows, queries.size - slot0);
  const Rows<const T> q = typed<const T>(branch.q), k = typed<const T>(branch.k),
                      v = typed<const T>(branch.v), out = typed<const T>(branch.out),
                      grad_out = typed<const T>(branch.grad_out);

  // Where chunk c of dO lives: in the resident tile, or in stage buffer `buffer`.
  auto grad_out_chunk = [&](int c, int buffer) -> T* {
    return layout.resident ? smem + layout.grad_out + c * VC
                           : smem + layout.grad_out + buffer * Layout::kChunkTile;
  };
  auto load_grad_out_chunk = [&](int c, int buffer) {
    load_tile_async<T, kBlockRows, VC>(grad_out_chunk(c, buffer), layout.grad_out_pitch, grad_out,
                                  queries, sample, slot0, query_rows, c * VC, v_dim);
  };

  // Δ of the block's rows, a chunk of O and dO at a time (O through the V buffers, the
  // next chunk loading while this one is summed); two threads per row, each over half the
  // chunk, so warp w sums its own 16 rows (lanes 2r, 2r + 1 hold row r of the strip). A
  // resident dO is loaded here, once.
  load_tile_async<T, kBlockRows, D>(q_s, Layout::kQkPitch, q, queries, sample, slot0,
                                    query_rows, 0, launch.qk_dim);
  auto issue_delta_chunk = [&](int c) {
    load_tile_async<T, kBlockRows, VC>(smem + layout.v + (c % 2) * Layout::kChunkTile,
                                       Layout::kChunkPitch, out, queries, sample, slot0,
                                       query_rows, c * VC, v_dim);
    load_grad_out_chunk(c, c % 2);
    device::cp_async_commit();
  };
  float delta_part = 0.f;  // becomes the full Δ of row threadIdx.x / 2
  {
    const int row = threadIdx.x / 2;
    const int half = threadIdx.x % 2;
    issue_delta_chunk(0);
    for (int c = 0; c < layout.chunks; ++c) {
      pipeline_step(c + 1 < layout.chunks, [&] { issue_delta_chunk(c + 1); });
      device::block_barrier();
      const T* const o_row = smem + layout.v + (c % 2) * Layout::kChunkTile +
                             row * Layout::kChunkPitch;
      const T* const do_row = grad_out_chunk(c, c % 2) + row * layout.grad_out_pitch;
      for (int col = half * (VC / 2); col < (half + 1) * (VC / 2); ++col) {
        delta_part = fmaf(Traits::to_float(do_row[col]), Traits::to_float(o_row[col]), delta_part);
      }
      device::block_barrier();  // before chunk c + 2 (or a K/V stage) reuses these buffers
    }
    delta_part += device::shfl_xor(delta_part, 1);
    if (half == 0 && slot0 + row < queries.size) {
      delta_of(branch)[static_cast<int64_t>(sample) * length + slot0 + row] = delta_part;
    }
  }

  // Stages: (key tile, V chunk) pairs; a key tile's first stage also brings its K.
  const int key_tiles = (keys.size + kBlockCols - 1) / kBlockCols;
  const int stages = key_tiles * layout.chunks;
  auto issue_stage = [&](int stage) {
    const int key_tile = stage / layout.chunks;
    const int c = stage % layout.chunks;
    const int buffer = stage % 2;
    const int key0 = key_tile * kBlockCols;
    const int key_cols = min(kBlockCols, keys.size - key0);
    if (c == 0) {
      load_tile_async<T, kBlockCols, D>(smem + layout.k + (key_tile % 2) * Layout::kQkTile,
                                   Layout::kQkPitch, k, keys, sample, key0, key_cols, 0,
                                   launch.qk_dim);
    }
    load_tile_async<T, kBlockCols, VC>(smem + layout.v + buffer * Layout::kChunkTile,
                                  Layout::kChunkPitch, v, keys, sample, key0, key_cols, c * VC,
                                  v_dim);
    if (!layout.resident) load_grad_out_chunk(c, buffer);
    device::cp_async_commit();
  };
  if (stages > 0) issue_stage(0);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const int warp_row0 = warp * kWarpRows;
  // Rows outside the set get lse = +inf, hence P = 0 and no contribution.
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = slot0 + warp_row0 + lane.g + 8 * i;
    const bool inside = slot < queries.size;
    row_lse[i] = inside ? branch.lse[static_cast<int64_t>(sample) * length + queries.position(slot)]
                        : INFINITY;
    row_delta[i] = device::shfl_idx(delta_part, 2 * (lane.g + 8 * i));
  }
  const T* const q_warp = q_s + warp_row0 * Layout::kQkPitch;
  T* const strip = smem + layout.strip + warp * Layout::kStrip;

  float acc[kGradTiles][4];
  zero_fill(acc);
  float p[kScoreTiles][4], dp[kScoreTiles][4];
  for (int stage = 0; stage < stages; ++stage) {
    const int key_tile = stage / layout.chunks;
    const int c = stage % layout.chunks;
    const int buffer = stage % 2;
    device::block_barrier();  // every warp is done with the buffers of stage - 1
    pipeline_step(stage + 1 < stages, [&] { issue_stage(stage + 1); });
    device::block_barrier();
    const T* const k_s = smem + layout.k + (key_tile % 2) * Layout::kQkTile;
    if (c == 0) {
      const int key_cols = min(kBlockCols, keys.size - key_tile * kBlockCols);
      zero_fill(p);
      warp_gemm<T, D, kScoreTiles, BLayout::kNK>(p, q_warp, Layout::kQkPitch, k_s,
                                                 Layout::kQkPitch);
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[j][e] = exp_of_scaled<T>(p[j][e], launch.scale, row_lse[e / 2]);
        }
      }
      // Only a sample's last key tile can be partial: full tiles skip the column test.
      if (key_cols < kBlockCols) {
#pragma unroll
        for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (lane.col(j, e) >= key_cols) p[j][e] = 0.f;
          }
        }
      }
      zero_fill(dp);
    }
    warp_gemm<T, VC, kScoreTiles, BLayout::kNK>(
        dp, grad_out_chunk(c, buffer) + warp_row0 * layout.grad_out_pitch, layout.grad_out_pitch,
        smem + layout.v + buffer * Layout::kChunkTile, Layout::kChunkPitch);
    if (c == layout.chunks - 1) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[j][e] = p[j][e] * (dp[j][e] - row_delta[e / 2]);  // dS / scale
      }
      warp_gemm_acc_a<T, kScoreTiles, kGradTiles, BLayout::kKN>(acc, dp, k_s, Layout::kQkPitch,
                                                                strip);
    }
  }
  // Staged through the warp's own Q rows: only it reads them, and every copy into them
  // landed before the Δ pass's first barrier.
  store_rows<T>(grad_q, queries, sample, slot0 + warp_row0, 0, launch.qk_dim, acc, launch.scale,
                q_s + warp_row0 * Layout::kQkPitch, Layout::kQkPitch);
}

// ----------------------------------------------------------------------------- key side
// A key-side block owns 64 key slots and VK columns of V; its warps hold their dV rows over
// those columns and their dK rows in registers while the query tiles stream past. A warp's
// dV strip is 16 × (its columns) floats, which bounds the columns one warp can own at 128
// (16-bit; 64 for float32): a wider block splits its columns over kGroups groups of four
// warps, group g owning columns [g·kGroupCols, (g + 1)·kGroupCols) of the same 64 keys
// (warp w of each group: keys 16w..16w + 15).
//
// The groups share the work that does not depend on the columns instead of repeating it:
// group g forms Pᵀ (QKᵀ and its exponentials) only for its share of the streamed queries,
// and the two groups swap through shared memory what the other needs:
//   - Pᵀ as 16-bit mma A fragments (one 16-byte register quad per lane and k-block), as
//     dV = Pᵀ·dO needs every query;
//   - dPᵀ = V·dOᵀ, which each group sums over its own columns only, as float32 partials for
//     the other group's queries.
// dSᵀ = Pᵀ∘(dPᵀ − Δ) and dK += dSᵀ·Q then follow per group over its own queries, and the
// groups' dK strips are summed (group 0 + group 1) once, after the last query tile.
template <typename T, int VK>
struct KeyTiling {
  static constexpr int kGroupCols = DTypeTraits<T>::kTensorCores ? (VK < 128 ? VK : 128) : 64;
  static constexpr int kGroups = VK / kGroupCols;
  static_assert(kGroups * kGroupCols == VK && kGroups <= 2, "one or two column groups");
  static constexpr int kThreads = kGroups * device::kThreads;
  // Queries per streamed tile: a warp holds Pᵀ and dPᵀ (16 × queries each) next to its dV
  // (16 × kGroupCols) and dK (16 × D) strips; at 128 columns, 32 queries keep that to about
  // 128 floats (64 queries spill on sm_90).
  static constexpr int kQueryCols = kGroupCols > 64 ? 32 : 64;
  static constexpr int kQueryTiles = kQueryCols / 8;          // n-tiles of dPᵀ
  static constexpr int kOwnQueries = kQueryCols / kGroups;   // queries whose Pᵀ a group forms
  static constexpr int kOwnTiles = kOwnQueries / 8;
  static constexpr int kOwnBlocks = kOwnQueries / 16;        // k-blocks of them as an A operand
  static_assert(kOwnQueries % 16 == 0, "each group's queries are whole mma k-blocks");
};

template <typename T, int D, int VK>
struct KeySmem {
  using Tiling = KeyTiling<T, VK>;
  static constexpr int kQueryCols = Tiling::kQueryCols;
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(VK);
  static constexpr int kQueryQkTile = kQueryCols * kQkPitch;
  static constexpr int kQueryVTile = kQueryCols * kVPitch;
  static constexpr int kStrip = acc_a_scratch_elements<T, Tiling::kOwnTiles>();  // per warp
  // Elements: resident K and V; streamed Q and dO ×2; float32's Pᵀ / dSᵀ strips.
  static constexpr int kK = 0;
  static constexpr int kV = kK + kBlockRows * kQkPitch;
  static constexpr int kQ = kV + kBlockRows * kVPitch;
  static constexpr int kGradOut = kQ + 2 * kQueryQkTile;
  static constexpr int kStripArea = kGradOut + 2 * kQueryVTile;
  static constexpr int kElements = kStripArea + kWarps * kStrip;
  // Bytes, after the elements: lse and Δ of the streamed query tile ×2 (float32); with two
  // groups, every warp's Pᵀ fragments (uint4 per lane and k-block) and dPᵀ partials for the
  // other group (float4 per lane and n-tile).
  static constexpr int kStatsOffset = kElements * static_cast<int>(sizeof(T));
  static constexpr int kPFragmentOffset = kStatsOffset + 4 * kQueryCols * static_cast<int>(sizeof(float));
  static constexpr int kExchangeWarps = Tiling::kGroups > 1 ? Tiling::kGroups * kWarps : 0;
  static constexpr int kDpPartialOffset = kPFragmentOffset + kExchangeWarps * Tiling::kOwnBlocks * 32 * 16;
  static constexpr int kBytes = kDpPartialOffset + kExchangeWarps * Tiling::kOwnTiles * 32 * 16;
  static_assert(kStatsOffset % 16 == 0, "the exchange areas are 16-byte aligned");
  // After the last query tile group 1's dK strips pass to group 0 through the dO buffers.
  static_assert(Tiling::kGroups == 1 ||
                    kWarps * (D / 8) * 32 * 16 <= 2 * kQueryVTile * static_cast<int>(sizeof(T)),
                "the dK hand-over fits in the dO buffers");
};

// A warp's float n-tiles to and from shared memory, one float4 per lane and tile (tile j of
// lane l at area[32·j + l]: conflict-free), for the column groups' exchanges.
template <int NT>
__device__ inline void put_lane_tiles(float4* area, const float (&tiles)[NT][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    area[32 * j + lane] = make_float4(tiles[j][0], tiles[j][1], tiles[j][2], tiles[j][3]);
  }
}

template <int NT>
__device__ inline void add_lane_tiles(float (&tiles)[NT][4], const float4* area) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const float4 other = area[32 * j + lane];
    tiles[j][0] += other.x;
    tiles[j][1] += other.y;
    tiles[j][2] += other.z;
    tiles[j][3] += other.w;
  }
}

// One block per SM as the minimum: without it ptxas aims at more and spills.
template <typename T, int D, int VK>
__global__ void __launch_bounds__(KeyTiling<T, VK>::kThreads, 1)
    key_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Tiling = KeyTiling<T, VK>;
  using Layout = KeySmem<T, D, VK>;
  constexpr int kThreads = Tiling::kThreads;
  constexpr int kGroups = Tiling::kGroups;
  constexpr int kGroupCols = Tiling::kGroupCols;
  constexpr int kQueryCols = Tiling::kQueryCols;
  constexpr int kOwnTiles = Tiling::kOwnTiles;
  constexpr int kOwnBlocks = Tiling::kOwnBlocks;
  constexpr int kGradKTiles = D / 8;
  constexpr int kGradVTiles = kGroupCols / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const k_s = smem + Layout::kK;
  T* const v_s = smem + Layout::kV;
  float* const stats = reinterpret_cast<float*>(smem_raw + Layout::kStatsOffset);

  const int chunks = (launch.v_dim + VK - 1) / VK;
  const BackwardBranch& branch = select_branch(launch, blockIdx.z / chunks);
  const int chunk = blockIdx.z % chunks;
  const int col0 = chunk * VK;
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_k = typed<T>(branch.grad_k), grad_v = typed<T>(branch.grad_v);

  // Zero rows off the key set: dV for this chunk's columns; dK here unless V is split (then
  // the reduction writes them).
  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, keys.size);
  if (outside_begin < tile_end) {
    zero_rows<T, VK, kThreads>(grad_v, keys, sample, outside_begin, tile_end, col0, launch.v_dim);
    if (chunks == 1) {
      zero_rows<T, D, kThreads>(grad_k, keys, sample, outside_begin, tile_end, 0, launch.qk_dim);
    }
  }
  if (slot0 >= keys.size) return;
  const int key_rows = min(kBlockRows, keys.size - slot0);
  const Rows<const T> q = typed<const T>(branch.q), grad_out = typed<const T>(branch.grad_out);
  const float* const lse = branch.lse + static_cast<int64_t>(sample) * length;
  const float* const delta = delta_of(branch) + static_cast<int64_t>(sample) * length;

  load_tile_async<T, kBlockRows, D, kThreads>(k_s, Layout::kQkPitch, typed<const T>(branch.k),
                                              keys, sample, slot0, key_rows, 0, launch.qk_dim);
  load_tile_async<T, kBlockRows, VK, kThreads>(v_s, Layout::kVPitch, typed<const T>(branch.v),
                                               keys, sample, slot0, key_rows, col0, launch.v_dim);
  device::cp_async_commit();

  // A query tile's Q, dO columns, lse (+inf outside the set, so Pᵀ is 0 there) and Δ (only
  // in chunk 0's partial dK, so the chunks sum to P∘(dP − Δ)).
  auto issue_query_tile = [&](int tile) {
    const int buffer = tile % 2;
    const int query0 = tile * kQueryCols;
    const int query_cols = min(kQueryCols, queries.size - query0);
    load_tile_async<T, kQueryCols, D, kThreads>(smem + Layout::kQ + buffer * Layout::kQueryQkTile,
                                                Layout::kQkPitch, q, queries, sample, query0,
                                                query_cols, 0, launch.qk_dim);
    load_tile_async<T, kQueryCols, VK, kThreads>(
        smem + Layout::kGradOut + buffer * Layout::kQueryVTile, Layout::kVPitch, grad_out,
        queries, sample, query0, query_cols, col0, launch.v_dim);
    float* const lse_s = stats + buffer * 2 * kQueryCols;
    for (int c = threadIdx.x; c < kQueryCols; c += kThreads) {
      const bool inside = c < query_cols;
      lse_s[c] = inside ? lse[queries.position(query0 + c)] : INFINITY;
      lse_s[kQueryCols + c] = inside && chunk == 0 ? delta[query0 + c] : 0.f;
    }
    device::cp_async_commit();
  };
  const int query_tiles = (queries.size + kQueryCols - 1) / kQueryCols;
  if (query_tiles > 0) issue_query_tile(0);

  const int block_warp = threadIdx.x / 32;
  const int group = block_warp / kWarps;
  const int warp = block_warp % kWarps;
  const int partner_warp = (kGroups - 1 - group) * kWarps + warp;  // same keys, other columns
  const int lane_index = threadIdx.x % 32;
  const LaneCoords lane;
  const int warp_row0 = warp * kWarpRows;
  const int group_col0 = group * kGroupCols;
  const int own_query0 = group * Tiling::kOwnQueries;
  const T* const k_warp = k_s + warp_row0 * Layout::kQkPitch;
  const T* const v_warp = v_s + warp_row0 * Layout::kVPitch + group_col0;
  T* const strip = smem + Layout::kStripArea + warp * Layout::kStrip;
  uint4* const p_fragments = reinterpret_cast<uint4*>(smem_raw + Layout::kPFragmentOffset);
  float4* const dp_partials = reinterpret_cast<float4*>(smem_raw + Layout::kDpPartialOffset);

  float grad_k_acc[kGradKTiles][4], grad_v_acc[kGradVTiles][4];
  zero_fill(grad_k_acc);
  zero_fill(grad_v_acc);
  for (int tile = 0; tile < query_tiles; ++tile) {
    const int buffer = tile % 2;
    device::block_barrier();  // every warp is done with the buffers of tile - 1
    pipeline_step(tile + 1 < query_tiles, [&] { issue_query_tile(tile + 1); });
    device::block_barrier();
    const T* const q_s = smem + Layout::kQ + buffer * Layout::kQueryQkTile;
    const T* const grad_out_s = smem + Layout::kGradOut + buffer * Layout::kQueryVTile + group_col0;
    const float* const lse_s = stats + buffer * 2 * kQueryCols;
    const float* const delta_s = lse_s + kQueryCols;
    const T* const own_q = q_s + own_query0 * Layout::kQkPitch;

    // Pᵀ for the warp's 16 keys × the group's queries.
    float p[kOwnTiles][4];
    zero_fill(p);
    warp_gemm<T, D, kOwnTiles, BLayout::kNK>(p, k_warp, Layout::kQkPitch, own_q, Layout::kQkPitch);
#pragma unroll
    for (int j = 0; j < kOwnTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[j][e] = exp_of_scaled<T>(p[j][e], launch.scale, lse_s[own_query0 + lane.col(j, e)]);
      }
    }
    // dV += Pᵀ·dO over every query of the tile: the group's own k-blocks from registers,
    // the other group's from its published fragments.
    if constexpr (kGroups == 1) {
      warp_gemm_acc_a<T, kOwnTiles, kGradVTiles, BLayout::kKN>(grad_v_acc, p, grad_out_s,
                                                               Layout::kVPitch, strip);
    } else {
      uint4* const published = p_fragments + block_warp * kOwnBlocks * 32;
#pragma unroll
      for (int b = 0; b < kOwnBlocks; ++b) {
        uint32_t frag[4];
        pack_a_fragment<T>(frag, p[2 * b], p[2 * b + 1]);
        published[b * 32 + lane_index] = make_uint4(frag[0], frag[1], frag[2], frag[3]);
        mma_row_strip<T, kGradVTiles, BLayout::kKN>(grad_v_acc, frag, grad_out_s + own_query0 * Layout::kVPitch,
                                                    Layout::kVPitch, 16 * b);
      }
      device::block_barrier();  // the partner's fragments are published
      const uint4* const partner = p_fragments + partner_warp * kOwnBlocks * 32;
      const int partner_query0 = (kGroups - 1 - group) * Tiling::kOwnQueries;
#pragma unroll
      for (int b = 0; b < kOwnBlocks; ++b) {
        const uint4 quad = partner[b * 32 + lane_index];
        const uint32_t frag[4] = {quad.x, quad.y, quad.z, quad.w};
        mma_row_strip<T, kGradVTiles, BLayout::kKN>(
            grad_v_acc, frag, grad_out_s + partner_query0 * Layout::kVPitch, Layout::kVPitch, 16 * b);
      }
    }
    // dPᵀ over the group's columns for every query of the tile; the group keeps the sum for
    // its own queries (adding the partner's partial) and hands the rest over.
    float dp[Tiling::kQueryTiles][4];
    zero_fill(dp);
    warp_gemm<T, kGroupCols, Tiling::kQueryTiles, BLayout::kNK>(dp, v_warp, Layout::kVPitch,
                                                                grad_out_s, Layout::kVPitch);
    float ds[kOwnTiles][4];  // dSᵀ / scale for the group's queries
#pragma unroll
    for (int j = 0; j < kOwnTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (kGroups == 1) {
          ds[j][e] = dp[j][e];
        } else {
          ds[j][e] = group == 0 ? dp[j][e] : dp[kOwnTiles + j][e];
        }
      }
    }
    if constexpr (kGroups > 1) {
      float partner_share[kOwnTiles][4];
#pragma unroll
      for (int j = 0; j < kOwnTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          partner_share[j][e] = group == 0 ? dp[kOwnTiles + j][e] : dp[j][e];
        }
      }
      put_lane_tiles(dp_partials + block_warp * kOwnTiles * 32, partner_share);
      device::block_barrier();  // the partner's partials are handed over
      add_lane_tiles(ds, dp_partials + partner_warp * kOwnTiles * 32);
    }
#pragma unroll
    for (int j = 0; j < kOwnTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        ds[j][e] = p[j][e] * (ds[j][e] - delta_s[own_query0 + lane.col(j, e)]);
      }
    }
    warp_gemm_acc_a<T, kOwnTiles, kGradKTiles, BLayout::kKN>(grad_k_acc, ds, own_q,
                                                             Layout::kQkPitch, strip);
  }
  // Every copy has landed (with no query tiles the K / V group is still open: other threads'
  // copies into this warp's rows) and every warp is done with the last tile: the epilogue
  // stages its strips in the K and V tiles and hands dK over through the dO buffers.
  device::cp_async_wait<0>();
  device::block_barrier();

  const int warp_slot0 = slot0 + warp_row0;
  // Staged through the warp's own rows and columns of V (only its dPᵀ product reads them).
  store_rows<T>(grad_v, keys, sample, warp_slot0, col0 + group_col0, launch.v_dim, grad_v_acc,
                1.f, v_s + warp_row0 * Layout::kVPitch + group_col0, Layout::kVPitch);
  if constexpr (kGroups > 1) {
    // dK = group 0's strip + group 1's, through the (now idle) dO buffers.
    float4* const handover = reinterpret_cast<float4*>(smem + Layout::kGradOut) + warp * kGradKTiles * 32;
    if (group == 1) put_lane_tiles(handover, grad_k_acc);
    device::block_barrier();
    if (group == 1) return;
    add_lane_tiles(grad_k_acc, handover);
  }
  if (chunks == 1) {
    // Staged through the warp's K rows: with two groups, group 1 is past its last product.
    store_rows<T>(grad_k, keys, sample, warp_slot0, 0, launch.qk_dim, grad_k_acc, launch.scale,
                  k_s + warp_row0 * Layout::kQkPitch, Layout::kQkPitch);
    return;
  }
  // Partial dK (unscaled) by key slot; the reduction reads only slots inside the set.
  const int qk_dim = launch.qk_dim;
  float* const partial = partial_grad_k_of(branch, launch.batch, length) +
                         ((static_cast<int64_t>(chunk) * launch.batch + sample) * length) * qk_dim;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = warp_slot0 + lane.g + 8 * i;
    if (slot >= keys.size) continue;
#pragma unroll
    for (int j = 0; j < kGradKTiles; ++j) {
#pragma unroll
      for (int e = 2 * i; e < 2 * i + 2; ++e) {
        const int col = lane.col(j, e);
        if (col < qk_dim) partial[static_cast<int64_t>(slot) * qk_dim + col] = grad_k_acc[j][e];
      }
    }
  }
}

// dK = scale · Σ_chunks partial, summed in chunk order; zeros off the key set.
template <typename T>
__global__ void __launch_bounds__(kThreads) dk_reduce_kernel(const __grid_constant__ BackwardLaunch launch) {
  const int chunks = key_v_chunks<T>(launch.v_dim);
  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int qk_dim = launch.qk_dim;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_k = typed<T>(branch.grad_k);
  const float* const partial = partial_grad_k_of(branch, launch.batch, length);
  const int64_t chunk_stride = static_cast<int64_t>(launch.batch) * length * qk_dim;
  const int rows = min(kBlockRows, length - slot0);
  for (int i = threadIdx.x; i < rows * qk_dim; i += kThreads) {
    const int slot = slot0 + i / qk_dim;
    const int col = i % qk_dim;
    float sum = 0.f;
    if (slot < keys.size) {
      const float* element = partial + (static_cast<int64_t>(sample) * length + slot) * qk_dim + col;
      for (int c = 0; c < chunks; ++c) sum += element[c * chunk_stride];
    }
    grad_k.row(sample, keys.position(slot))[col] = DTypeTraits<T>::from_float(sum * launch.scale);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_backward_for(const BackwardLaunch& launch, cudaStream_t stream) {
  const unsigned tiles = (launch.length + kBlockRows - 1) / kBlockRows;
  const unsigned branches = launch.branches;
  const unsigned batch = launch.batch;
  const unsigned chunks = key_v_chunks<T>(launch.v_dim);
  cudaError_t status = cudaSuccess;
  dispatch_qk_dim(launch.qk_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    // Δ first: the key side reads it (same stream, so ordered).
    dispatch_dq_v_chunk<T>(launch.v_dim, [&](auto chunk) {
      constexpr int VC = decltype(chunk)::value;
      status = launch_with_smem(dq_kernel<T, D, VC>, dim3(tiles, batch, branches),
                                DqSmem<T, D, VC>(launch.v_dim, launch.shared_memory_limit).bytes,
                                stream, launch);
    });
    if (status != cudaSuccess) return;
    dispatch_key_v_width<T>(launch.v_dim, [&](auto width) {
      constexpr int VK = decltype(width)::value;
      status = launch_with_smem<KeyTiling<T, VK>::kThreads>(
          key_kernel<T, D, VK>, dim3(tiles, batch, branches * chunks), KeySmem<T, D, VK>::kBytes,
          stream, launch);
    });
  });
  if (status != cudaSuccess || chunks == 1) return status;
  return device::launch(dk_reduce_kernel<T>, dim3(tiles, batch, branches), kThreads, 0, stream,
                        launch);
}

// Each dtype's instantiation is compiled once, in backward_<dtype>.cu: the other files that
// include this header (backward.cu) only call it.
extern template cudaError_t launch_backward_for<float>(const BackwardLaunch&, cudaStream_t);
extern template cudaError_t launch_backward_for<__half>(const BackwardLaunch&, cudaStream_t);
extern template cudaError_t launch_backward_for<__nv_bfloat16>(const BackwardLaunch&, cudaStream_t);

}  // namespace masked_attention
}  // namespace dsa_ops
