// Backward of masked attention, FlashAttention-2 form, deterministic (no atomics, no
// inter-block waits): every gradient element is summed by one thread, or by one block over
// its own stores, in a fixed order.
//
// With P = exp(scale·Q Kᵀ − lse) recomputed from the saved log-sum-exp, dP = dO Vᵀ and
// Δᵢ = rowsum(dO∘O)ᵢ:  dS = P∘(dP − Δ),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dV = Pᵀ dO.
//
// Three kernels, over tiles of 64 slots of a partition:
//   delta_kernel   a block per query tile: Δ of its rows (reading O and dO once) into the
//                  float32 workspace.
//   key_kernel     a block per (key lane, V column chunk). Key lane g of G (dq_partials)
//                  takes the key tiles g, g + G, g + 2G, ... one after the other; for each,
//                  K and its V columns stay resident (up to 128 columns for 16-bit dtypes,
//                  64 for float32: a wider Dv is split into chunks) while query tiles stream
//                  past (Q, dO columns, lse, Δ; double-buffered). The transposed problem
//                  (Sᵀ = K Qᵀ) keeps the forward's warp layout: Pᵀ feeds dV += Pᵀ·dO and,
//                  with dPᵀ = V·dOᵀ, dSᵀ feeds dK += dSᵀ·Q. dSᵀ also goes to shared memory,
//                  and at the next query tile the block forms that tile's dQ share, dS·K,
//                  and adds it to its lane's own float32 partial dQ (B, L, Dqk): a lane's
//                  key tiles are summed in order by the same threads, so no other block
//                  ever touches its partial.
//   reduce_kernel  a block per 64 slots: dQ = scale · Σ partials (chunk, then lane order);
//                  when V is split, dK = scale · Σ_chunks partial dK; zeros off the sets.
//                  (Chunk c's partials come from Pᵀ∘(dPᵀ_c − [c = 0]·Δ), dPᵀ_c over its
//                  columns: they sum to dS.)
// dP is formed once (on the key side), not once per side as with a separate dQ kernel: at
// the paper's Dqk 16 and Dv 128 that is 2·(3·Dqk + 2·Dv) FLOPs a pair instead of
// 2·(4·Dqk + 3·Dv). The price is the partials' workspace, chunks · G · B · L · Dqk floats
// with G · Dqk ≤ 256 (dq_partials), and G blocks per (sample, branch, chunk) on the key side.
//
// Included by one instantiation file per dtype (backward_float32.cu, ...), which ninja builds
// in parallel; backward.cu dispatches the dtype.
#pragma once

#include "device/kernel.cuh"
#include "masked_attention/launch.cuh"

namespace dsa_ops {
namespace masked_attention {

using namespace device;  // the shared tile layer, which these kernels are written in

// The backward for inputs of dtype T (every head size); instantiated per dtype.
template <typename T>
cudaError_t launch_backward_for(const BackwardLaunch& launch, cudaStream_t stream);

// Key lanes (and float32 partial dQ arrays) per (sample, branch, V chunk): one per key tile,
// at most 256 / Dqk (padded: 16 lanes at Dqk 16, 4 at 64), so the partials take at most 256
// floats per query slot and V chunk. A function of the shape alone: the summation order,
// hence every bit of dQ, does not depend on the GPU.
__host__ __device__ constexpr int dq_partials(int length, int qk_dim) {
  const int key_tiles = (length + kBlockRows - 1) / kBlockRows;
  const int lanes = 256 / padded_qk_dim(qk_dim);
  return key_tiles < lanes ? key_tiles : lanes;
}

namespace {

// Columns of V (and dO) a key-side block owns: its warps hold their dV rows over all of them
// in registers, and a warp's dV strip (16 × its columns) holds at most 128 (16-bit; 64 for
// float32, no tensor cores). A wider Dv is split into column chunks, a block per chunk, each
// forming Pᵀ again and a partial dK and dQ from its share of dPᵀ (the reduction sums them).
template <typename T>
__host__ __device__ constexpr int key_v_width(int v_dim) {
  return v_dim <= 64 || !DTypeTraits<T>::kTensorCores ? 64 : 128;
}

template <typename T>
__host__ __device__ constexpr int key_v_chunks(int v_dim) {
  return (v_dim + key_v_width<T>(v_dim) - 1) / key_v_width<T>(v_dim);
}

template <typename T, typename F>
void dispatch_key_v_width(int v_dim, F&& f) {
  if constexpr (DTypeTraits<T>::kTensorCores) {
    if (key_v_width<T>(v_dim) == 128) return f(std::integral_constant<int, 128>{});
  }
  f(std::integral_constant<int, 64>{});
}

__device__ inline const BackwardBranch& select_branch(const BackwardLaunch& launch, int id) {
  return id == 0 ? launch.branch[0] : launch.branch[1];
}

// Workspace layout (backward_workspace_floats), per branch: Δ (B, L) by query slot; the
// partial dQ arrays (chunks, G, B, L, Dqk) by query slot; when V is split, the partial dK
// (chunks, B, L, Dqk) by key slot.
__device__ inline float* delta_of(const BackwardBranch& branch) { return branch.workspace; }

__device__ inline float* partial_grad_q_of(const BackwardBranch& branch, int batch, int length) {
  return branch.workspace + static_cast<int64_t>(batch) * length;
}

__device__ inline float* partial_grad_k_of(const BackwardBranch& branch, int batch, int length,
                                           int qk_dim, int chunks) {
  return partial_grad_q_of(branch, batch, length) +
         static_cast<int64_t>(chunks) * dq_partials(length, qk_dim) * batch * length * qk_dim;
}

// ----------------------------------------------------------------------------- Δ
// Δ = rowsum(dO∘O) of a tile's query rows: warp w takes rows w, w + 4, ..., w + 60, its lanes
// the columns (coalesced). A warp's rows go in batches whose loads are all issued before
// the first sum needs one: latency, not bandwidth, bounds this small kernel.
constexpr int kDeltaBatch = 8;  // rows of a warp in flight

// The slow path of a Δ row (rows not all 16-byte aligned): the calling lane's
// share of Σ a·b over `columns`, element by element. Out of line, as copy_chunk_scalar.
template <typename T>
__device__ __noinline__ float lane_dot_scalar(const T* a, const T* b, int columns) {
  float sum = 0.f;
  for (int c = threadIdx.x % 32; c < columns; c += 32) {
    sum = fmaf(DTypeTraits<T>::to_float(a[c]), DTypeTraits<T>::to_float(b[c]), sum);
  }
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Traits = DTypeTraits<T>;
  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const SampleRowSet queries(branch.queries, sample, launch.length);
  const Rows<const T> out = typed<const T>(branch.out), grad_out = typed<const T>(branch.grad_out);
  float* const delta = delta_of(branch) + static_cast<int64_t>(sample) * launch.length;
  const int lane = threadIdx.x % 32;
  const int slot_end = min(static_cast<int>(blockIdx.x + 1) * kBlockRows, queries.size);
  // Rows that all start 16-byte aligned go in 16-byte chunks.
  auto aligned = [](const Rows<const T>& rows) {
    return reinterpret_cast<uintptr_t>(rows.data) % 16 == 0 &&
           (rows.row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
           (rows.batch_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  };
  constexpr int kChunk = kChunkElements<T>;
  const bool vector_rows = launch.v_dim % kChunk == 0 && aligned(out) && aligned(grad_out);
  for (int first = blockIdx.x * kBlockRows + threadIdx.x / 32; first < slot_end;
       first += kWarps * kDeltaBatch) {
    const T* o_row[kDeltaBatch];
    const T* do_row[kDeltaBatch];
    float sum[kDeltaBatch];
#pragma unroll
    for (int b = 0; b < kDeltaBatch; ++b) {
      const int slot = min(first + b * kWarps, slot_end - 1);  // past the end: a repeat, unused
      const int position = queries.position(slot);
      o_row[b] = out.row(sample, position);
      do_row[b] = grad_out.row(sample, position);
      sum[b] = 0.f;
    }
    if (vector_rows) {
      // 16-byte chunks: a lane's loads of all the batch's rows are in flight together.
      for (int c = lane; c < launch.v_dim / kChunk; c += 32) {
        uint4 o_chunk[kDeltaBatch], do_chunk[kDeltaBatch];
#pragma unroll
        for (int b = 0; b < kDeltaBatch; ++b) {
          o_chunk[b] = reinterpret_cast<const uint4*>(o_row[b])[c];
          do_chunk[b] = reinterpret_cast<const uint4*>(do_row[b])[c];
        }
#pragma unroll
        for (int b = 0; b < kDeltaBatch; ++b) {
          const T* const o_elements = reinterpret_cast<const T*>(&o_chunk[b]);
          const T* const do_elements = reinterpret_cast<const T*>(&do_chunk[b]);
#pragma unroll
          for (int e = 0; e < kChunk; ++e) {
            sum[b] = fmaf(Traits::to_float(do_elements[e]), Traits::to_float(o_elements[e]), sum[b]);
          }
        }
      }
    } else {
#pragma unroll
      for (int b = 0; b < kDeltaBatch; ++b) sum[b] = lane_dot_scalar(do_row[b], o_row[b], launch.v_dim);
    }
#pragma unroll
    for (int b = 0; b < kDeltaBatch; ++b) {
      const float row_delta = warp_sum(sum[b]);
      if (lane == 0 && first + b * kWarps < slot_end) delta[first + b * kWarps] = row_delta;
    }
  }
}

// ----------------------------------------------------------------------------- key side
// A key-side block owns 64 key slots (one key tile at a time of its key lane) and VK columns
// of V; its warps hold their dV rows over those columns and their dK rows in registers
// while the query tiles stream past (warp w: keys 16w..16w + 15).
template <typename T, int VK>
struct KeyTiling {
  // Queries per streamed tile: a warp holds Pᵀ and dPᵀ (16 × queries each) next to its dV
  // (16 × VK) and dK (16 × D) strips; at 128 columns, 32 queries keep that to about 128
  // floats (64 queries spill on sm_90).
  static constexpr int kQueryCols = VK > 64 ? 32 : 64;
  static constexpr int kQueryTiles = kQueryCols / 8;  // n-tiles of Pᵀ and dPᵀ
};

template <typename T, int D, int VK>
struct KeySmem {
  static constexpr int kQueryCols = KeyTiling<T, VK>::kQueryCols;
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(VK);
  static constexpr int kDsPitch = padded_pitch<T>(kQueryCols);
  static constexpr int kQueryQkTile = kQueryCols * kQkPitch;
  static constexpr int kQueryVTile = kQueryCols * kVPitch;
  static constexpr int kStrip = acc_a_scratch_elements<T, KeyTiling<T, VK>::kQueryTiles>();  // per warp
  // Elements: resident K and V; streamed Q and dO ×2; dSᵀ of a query tile (64 keys × its
  // queries, from its end to the dQ product at the next tile); float32's Pᵀ / dSᵀ strips.
  static constexpr int kK = 0;
  static constexpr int kV = kK + kBlockRows * kQkPitch;
  static constexpr int kQ = kV + kBlockRows * kVPitch;
  static constexpr int kGradOut = kQ + 2 * kQueryQkTile;
  static constexpr int kDs = kGradOut + 2 * kQueryVTile;
  static constexpr int kStripArea = kDs + kBlockRows * kDsPitch;
  static constexpr int kElements = kStripArea + kWarps * kStrip;
  // Bytes, after the elements: lse and Δ of the streamed query tile ×2 (float32).
  static constexpr int kStatsOffset = kElements * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kStatsOffset + 4 * kQueryCols * static_cast<int>(sizeof(float));
};

// How a key-side block's warps share a query tile's dQ product, dS (queries × 64 keys) · K
// (64 keys × D): warp w forms rows 16·(w / kWarpsPerMTile).. and n-tiles
// kTiles·(w % kWarpsPerMTile).. of it.
template <typename T, int D, int VK>
struct DqProduct {
  static constexpr int kMTiles = KeyTiling<T, VK>::kQueryCols / 16;
  static constexpr int kNTiles = D / 8;
  static constexpr int kWarpsPerMTile = kWarps / kMTiles;
  static constexpr int kTiles = kNTiles / kWarpsPerMTile;
  static_assert(kMTiles * kWarpsPerMTile == kWarps && kTiles * kWarpsPerMTile == kNTiles,
                "the dQ tile splits evenly over the warps");
};

// One block per SM as the minimum: without it ptxas aims at more and spills.
template <typename T, int D, int VK>
__global__ void __launch_bounds__(kThreads, 1) key_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Layout = KeySmem<T, D, VK>;
  using Dq = DqProduct<T, D, VK>;
  constexpr int kQueryCols = KeyTiling<T, VK>::kQueryCols;
  constexpr int kQueryTiles = KeyTiling<T, VK>::kQueryTiles;
  constexpr int kGradKTiles = D / 8;
  constexpr int kGradVTiles = VK / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const k_s = smem + Layout::kK;
  T* const v_s = smem + Layout::kV;
  T* const ds_s = smem + Layout::kDs;
  float* const stats = reinterpret_cast<float*>(smem_raw + Layout::kStatsOffset);

  const int chunks = (launch.v_dim + VK - 1) / VK;
  const BackwardBranch& branch = select_branch(launch, blockIdx.z / chunks);
  const int chunk = blockIdx.z % chunks;
  const int col0 = chunk * VK;
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int qk_dim = launch.qk_dim;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_k = typed<T>(branch.grad_k), grad_v = typed<T>(branch.grad_v);
  const Rows<const T> q = typed<const T>(branch.q), grad_out = typed<const T>(branch.grad_out);
  const float* const lse = branch.lse + static_cast<int64_t>(sample) * length;
  const float* const delta = delta_of(branch) + static_cast<int64_t>(sample) * length;
  const int query_tiles = (queries.size + kQueryCols - 1) / kQueryCols;

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const int warp_row0 = warp * kWarpRows;
  const T* const k_warp = k_s + warp_row0 * Layout::kQkPitch;
  const T* const v_warp = v_s + warp_row0 * Layout::kVPitch;
  T* const strip = smem + Layout::kStripArea + warp * Layout::kStrip;

  // This key lane's partial dQ (by query slot) and the warp's share of a query tile's dQ
  // product: rows dq_row0.., columns dq_col0.. (DqProduct).
  const int lanes = gridDim.x;
  float* const partial_grad_q =
      partial_grad_q_of(branch, launch.batch, length) +
      ((static_cast<int64_t>(chunk) * lanes + blockIdx.x) * launch.batch + sample) * length * qk_dim;
  const int dq_row0 = 16 * (warp / Dq::kWarpsPerMTile);
  const int dq_col0 = 8 * Dq::kTiles * (warp % Dq::kWarpsPerMTile);
  // dQ += dS·K for the query tile whose dSᵀ is in ds_s (the block is past a barrier since
  // it was stored), added to the lane's partial or, at its first key tile, stored as it.
  // Every element is read and written by the same thread at each key tile of the lane, so
  // no other block or thread ever touches it: no atomics, and the sum's order is fixed.
  auto add_grad_q_share = [&](int query_tile, bool first_key_tile) {
    const int slot0 = query_tile * kQueryCols + dq_row0;
    float share[Dq::kTiles][4];
    // The partial's loads go out first; the product hides their latency.
#pragma unroll
    for (int j = 0; j < Dq::kTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = slot0 + lane.row(e);
        const int col = dq_col0 + lane.col(j, e);
        share[j][e] = !first_key_tile && slot < queries.size && col < qk_dim
                          ? partial_grad_q[static_cast<int64_t>(slot) * qk_dim + col]
                          : 0.f;
      }
    }
    warp_gemm<T, kBlockRows, Dq::kTiles, BLayout::kKN, ALayout::kKM>(
        share, ds_s + dq_row0, Layout::kDsPitch, k_s + dq_col0, Layout::kQkPitch);
#pragma unroll
    for (int j = 0; j < Dq::kTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int slot = slot0 + lane.row(e);
        const int col = dq_col0 + lane.col(j, e);
        if (slot < queries.size && col < qk_dim) {
          partial_grad_q[static_cast<int64_t>(slot) * qk_dim + col] = share[j][e];
        }
      }
    }
  };

  // The key tiles of this lane, in order. A tile past the key set only writes its zero rows.
  const int key_tiles = (length + kBlockRows - 1) / kBlockRows;
  for (int key_tile = blockIdx.x; key_tile < key_tiles; key_tile += lanes) {
    const bool first_key_tile = key_tile == static_cast<int>(blockIdx.x);
    const int slot0 = key_tile * kBlockRows;
    if (!first_key_tile) device::block_barrier();  // the last tile's epilogue is done with smem
    // Zero rows off the key set: dV for this chunk's columns; dK here unless V is split (then
    // the reduction writes them).
    const int tile_end = min(slot0 + kBlockRows, length);
    const int outside_begin = max(slot0, keys.size);
    if (outside_begin < tile_end) {
      zero_rows<T, VK>(grad_v, keys, sample, outside_begin, tile_end, col0, launch.v_dim);
      if (chunks == 1) zero_rows<T, D>(grad_k, keys, sample, outside_begin, tile_end, 0, qk_dim);
    }
    if (slot0 >= keys.size) continue;
    const int key_rows = min(kBlockRows, keys.size - slot0);

    load_tile_async<T, kBlockRows, D>(k_s, Layout::kQkPitch, typed<const T>(branch.k), keys,
                                      sample, slot0, key_rows, 0, qk_dim);
    load_tile_async<T, kBlockRows, VK>(v_s, Layout::kVPitch, typed<const T>(branch.v), keys,
                                       sample, slot0, key_rows, col0, launch.v_dim);
    device::cp_async_commit();

    // A query tile's Q, dO columns, lse (+inf outside the set, so Pᵀ is 0 there) and Δ (only
    // in chunk 0's partials, so the chunks sum to P∘(dP − Δ)).
    auto issue_query_tile = [&](int tile) {
      const int buffer = tile % 2;
      const int query0 = tile * kQueryCols;
      const int query_cols = min(kQueryCols, queries.size - query0);
      load_tile_async<T, kQueryCols, D>(smem + Layout::kQ + buffer * Layout::kQueryQkTile,
                                        Layout::kQkPitch, q, queries, sample, query0, query_cols,
                                        0, qk_dim);
      load_tile_async<T, kQueryCols, VK>(smem + Layout::kGradOut + buffer * Layout::kQueryVTile,
                                         Layout::kVPitch, grad_out, queries, sample, query0,
                                         query_cols, col0, launch.v_dim);
      float* const lse_s = stats + buffer * 2 * kQueryCols;
      for (int c = threadIdx.x; c < kQueryCols; c += kThreads) {
        const bool inside = c < query_cols;
        lse_s[c] = inside ? lse[queries.position(query0 + c)] : INFINITY;
        lse_s[kQueryCols + c] = inside && chunk == 0 ? delta[query0 + c] : 0.f;
      }
      device::cp_async_commit();
    };
    if (query_tiles > 0) issue_query_tile(0);

    float grad_k_acc[kGradKTiles][4], grad_v_acc[kGradVTiles][4];
    zero_fill(grad_k_acc);
    zero_fill(grad_v_acc);
    for (int tile = 0; tile < query_tiles; ++tile) {
      const int buffer = tile % 2;
      device::block_barrier();  // every warp is done with the buffers of tile - 1
      // The previous tile's dQ share is formed while this tile's copies land.
      pipeline_step(tile + 1 < query_tiles, [&] { issue_query_tile(tile + 1); },
                    [&] { if (tile > 0) add_grad_q_share(tile - 1, first_key_tile); });
      device::block_barrier();
      const T* const q_s = smem + Layout::kQ + buffer * Layout::kQueryQkTile;
      const T* const grad_out_s = smem + Layout::kGradOut + buffer * Layout::kQueryVTile;
      const float* const lse_s = stats + buffer * 2 * kQueryCols;
      const float* const delta_s = lse_s + kQueryCols;

      // Pᵀ for the warp's 16 keys × the tile's queries; dV += Pᵀ·dO.
      float p[kQueryTiles][4];
      zero_fill(p);
      warp_gemm<T, D, kQueryTiles, BLayout::kNK>(p, k_warp, Layout::kQkPitch, q_s, Layout::kQkPitch);
#pragma unroll
      for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[j][e] = exp_of_scaled<T>(p[j][e], launch.scale, lse_s[lane.col(j, e)]);
        }
      }
      warp_gemm_acc_a<T, kQueryTiles, kGradVTiles, BLayout::kKN>(grad_v_acc, p, grad_out_s,
                                                                 Layout::kVPitch, strip);
      // dPᵀ over the chunk's columns, then dSᵀ / scale = Pᵀ∘(dPᵀ − Δ); dK += dSᵀ·Q.
      float ds[kQueryTiles][4];
      zero_fill(ds);
      warp_gemm<T, VK, kQueryTiles, BLayout::kNK>(ds, v_warp, Layout::kVPitch, grad_out_s,
                                                  Layout::kVPitch);
#pragma unroll
      for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ds[j][e] = p[j][e] * (ds[j][e] - delta_s[lane.col(j, e)]);
        }
      }
      warp_gemm_acc_a<T, kQueryTiles, kGradKTiles, BLayout::kKN>(grad_k_acc, ds, q_s,
                                                                 Layout::kQkPitch, strip);
      // dSᵀ for the dQ product at the next tile (rounded to T, as the dK product's A operand).
      store_strip<T>(ds_s + warp_row0 * Layout::kDsPitch, Layout::kDsPitch, ds);
    }
    // Every copy has landed (with no query tiles the K / V group is still open: other
    // threads' copies into this warp's rows) and every warp is done with the last tile; its
    // dQ share reads all of K, so the epilogue, which stages the strips in the K and V
    // tiles, waits for it.
    device::cp_async_wait<0>();
    device::block_barrier();
    if (query_tiles > 0) {
      add_grad_q_share(query_tiles - 1, first_key_tile);
      device::block_barrier();
    }

    const int warp_slot0 = slot0 + warp_row0;
    // Staged through the warp's own rows of V and K (only its products read them).
    store_rows<T>(grad_v, keys, sample, warp_slot0, col0, launch.v_dim, grad_v_acc, 1.f,
                  v_s + warp_row0 * Layout::kVPitch, Layout::kVPitch);
    if (chunks == 1) {
      store_rows<T>(grad_k, keys, sample, warp_slot0, 0, qk_dim, grad_k_acc, launch.scale,
                    k_s + warp_row0 * Layout::kQkPitch, Layout::kQkPitch);
      continue;
    }
    // Partial dK (unscaled) by key slot; the reduction reads only slots inside the set.
    float* const partial = partial_grad_k_of(branch, launch.batch, length, qk_dim, chunks) +
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
}

// ----------------------------------------------------------------------------- reduction
constexpr int kReduceBatch = 8;  // elements a thread sums at once
constexpr int kReduceLoads = 4;  // partial arrays whose loads are in flight together

// dQ = scale · Σ partial dQ over (V chunk, key lane), in that order, for the tile's query
// slots; when V is split, dK = scale · Σ partial dK over the chunks for its key slots. Zero
// rows past each set (and all of dQ when no lane had a key).
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ BackwardLaunch launch) {
  const int chunks = key_v_chunks<T>(launch.v_dim);
  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const int batch = launch.batch;
  const int length = launch.length;
  const int qk_dim = launch.qk_dim;
  const int slot0 = blockIdx.x * kBlockRows;
  const int rows = min(kBlockRows, length - slot0);
  const int64_t array_floats = static_cast<int64_t>(batch) * length * qk_dim;
  // scale · Σ of `outer` × `inner` arrays of `partial` (outer_stride, then array_floats
  // apart), in that order, into the rows of `dst` at the tile's slots of `set`. A thread
  // sums kReduceBatch elements at once, so that their loads are in flight together.
  auto write_sums = [&](const Rows<T>& dst, const SampleRowSet& set, const float* partial,
                        int outer, int64_t outer_stride, int inner) {
    partial += static_cast<int64_t>(sample) * length * qk_dim;
    const int elements = rows * qk_dim;
    for (int first = threadIdx.x; first < elements; first += kThreads * kReduceBatch) {
      // Everything a batch needs from global memory is asked for before it is used: the
      // positions, then the partials kReduceLoads arrays at a time (in-order issue would
      // otherwise wait out one load latency per element and array).
      float sum[kReduceBatch];
      int64_t offset[kReduceBatch];
      bool inside[kReduceBatch];
      int position[kReduceBatch];
#pragma unroll
      for (int b = 0; b < kReduceBatch; ++b) {
        const int i = first + b * kThreads;
        const int slot = slot0 + i / qk_dim;
        offset[b] = static_cast<int64_t>(slot) * qk_dim + i % qk_dim;
        inside[b] = i < elements && slot < set.size;
        position[b] = i < elements ? set.position(slot) : 0;
        sum[b] = 0.f;
      }
      for (int o = 0; o < outer; ++o) {
        for (int n0 = 0; n0 < inner; n0 += kReduceLoads) {
          float value[kReduceLoads][kReduceBatch];
#pragma unroll
          for (int u = 0; u < kReduceLoads; ++u) {
            const float* const array = partial + o * outer_stride + (n0 + u) * array_floats;
#pragma unroll
            for (int b = 0; b < kReduceBatch; ++b) {
              value[u][b] = n0 + u < inner && inside[b] ? array[offset[b]] : 0.f;
            }
          }
          // In array order; a padding 0 leaves a sum unchanged (−0 + 0 aside).
#pragma unroll
          for (int u = 0; u < kReduceLoads; ++u) {
#pragma unroll
            for (int b = 0; b < kReduceBatch; ++b) sum[b] += value[u][b];
          }
        }
      }
#pragma unroll
      for (int b = 0; b < kReduceBatch; ++b) {
        const int i = first + b * kThreads;
        if (i >= elements) break;
        dst.row(sample, position[b])[i % qk_dim] = DTypeTraits<T>::from_float(sum[b] * launch.scale);
      }
    }
  };
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  // Lane g wrote its partial iff its first key tile, g, holds keys.
  const int lanes = dq_partials(length, qk_dim);
  const int lanes_with_keys = min(lanes, (keys.size + kBlockRows - 1) / kBlockRows);
  write_sums(typed<T>(branch.grad_q), queries, partial_grad_q_of(branch, batch, length), chunks,
             lanes * array_floats, lanes_with_keys);
  if (chunks > 1) {
    write_sums(typed<T>(branch.grad_k), keys,
               partial_grad_k_of(branch, batch, length, qk_dim, chunks), chunks, array_floats, 1);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_backward_for(const BackwardLaunch& launch, cudaStream_t stream) {
  const unsigned tiles = (launch.length + kBlockRows - 1) / kBlockRows;
  const dim3 per_tile(tiles, launch.batch, launch.branches);
  const unsigned lanes = dq_partials(launch.length, launch.qk_dim);
  const unsigned chunks = key_v_chunks<T>(launch.v_dim);
  // In stream order: Δ, which the key side reads; the key side; the sums of its partials.
  cudaError_t status = device::launch(delta_kernel<T>, per_tile, kThreads, 0, stream, launch);
  if (status != cudaSuccess) return status;
  dispatch_qk_dim(launch.qk_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    dispatch_key_v_width<T>(launch.v_dim, [&](auto width) {
      constexpr int VK = decltype(width)::value;
      status = launch_with_smem(key_kernel<T, D, VK>,
                                dim3(lanes, launch.batch, launch.branches * chunks),
                                KeySmem<T, D, VK>::kBytes, stream, launch);
    });
  });
  if (status != cudaSuccess) return status;
  return device::launch(reduce_kernel<T>, per_tile, kThreads, 0, stream, launch);
}

// Each dtype's instantiation is compiled once, in backward_<dtype>.cu: the other files that
// include this header (backward.cu) only call it.
extern template cudaError_t launch_backward_for<float>(const BackwardLaunch&, cudaStream_t);
extern template cudaError_t launch_backward_for<__half>(const BackwardLaunch&, cudaStream_t);
extern template cudaError_t launch_backward_for<__nv_bfloat16>(const BackwardLaunch&, cudaStream_t);

}  // namespace masked_attention
}  // namespace dsa_ops
