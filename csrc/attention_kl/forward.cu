// Forward of the streaming attention KL: kl, lse, lse_oracle per query row in one pass over
// the key tiles, no L×L buffer.
//
// Grid: x = tiles of 64 slots of the query partition (all L slots: tiles past the query
// count write kl 0 and +inf log-sum-exps for the non-query positions), y = sample. A block
// gathers its query rows of both passes once, then streams 64-key tiles of both passes.
// Each warp keeps, per row and in float32, the running max and exp-sum of both score rows
// (online softmax, natural units) and the oracle-weighted score gap
//   C = Σ_j exp(s°_j − m°)·(s°_j − s_j),
// rescaled with the oracle's running max. At the end
//   KL = C / l° − (m° + log l°) + (m + log l).
// The gap enters as s° − s, never as log p, so the KL stays exact where p underflows.
#include "attention_kl/tiles.cuh"

namespace dsa_ops {
namespace attention_kl {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
kl_forward_kernel(const __grid_constant__ KlForwardLaunch launch) {
  const KlInputs& in = launch.in;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  const KlTiles<T, D> tiles(reinterpret_cast<T*>(smem_raw));

  const int sample = blockIdx.y;
  const int length = in.length;
  const int slot0 = blockIdx.x * kBlockRows;
  const SampleRowSet queries(in.queries, sample, length);
  const SampleRowSet keys(in.keys, sample, length);
  const int64_t row_base = static_cast<int64_t>(sample) * length;

  // Slots of this tile outside the query set.
  const int tile_end = min(slot0 + kBlockRows, length);
  for (int s = max(slot0, queries.size) + threadIdx.x; s < tile_end; s += kThreads) {
    const int64_t at = row_base + queries.position(s);
    launch.kl[at] = 0.f;
    launch.lse[at] = INFINITY;
    launch.lse_oracle[at] = INFINITY;
  }
  if (slot0 >= queries.size) return;

  const Rows<const T> q = typed<const T>(in.q), k = typed<const T>(in.k),
                      q_oracle = typed<const T>(in.q_oracle), k_oracle = typed<const T>(in.k_oracle);
  tiles.load(true, q, q_oracle, queries, sample, slot0, min(kBlockRows, queries.size - slot0),
             in.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  OnlineSoftmaxRows prediction, oracle;
  float gap[2] = {0.f, 0.f};  // this lane's share of C

  for (int key0 = 0; key0 < keys.size; key0 += kBlockCols) {
    const int key_cols = min(kBlockCols, keys.size - key0);
    device::block_barrier();  // every warp is done with the previous key tiles
    tiles.load(false, k, k_oracle, keys, sample, key0, key_cols, in.qk_dim);
    device::block_barrier();

    float s[kScoreTiles][4], s_oracle[kScoreTiles][4];
    tiles.scores(s, s_oracle, warp, in.scale);
    float tile_max[2] = {-INFINITY, -INFINITY}, tile_max_oracle[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (lane.col(j, e) >= key_cols) s[j][e] = s_oracle[j][e] = -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
        tile_max_oracle[e / 2] = fmaxf(tile_max_oracle[e / 2], s_oracle[j][e]);
      }
    }
    float shift[2], rescale[2], shift_oracle[2], rescale_oracle[2];
    prediction.advance(tile_max, shift, rescale);
    oracle.advance(tile_max_oracle, shift_oracle, rescale_oracle);
#pragma unroll
    for (int i = 0; i < 2; ++i) gap[i] *= rescale_oracle[i];
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2;
        prediction.sum[i] += exp_difference(s[j][e] - shift[i]);
        const float weight = exp_difference(s_oracle[j][e] - shift_oracle[i]);
        oracle.sum[i] += weight;
        // Padding columns: both scores are -inf (their gap is NaN) and the weight 0.
        if (lane.col(j, e) < key_cols) gap[i] += weight * (s_oracle[j][e] - s[j][e]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // Shuffles: every lane reduces, then only the rows inside the set are written.
    const float total = row_sum(prediction.sum[i]);
    const float total_oracle = row_sum(oracle.sum[i]);
    const float total_gap = row_sum(gap[i]);
    const int slot = slot0 + warp * kWarpRows + lane.g + 8 * i;
    if (slot >= queries.size || lane.t != 0) continue;
    const int64_t at = row_base + queries.position(slot);
    if (total > 0.f) {
      const float log_total = logf(total), log_total_oracle = logf(total_oracle);
      launch.lse[at] = prediction.max[i] + log_total;
      launch.lse_oracle[at] = oracle.max[i] + log_total_oracle;
      // The maxima subtracted first: the difference of two large lse's loses digits.
      launch.kl[at] = total_gap / total_oracle + (prediction.max[i] - oracle.max[i]) +
                      (log_total - log_total_oracle);
    } else {  // no keys
      launch.kl[at] = 0.f;
      launch.lse[at] = INFINITY;
      launch.lse_oracle[at] = INFINITY;
    }
  }
}

}  // namespace

cudaError_t launch_forward(const KlForwardLaunch& launch, cudaStream_t stream) {
  if (launch.in.batch == 0 || launch.in.length == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_kernel(launch.in, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    status = launch_with_smem(kl_forward_kernel<T, D>, tile_grid(launch.in),
                                                KlSmem<T, D>::kForwardBytes, stream, launch);
  });
  return status;
}

}  // namespace attention_kl
}  // namespace dsa_ops
