// Backward of masked attention, deterministic (no atomics): every gradient row is owned by
// exactly one block, which sums its contributions in a fixed order.
//
// With P = exp(scale·Q Kᵀ − lse) recomputed from the saved log-sum-exp, dP = dO Vᵀ and
// Δᵢ = rowsum(dO∘O)ᵢ:  dS = P∘(dP − Δ),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dV = Pᵀ dO.
//
// Four kernels, all over tiles of 64 slots of a partition (tiles past the set size write
// the zero gradient rows of the positions outside the set):
//   delta_kernel  Δ per query slot (one warp per row), into a float32 workspace;
//   dq_kernel     a block per query tile streams key tiles; dP sums over V in 64-column
//                 chunks;
//   dk_kernel     a block per key tile streams query tiles (the transposed problem:
//                 Sᵀ = K Qᵀ, so the warp layout of the forward carries over);
//   dv_kernel     a block per (key tile, 64 columns of V) streams query tiles; only needs P.
// dK needs dP over all of Dv while dV is split by V columns, hence two key-side kernels.
#include "masked_attention/common.cuh"

namespace dsa_ops {
namespace masked_attention {
namespace {

template <typename T, int D>
struct BackwardSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(kVChunk);
  static constexpr int kSPitch = padded_pitch<T>(kBlockCols);
  // Row tile (the block's own rows) and column tile (the streamed rows), Dqk wide.
  static constexpr int kRowQk = 0;
  static constexpr int kColQk = kRowQk + kBlockRows * kQkPitch;
  // The same two tiles, one V chunk wide (dO / V in either role).
  static constexpr int kRowV = kColQk + kBlockCols * kQkPitch;
  static constexpr int kColV = kRowV + kBlockRows * kVPitch;
  // P or dS strip of every warp, the A operand of the last product.
  static constexpr int kS = kColV + kBlockCols * kVPitch;
  static constexpr int kElements = kS + kBlockRows * kSPitch;
  // Per-column log-sum-exp and Δ of the streamed query tile (key side).
  static constexpr int kBytes =
      kElements * static_cast<int>(sizeof(T)) + 2 * kBlockCols * static_cast<int>(sizeof(float));
};

__device__ inline const BackwardBranch& select_branch(const BackwardLaunch& launch, int id) {
  return id == 0 ? launch.branch[0] : launch.branch[1];
}

// ----------------------------------------------------------------------------- Δ
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Traits = DTypeTraits<T>;
  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const SampleRowSet queries(branch.queries, sample, launch.length);
  const int slot = blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (slot >= queries.size) return;
  const int position = queries.position(slot);
  const T* grad_out = typed<const T>(branch.grad_out).row(sample, position);
  const T* out = typed<const T>(branch.out).row(sample, position);
  float sum = 0.f;
  for (int c = lane; c < launch.v_dim; c += 32) {
    sum = fmaf(Traits::to_float(grad_out[c]), Traits::to_float(out[c]), sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += device::shfl_xor(sum, offset);
  if (lane == 0) branch.delta[static_cast<int64_t>(sample) * launch.length + slot] = sum;
}

// ----------------------------------------------------------------------------- dQ
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Smem = BackwardSmem<T, D>;
  constexpr int kScoreTiles = kBlockCols / 8;
  constexpr int kGradTiles = D / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const q_s = smem + Smem::kRowQk;
  T* const k_s = smem + Smem::kColQk;
  T* const do_s = smem + Smem::kRowV;
  T* const v_s = smem + Smem::kColV;
  T* const ds_s = smem + Smem::kS;

  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const int length = launch.length;
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
  load_tile<T, kBlockRows, D>(q_s, Smem::kQkPitch, typed<const T>(branch.q), queries, sample,
                              slot0, query_rows, 0, launch.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const int warp_slot0 = slot0 + warp * kWarpRows;
  // Rows outside the set get lse = +inf, hence P = 0 and no contribution.
  float row_lse[2], delta[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = warp_slot0 + lane.g + 8 * i;
    const bool inside = slot < queries.size;
    row_lse[i] = inside ? branch.lse[static_cast<int64_t>(sample) * length + queries.position(slot)]
                        : INFINITY;
    delta[i] = inside ? branch.delta[static_cast<int64_t>(sample) * length + slot] : 0.f;
  }
  const T* const q_warp = q_s + warp * kWarpRows * Smem::kQkPitch;
  const T* const do_warp = do_s + warp * kWarpRows * Smem::kVPitch;
  T* const ds_warp = ds_s + warp * kWarpRows * Smem::kSPitch;
  const Rows<const T> k = typed<const T>(branch.k), v = typed<const T>(branch.v),
                      grad_out = typed<const T>(branch.grad_out);

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int key0 = 0; key0 < keys.size; key0 += kBlockCols) {
    const int key_cols = min(kBlockCols, keys.size - key0);
    device::block_barrier();
    load_tile<T, kBlockCols, D>(k_s, Smem::kQkPitch, k, keys, sample, key0, key_cols, 0,
                                launch.qk_dim);
    device::block_barrier();
    float p[kScoreTiles][4];
    zero_fill(p);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(p, q_warp, Smem::kQkPitch, k_s, Smem::kQkPitch);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[j][e] = lane.col(j, e) < key_cols
                      ? exp_difference(p[j][e] * launch.scale - row_lse[e / 2]) : 0.f;
      }
    }
    float dp[kScoreTiles][4];
    zero_fill(dp);
    for (int col0 = 0; col0 < launch.v_dim; col0 += kVChunk) {
      device::block_barrier();
      load_tile<T, kBlockRows, kVChunk>(do_s, Smem::kVPitch, grad_out, queries, sample, slot0,
                                        query_rows, col0, launch.v_dim);
      load_tile<T, kBlockCols, kVChunk>(v_s, Smem::kVPitch, v, keys, sample, key0, key_cols, col0,
                                        launch.v_dim);
      device::block_barrier();
      warp_gemm<T, kVChunk, kScoreTiles, BLayout::kNK>(dp, do_warp, Smem::kVPitch, v_s,
                                                       Smem::kVPitch);
    }
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta[e / 2];  // now dS / scale
    }
    store_strip<T>(ds_warp, Smem::kSPitch, p);
    device::warp_barrier();
    warp_gemm<T, kBlockCols, kGradTiles, BLayout::kKN>(acc, ds_warp, Smem::kSPitch, k_s,
                                                       Smem::kQkPitch);
  }
  store_rows<T>(grad_q, queries, sample, warp_slot0, 0, launch.qk_dim, acc, launch.scale);
}

// ----------------------------------------------------------------------------- key side
// Loads the streamed query tile's log-sum-exps (+inf outside the set, so that
// Pᵀ is 0 there) and Δ into shared memory.
__device__ inline void load_query_stats(float* lse_s, float* delta_s, const BackwardBranch& branch,
                                        const SampleRowSet& queries, int sample, int length,
                                        int slot0) {
  for (int c = threadIdx.x; c < kBlockCols; c += kThreads) {
    const int slot = slot0 + c;
    const bool inside = slot < queries.size;
    const int64_t base = static_cast<int64_t>(sample) * length;
    lse_s[c] = inside ? branch.lse[base + queries.position(slot)] : INFINITY;
    delta_s[c] = inside ? branch.delta[base + slot] : 0.f;
  }
}

// Pᵀ for the warp's 16 keys × the 64 streamed queries: exp(scale·K Qᵀ − lse).
template <typename T, int D, int NT>
__device__ inline void transposed_probs(float (&p)[NT][4], const T* k_warp, const T* q_s,
                                        const float* lse_s, float scale) {
  using Smem = BackwardSmem<T, D>;
  const LaneCoords lane;
  zero_fill(p);
  warp_gemm<T, D, NT, BLayout::kNK>(p, k_warp, Smem::kQkPitch, q_s, Smem::kQkPitch);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) p[j][e] = exp_difference(p[j][e] * scale - lse_s[lane.col(j, e)]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dk_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Smem = BackwardSmem<T, D>;
  constexpr int kScoreTiles = kBlockCols / 8;
  constexpr int kGradTiles = D / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const k_s = smem + Smem::kRowQk;
  T* const q_s = smem + Smem::kColQk;
  T* const v_s = smem + Smem::kRowV;
  T* const do_s = smem + Smem::kColV;
  T* const ds_s = smem + Smem::kS;
  float* const lse_s = reinterpret_cast<float*>(smem_raw + Smem::kElements * sizeof(T));
  float* const delta_s = lse_s + kBlockCols;

  const BackwardBranch& branch = select_branch(launch, blockIdx.z);
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_k = typed<T>(branch.grad_k);

  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, keys.size);
  if (outside_begin < tile_end) {
    zero_rows<T, D>(grad_k, keys, sample, outside_begin, tile_end, 0, launch.qk_dim);
  }
  if (slot0 >= keys.size) return;
  const int key_rows = min(kBlockRows, keys.size - slot0);
  load_tile<T, kBlockRows, D>(k_s, Smem::kQkPitch, typed<const T>(branch.k), keys, sample, slot0,
                              key_rows, 0, launch.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const T* const k_warp = k_s + warp * kWarpRows * Smem::kQkPitch;
  const T* const v_warp = v_s + warp * kWarpRows * Smem::kVPitch;
  T* const ds_warp = ds_s + warp * kWarpRows * Smem::kSPitch;
  const Rows<const T> q = typed<const T>(branch.q), v = typed<const T>(branch.v),
                      grad_out = typed<const T>(branch.grad_out);

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int query0 = 0; query0 < queries.size; query0 += kBlockCols) {
    const int query_cols = min(kBlockCols, queries.size - query0);
    device::block_barrier();
    load_tile<T, kBlockCols, D>(q_s, Smem::kQkPitch, q, queries, sample, query0, query_cols, 0,
                                launch.qk_dim);
    load_query_stats(lse_s, delta_s, branch, queries, sample, length, query0);
    device::block_barrier();
    float p[kScoreTiles][4];
    transposed_probs<T, D>(p, k_warp, q_s, lse_s, launch.scale);
    float dp[kScoreTiles][4];
    zero_fill(dp);
    for (int col0 = 0; col0 < launch.v_dim; col0 += kVChunk) {
      device::block_barrier();
      load_tile<T, kBlockRows, kVChunk>(v_s, Smem::kVPitch, v, keys, sample, slot0, key_rows, col0,
                                        launch.v_dim);
      load_tile<T, kBlockCols, kVChunk>(do_s, Smem::kVPitch, grad_out, queries, sample, query0,
                                        query_cols, col0, launch.v_dim);
      device::block_barrier();
      warp_gemm<T, kVChunk, kScoreTiles, BLayout::kNK>(dp, v_warp, Smem::kVPitch, do_s,
                                                       Smem::kVPitch);
    }
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta_s[lane.col(j, e)];  // dSᵀ / scale
    }
    store_strip<T>(ds_warp, Smem::kSPitch, p);
    device::warp_barrier();
    warp_gemm<T, kBlockCols, kGradTiles, BLayout::kKN>(acc, ds_warp, Smem::kSPitch, q_s,
                                                       Smem::kQkPitch);
  }
  store_rows<T>(grad_k, keys, sample, slot0 + warp * kWarpRows, 0, launch.qk_dim, acc,
                launch.scale);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dv_kernel(const __grid_constant__ BackwardLaunch launch) {
  using Smem = BackwardSmem<T, D>;
  constexpr int kScoreTiles = kBlockCols / 8;
  constexpr int kGradTiles = kVChunk / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const k_s = smem + Smem::kRowQk;
  T* const q_s = smem + Smem::kColQk;
  T* const do_s = smem + Smem::kColV;
  T* const p_s = smem + Smem::kS;
  float* const lse_s = reinterpret_cast<float*>(smem_raw + Smem::kElements * sizeof(T));
  float* const delta_s = lse_s + kBlockCols;

  const int v_chunks = (launch.v_dim + kVChunk - 1) / kVChunk;
  const BackwardBranch& branch = select_branch(launch, blockIdx.z / v_chunks);
  const int col0 = (blockIdx.z % v_chunks) * kVChunk;
  const int sample = blockIdx.y;
  const int length = launch.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(branch.queries, sample, length);
  const SampleRowSet keys(branch.keys, sample, length);
  const Rows<T> grad_v = typed<T>(branch.grad_v);

  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, keys.size);
  if (outside_begin < tile_end) {
    zero_rows<T, kVChunk>(grad_v, keys, sample, outside_begin, tile_end, col0, launch.v_dim);
  }
  if (slot0 >= keys.size) return;
  const int key_rows = min(kBlockRows, keys.size - slot0);
  load_tile<T, kBlockRows, D>(k_s, Smem::kQkPitch, typed<const T>(branch.k), keys, sample, slot0,
                              key_rows, 0, launch.qk_dim);

  const int warp = threadIdx.x / 32;
  const T* const k_warp = k_s + warp * kWarpRows * Smem::kQkPitch;
  T* const p_warp = p_s + warp * kWarpRows * Smem::kSPitch;
  const Rows<const T> q = typed<const T>(branch.q), grad_out = typed<const T>(branch.grad_out);

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int query0 = 0; query0 < queries.size; query0 += kBlockCols) {
    const int query_cols = min(kBlockCols, queries.size - query0);
    device::block_barrier();
    load_tile<T, kBlockCols, D>(q_s, Smem::kQkPitch, q, queries, sample, query0, query_cols, 0,
                                launch.qk_dim);
    load_tile<T, kBlockCols, kVChunk>(do_s, Smem::kVPitch, grad_out, queries, sample, query0,
                                      query_cols, col0, launch.v_dim);
    load_query_stats(lse_s, delta_s, branch, queries, sample, length, query0);
    device::block_barrier();
    float p[kScoreTiles][4];
    transposed_probs<T, D>(p, k_warp, q_s, lse_s, launch.scale);
    store_strip<T>(p_warp, Smem::kSPitch, p);
    device::warp_barrier();
    warp_gemm<T, kBlockCols, kGradTiles, BLayout::kKN>(acc, p_warp, Smem::kSPitch, do_s,
                                                       Smem::kVPitch);
  }
  store_rows<T>(grad_v, keys, sample, slot0 + warp * kWarpRows, col0, launch.v_dim, acc, 1.f);
}

template <typename Kernel>
cudaError_t launch_plain(Kernel kernel, dim3 grid, cudaStream_t stream,
                         const BackwardLaunch& launch) {
  return device::launch(kernel, grid, kThreads, 0, stream, launch);
}

}  // namespace

cudaError_t launch_backward(const BackwardLaunch& launch, cudaStream_t stream) {
  if (launch.batch == 0 || launch.length == 0) return cudaSuccess;
  const unsigned tiles = (launch.length + kBlockRows - 1) / kBlockRows;
  const unsigned v_chunks = (launch.v_dim + kVChunk - 1) / kVChunk;
  const unsigned branches = launch.branches;
  const unsigned batch = launch.batch;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(launch.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Δ first: dq_kernel and dk_kernel read it (same stream, so ordered).
    status = launch_plain(delta_kernel<T>,
                          dim3((launch.length + kWarps - 1) / kWarps, batch, branches), stream,
                          launch);
    if (status != cudaSuccess) return;
    dispatch_qk_dim(launch.qk_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      constexpr int bytes = BackwardSmem<T, D>::kBytes;
      status = launch_with_smem(dq_kernel<T, D>, dim3(tiles, batch, branches), bytes, stream,
                                launch);
      if (status != cudaSuccess) return;
      status = launch_with_smem(dk_kernel<T, D>, dim3(tiles, batch, branches), bytes, stream,
                                launch);
      if (status != cudaSuccess) return;
      status = launch_with_smem(dv_kernel<T, D>, dim3(tiles, batch, branches * v_chunks), bytes,
                                stream, launch);
    });
  });
  return status;
}

}  // namespace masked_attention
}  // namespace dsa_ops
