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
#include "attention_kl/tiles.cuh"

namespace dsa_ops {
namespace attention_kl {
namespace {

// p − p° of a score pair against its row's log-sum-exps (+inf off the set: 0).
__device__ inline float probability_gap(float s, float s_oracle, float lse, float lse_oracle) {
  return exp_difference(s - lse) - exp_difference(s_oracle - lse_oracle);
}

// What both gradient kernels share: the block's own 64 slots of `own` (queries for dQ,
// keys for dK) and of the streamed set, the zero rows of `grad` past the own set's size,
// the own rows of both passes gathered, and float32's per-warp strip scratch.
template <typename T, int D>
struct GradientBlock {
  using Smem = KlSmem<T, D>;
  KlTiles<T, D> tiles;
  T* strip;  // float32's scratch for the warp's gradient strip (unused for 16-bit)
  SampleRowSet own, streamed;
  int sample, slot0, warp;
  bool active;  // false: no own rows in this tile, the block is done

  __device__ GradientBlock(unsigned char* smem_raw, const KlInputs& in, bool own_are_queries,
                           const MatrixArg& grad)
      : tiles(reinterpret_cast<T*>(smem_raw)),
        strip(reinterpret_cast<T*>(smem_raw) + Smem::kStrip +
              (threadIdx.x / 32) * Smem::kStripScratch),
        own(own_are_queries ? in.queries : in.keys, blockIdx.y, in.length),
        streamed(own_are_queries ? in.keys : in.queries, blockIdx.y, in.length),
        sample(blockIdx.y), slot0(blockIdx.x * kBlockRows), warp(threadIdx.x / 32) {
    const int tile_end = min(slot0 + kBlockRows, in.length);
    const int outside_begin = max(slot0, own.size);
    if (outside_begin < tile_end) {
      zero_rows<T, D>(typed<T>(grad), own, sample, outside_begin, tile_end, 0,
                                        in.qk_dim);
    }
    active = slot0 < own.size;
    if (!active) return;
    tiles.load(true, typed<const T>(own_are_queries ? in.q : in.k),
               typed<const T>(own_are_queries ? in.q_oracle : in.k_oracle), own, sample, slot0,
               min(kBlockRows, own.size - slot0), in.qk_dim);
  }

  // The calling warp's 16 own rows of the prediction tile: read by no other warp, so once its
  // last product is done they stage its gradient strip (store_rows).
  __device__ T* own_rows_of_warp() const { return tiles.own + warp * kWarpRows * Smem::kQkPitch; }

  // acc += (the warp's gradient strip, rounded to T) · streamed rows of the prediction.
  template <int NT>
  __device__ void accumulate(float (&acc)[NT][4], const float (&strip_values)[kScoreTiles][4]) const {
    warp_gemm_acc_a<T, kScoreTiles, NT, BLayout::kKN>(
        acc, strip_values, tiles.streamed, Smem::kQkPitch, strip);
  }
};

// ----------------------------------------------------------------------------- dQ
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kl_dq_kernel(const __grid_constant__ KlBackwardLaunch launch) {
  constexpr int kGradTiles = D / 8;
  const KlInputs& in = launch.in;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  const GradientBlock<T, D> block(smem_raw, in, true, launch.grad_q);
  if (!block.active) return;
  const SampleRowSet& queries = block.own;
  const SampleRowSet& keys = block.streamed;

  const LaneCoords lane;
  const int warp_slot0 = block.slot0 + block.warp * kWarpRows;
  const int64_t row_base = static_cast<int64_t>(block.sample) * in.length;
  float row_lse[2], row_lse_oracle[2], row_grad[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = warp_slot0 + lane.g + 8 * i;
    const bool inside = slot < queries.size;
    const int64_t at = inside ? row_base + queries.position(slot) : 0;
    row_lse[i] = inside ? launch.lse[at] : INFINITY;
    row_lse_oracle[i] = inside ? launch.lse_oracle[at] : INFINITY;
    row_grad[i] = inside ? launch.grad_kl[at] : 0.f;
  }
  const Rows<const T> k = typed<const T>(in.k), k_oracle = typed<const T>(in.k_oracle);

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int key0 = 0; key0 < keys.size; key0 += kBlockCols) {
    const int key_cols = min(kBlockCols, keys.size - key0);
    device::block_barrier();
    block.tiles.load(false, k, k_oracle, keys, block.sample, key0, key_cols, in.qk_dim);
    device::block_barrier();
    float s[kScoreTiles][4], s_oracle[kScoreTiles][4];
    block.tiles.scores(s, s_oracle, block.warp, in.scale);
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
    block.accumulate(acc, s);
  }
#pragma unroll
  for (int j = 0; j < kGradTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] *= row_grad[e / 2];
  }
  device::block_barrier();  // other threads' copies into the own rows that stage the strip
  store_rows<T>(typed<T>(launch.grad_q), queries, block.sample, warp_slot0, 0,
                                  in.qk_dim, acc, in.scale, block.own_rows_of_warp(),
                                  GradientBlock<T, D>::Smem::kQkPitch);
}

// ----------------------------------------------------------------------------- dK
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kl_dk_kernel(const __grid_constant__ KlBackwardLaunch launch) {
  using Smem = KlSmem<T, D>;
  constexpr int kGradTiles = D / 8;
  const KlInputs& in = launch.in;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  const GradientBlock<T, D> block(smem_raw, in, false, launch.grad_k);
  if (!block.active) return;
  const SampleRowSet& keys = block.own;
  const SampleRowSet& queries = block.streamed;
  // Per streamed query column: lse, lse° (+inf off the set) and g (0 off the set).
  float* const lse_s = reinterpret_cast<float*>(smem_raw + Smem::kElements * sizeof(T));
  float* const lse_oracle_s = lse_s + kBlockCols;
  float* const grad_s = lse_oracle_s + kBlockCols;

  const LaneCoords lane;
  const int64_t row_base = static_cast<int64_t>(block.sample) * in.length;
  const Rows<const T> q = typed<const T>(in.q), q_oracle = typed<const T>(in.q_oracle);

  float acc[kGradTiles][4];
  zero_fill(acc);
  for (int query0 = 0; query0 < queries.size; query0 += kBlockCols) {
    device::block_barrier();
    block.tiles.load(false, q, q_oracle, queries, block.sample, query0,
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
    block.tiles.scores(s, s_oracle, block.warp, in.scale);
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
    float tile_acc[kGradTiles][4];
    zero_fill(tile_acc);
    block.accumulate(tile_acc, s);
#pragma unroll
    for (int j = 0; j < kGradTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = fmaf(grad_max, tile_acc[j][e], acc[j][e]);
    }
  }
  device::block_barrier();  // other threads' copies into the own rows that stage the strip
  store_rows<T>(typed<T>(launch.grad_k), keys, block.sample,
                                  block.slot0 + block.warp * kWarpRows, 0, in.qk_dim, acc,
                                  in.scale, block.own_rows_of_warp(),
                                  GradientBlock<T, D>::Smem::kQkPitch);
}

}  // namespace

cudaError_t launch_backward(const KlBackwardLaunch& launch, cudaStream_t stream) {
  if (launch.in.batch == 0 || launch.in.length == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_kernel(launch.in, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    constexpr int bytes = KlSmem<T, D>::kBackwardBytes;
    const dim3 grid = tile_grid(launch.in);
    status = launch_with_smem(kl_dq_kernel<T, D>, grid, bytes, stream, launch);
    if (status != cudaSuccess) return;
    status = launch_with_smem(kl_dk_kernel<T, D>, grid, bytes, stream, launch);
  });
  return status;
}

}  // namespace attention_kl
}  // namespace dsa_ops
