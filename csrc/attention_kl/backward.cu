// Backward of the streaming attention KL, deterministic (no atomics): every gradient row is
// owned by one block, which sums its contributions in a fixed order.
//
// With p = exp(s − lse), p° = exp(s° − lse°) recomputed from the saved log-sum-exps and
// g = grad_kl:  dS_ij = g_i·(p_ij − p°_ij),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
// Two kernels over tiles of 64 slots of a partition (tiles past the set size write the
// zero gradient rows of the positions outside the set):
//   kl_dq_kernel  a block per query tile streams the key tiles of both passes; dS rows are
//                 p − p° (in [-1, 1]) and g_i multiplies the finished float32 row;
//   kl_dk_kernel  a block per key tile streams query tiles (the transposed problem, so the
//                 warp layout carries over); g varies along the streamed columns, so each
//                 tile's dSᵀ is divided by the tile's max |g| before its 16-bit copy and
//                 the product multiplied back in float32: a small g (a mean over B·L rows)
//                 never lands in float16's subnormals.
#include "attention_kl/common.cuh"

namespace dsa_ops {
namespace attention_kl {
namespace {


// Writes a warp's 16 × 8·NT float32 strip, row r times factor[r / 8 of the lane's pair], to
// the rows of `dst` at slots slot0 + r inside `set`, columns below `columns`.
template <typename T, int NT>
__device__ void store_scaled_rows(const Rows<T>& dst, const SampleRowSet& set, int sample,
                                  int slot0, int columns, const float (&acc)[NT][4],
                                  const float (&factor)[2]) {
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
        const int col = lane.col(j, e);
        if (col < columns) row[col] = DTypeTraits<T>::from_float(acc[j][e] * factor[i]);
      }
    }
  }
}

// p − p° of a score pair against its row's log-sum-exps (+inf off the set: 0).
__device__ inline float probability_gap(float s, float s_oracle, float lse, float lse_oracle) {
  return exp_difference(s - lse) - exp_difference(s_oracle - lse_oracle);
}

// ----------------------------------------------------------------------------- dQ
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kl_dq_kernel(const __grid_constant__ KlBackwardLaunch launch) {
  using Smem = KlSmem<T, D>;
  constexpr int kGradTiles = D / 8;
  const KlInputs& in = launch.in;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const KlTiles<T, D> tiles(smem);

  const int sample = blockIdx.y;
  const int length = in.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(in.queries, sample, length);
  const SampleRowSet keys(in.keys, sample, length);
  const Rows<T> grad_q = typed<T>(launch.grad_q);

  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, queries.size);
  if (outside_begin < tile_end) {
    masked_attention::zero_rows<T, D>(grad_q, queries, sample, outside_begin, tile_end, 0,
                                      in.qk_dim);
  }
  if (slot0 >= queries.size) return;
  const Rows<const T> k = typed<const T>(in.k), k_oracle = typed<const T>(in.k_oracle);
  tiles.load(true, typed<const T>(in.q), typed<const T>(in.q_oracle), queries, sample, slot0,
             min(kBlockRows, queries.size - slot0), in.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const int warp_slot0 = slot0 + warp * kWarpRows;
  const int64_t row_base = static_cast<int64_t>(sample) * length;
  float row_lse[2], row_lse_oracle[2], row_factor[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = warp_slot0 + lane.g + 8 * i;
    const bool inside = slot < queries.size;
    const int64_t at = inside ? row_base + queries.position(slot) : 0;
    row_lse[i] = inside ? launch.lse[at] : INFINITY;
    row_lse_oracle[i] = inside ? launch.lse_oracle[at] : INFINITY;
    row_factor[i] = inside ? in.scale * launch.grad_kl[at] : 0.f;
  }
  T* const strip = smem + Smem::kStrip + warp * kWarpRows * Smem::kStripPitch;

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int key0 = 0; key0 < keys.size; key0 += kBlockCols) {
    const int key_cols = min(kBlockCols, keys.size - key0);
    device::block_barrier();
    tiles.load(false, k, k_oracle, keys, sample, key0, key_cols, in.qk_dim);
    device::block_barrier();
    float s[kScoreTiles][4], s_oracle[kScoreTiles][4];
    tiles.scores(s, s_oracle, warp, in.scale);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = lane.col(j, e) < key_cols
                      ? probability_gap(s[j][e], s_oracle[j][e], row_lse[e / 2],
                                        row_lse_oracle[e / 2])
                      : 0.f;
      }
    }
    masked_attention::store_strip<T>(strip, Smem::kStripPitch, s);
    device::warp_barrier();
    masked_attention::warp_gemm<T, kBlockCols, kGradTiles, BLayout::kKN>(
        acc, strip, Smem::kStripPitch, tiles.streamed, Smem::kQkPitch);
  }
  store_scaled_rows<T>(grad_q, queries, sample, warp_slot0, in.qk_dim, acc, row_factor);
}

// ----------------------------------------------------------------------------- dK
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kl_dk_kernel(const __grid_constant__ KlBackwardLaunch launch) {
  using Smem = KlSmem<T, D>;
  constexpr int kGradTiles = D / 8;
  const KlInputs& in = launch.in;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const KlTiles<T, D> tiles(smem);
  // Per streamed query column: lse, lse° (+inf off the set) and g (0 off the set).
  float* const lse_s = reinterpret_cast<float*>(smem_raw + Smem::kElements * sizeof(T));
  float* const lse_oracle_s = lse_s + kBlockCols;
  float* const grad_s = lse_oracle_s + kBlockCols;

  const int sample = blockIdx.y;
  const int length = in.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(in.queries, sample, length);
  const SampleRowSet keys(in.keys, sample, length);
  const Rows<T> grad_k = typed<T>(launch.grad_k);

  const int tile_end = min(slot0 + kBlockRows, length);
  const int outside_begin = max(slot0, keys.size);
  if (outside_begin < tile_end) {
    masked_attention::zero_rows<T, D>(grad_k, keys, sample, outside_begin, tile_end, 0,
                                      in.qk_dim);
  }
  if (slot0 >= keys.size) return;
  const Rows<const T> q = typed<const T>(in.q), q_oracle = typed<const T>(in.q_oracle);
  tiles.load(true, typed<const T>(in.k), typed<const T>(in.k_oracle), keys, sample, slot0,
             min(kBlockRows, keys.size - slot0), in.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const int64_t row_base = static_cast<int64_t>(sample) * length;
  T* const strip = smem + Smem::kStrip + warp * kWarpRows * Smem::kStripPitch;

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int query0 = 0; query0 < queries.size; query0 += kBlockCols) {
    device::block_barrier();
    tiles.load(false, q, q_oracle, queries, sample, query0,
               min(kBlockCols, queries.size - query0), in.qk_dim);
    for (int c = threadIdx.x; c < kBlockCols; c += kThreads) {
      const bool inside = query0 + c < queries.size;
      const int64_t at = inside ? row_base + queries.position(query0 + c) : 0;
      lse_s[c] = inside ? launch.lse[at] : INFINITY;
      lse_oracle_s[c] = inside ? launch.lse_oracle[at] : INFINITY;
      grad_s[c] = inside ? launch.grad_kl[at] : 0.f;
    }
    device::block_barrier();
    float grad_max = 0.f;  // the same in every thread: the loop below is block-uniform
    for (int c = 0; c < kBlockCols; ++c) grad_max = fmaxf(grad_max, fabsf(grad_s[c]));
    if (!(grad_max > 0.f)) continue;  // no gradient through this query tile
    const float inverse = 1.f / grad_max;

    float s[kScoreTiles][4], s_oracle[kScoreTiles][4];
    tiles.scores(s, s_oracle, warp, in.scale);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = lane.col(j, e);
        // dSᵀ / max|g|; the padding columns have g = 0 and +inf lse's, hence 0.
        s[j][e] = grad_s[c] * inverse *
                  probability_gap(s[j][e], s_oracle[j][e], lse_s[c], lse_oracle_s[c]);
      }
    }
    masked_attention::store_strip<T>(strip, Smem::kStripPitch, s);
    device::warp_barrier();
    float tile_acc[kGradTiles][4];
    zero_fill(tile_acc);
    masked_attention::warp_gemm<T, kBlockCols, kGradTiles, BLayout::kKN>(
        tile_acc, strip, Smem::kStripPitch, tiles.streamed, Smem::kQkPitch);
#pragma unroll
    for (int j = 0; j < kGradTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = fmaf(grad_max, tile_acc[j][e], acc[j][e]);
    }
  }
  const float factor[2] = {in.scale, in.scale};
  store_scaled_rows<T>(grad_k, keys, sample, slot0 + warp * kWarpRows, in.qk_dim, acc, factor);
}

}  // namespace

cudaError_t launch_backward(const KlBackwardLaunch& launch, cudaStream_t stream) {
  const KlInputs& in = launch.in;
  if (in.batch == 0 || in.length == 0) return cudaSuccess;
  const dim3 grid((in.length + kBlockRows - 1) / kBlockRows, in.batch);
  cudaError_t status = cudaSuccess;
  masked_attention::dispatch_dtype(in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    masked_attention::dispatch_qk_dim(in.qk_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      constexpr int bytes = KlSmem<T, D>::kBackwardBytes;
      status = masked_attention::launch_with_smem(kl_dq_kernel<T, D>, grid, bytes, stream, launch);
      if (status != cudaSuccess) return;
      status = masked_attention::launch_with_smem(kl_dk_kernel<T, D>, grid, bytes, stream, launch);
    });
  });
  return status;
}

}  // namespace attention_kl
}  // namespace dsa_ops
