// Forward of masked attention: out = softmax(scale·Q Kᵀ) V over each sample's query and key
// sets, FlashAttention-2 style (online softmax, no L×L buffer).
//
// Grid: x = tiles of 64 slots of the query partition (all L slots, so the tiles past the
// query count write the zero rows and +inf log-sum-exps of the non-query positions and
// no separate zero-fill pass is needed), y = sample, z = branch × V chunk. A block loads
// its gathered query rows once, then streams 64-key tiles of the gathered keys: S = Q·Kᵀ
// (tensor cores for 16-bit dtypes), running max / sum in float32 registers in natural units
// (exp2 of differences, exp_difference), P·V accumulated in float32 for its 64 columns of V. Each V chunk recomputes Q·Kᵀ: Dqk ≤ 64 makes that cheap next to P·V.
#include "masked_attention/common.cuh"

namespace dsa_ops {
namespace masked_attention {
namespace {

template <typename T, int D>
struct ForwardSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kVPitch = padded_pitch<T>(kVChunk);
  static constexpr int kPPitch = padded_pitch<T>(kBlockCols);
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockRows * kQkPitch;
  static constexpr int kV = kK + kBlockCols * kQkPitch;
  static constexpr int kP = kV + kBlockCols * kVPitch;
  static constexpr int kElements = kP + kBlockRows * kPPitch;
  static constexpr int kBytes = kElements * static_cast<int>(sizeof(T));
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const __grid_constant__ ForwardLaunch launch) {
  using Traits = DTypeTraits<T>;
  using Smem = ForwardSmem<T, D>;
  constexpr int kScoreTiles = kBlockCols / 8;
  constexpr int kOutTiles = kVChunk / 8;
  DSA_DYNAMIC_SHARED_MEMORY(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const q_s = smem + Smem::kQ;
  T* const k_s = smem + Smem::kK;
  T* const v_s = smem + Smem::kV;
  T* const p_s = smem + Smem::kP;

  const int v_chunks = (launch.v_dim + kVChunk - 1) / kVChunk;
  const int branch_id = blockIdx.z / v_chunks;
  const int col0 = (blockIdx.z % v_chunks) * kVChunk;
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
    zero_rows<T, kVChunk>(out, queries, sample, outside_begin, tile_end, col0, launch.v_dim);
    if (col0 == 0) {
      for (int s = outside_begin + threadIdx.x; s < tile_end; s += kThreads) {
        lse[queries.position(s)] = INFINITY;
      }
    }
  }
  if (slot0 >= queries.size) return;
  const int query_rows = min(kBlockRows, queries.size - slot0);

  load_tile<T, kBlockRows, D>(q_s, Smem::kQkPitch, q, queries, sample, slot0, query_rows, 0,
                              launch.qk_dim);

  const int warp = threadIdx.x / 32;
  const LaneCoords lane;
  const float scale = launch.scale;
  const T* const q_warp = q_s + warp * kWarpRows * Smem::kQkPitch;
  T* const p_warp = p_s + warp * kWarpRows * Smem::kPPitch;

  float row_max_score[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp's strip
  float row_sum_part[2] = {0.f, 0.f};              // this lane's share of the row sums
  float acc[kOutTiles][4];
  zero_fill(acc);

  for (int key0 = 0; key0 < keys.size; key0 += kBlockCols) {
    const int key_cols = min(kBlockCols, keys.size - key0);
    device::block_barrier();  // every warp is done with the previous K, V tiles
    load_tile<T, kBlockCols, D>(k_s, Smem::kQkPitch, k, keys, sample, key0, key_cols, 0,
                                launch.qk_dim);
    load_tile<T, kBlockCols, kVChunk>(v_s, Smem::kVPitch, v, keys, sample, key0, key_cols, col0,
                                      launch.v_dim);
    device::block_barrier();

    float s[kScoreTiles][4];
    zero_fill(s);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(s, q_warp, Smem::kQkPitch, k_s, Smem::kQkPitch);

    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = lane.col(j, e) < key_cols ? s[j][e] * scale : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
      }
    }
    float rescale[2], shift[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float new_max = fmaxf(row_max_score[i], row_max(tile_max[i]));
      // A row that has seen only -inf scores keeps a finite shift so exp2 never sees
      // (-inf) - (-inf).
      shift[i] = new_max == -INFINITY ? 0.f : new_max;
      rescale[i] = exp_difference(row_max_score[i] - shift[i]);
      row_max_score[i] = new_max;
      row_sum_part[i] *= rescale[i];
    }
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp_difference(s[j][e] - shift[e / 2]);
        row_sum_part[e / 2] += s[j][e];
      }
    }
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] *= rescale[e / 2];
    }
    warp_gemm_acc_a<T, kScoreTiles, kOutTiles, BLayout::kKN>(acc, s, v_s, Smem::kVPitch, p_warp);
  }

  // Normalise and scatter the rows back to their positions.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float total = row_sum(row_sum_part[i]);
    const int slot = slot0 + warp * kWarpRows + lane.g + 8 * i;
    if (slot >= queries.size) continue;
    const int position = queries.position(slot);
    const float inverse = total > 0.f ? 1.f / total : 0.f;  // no keys: zero row
    T* const out_row = out.row(sample, position);
#pragma unroll
    for (int j = 0; j < kOutTiles; ++j) {
#pragma unroll
      for (int e = 2 * i; e < 2 * i + 2; ++e) {
        const int col = col0 + lane.col(j, e);
        if (col < launch.v_dim) out_row[col] = Traits::from_float(acc[j][e] * inverse);
      }
    }
    if (col0 == 0 && lane.t == 0) {
      lse[position] = total > 0.f ? row_max_score[i] + logf(total) : INFINITY;
    }
  }
}

}  // namespace

cudaError_t launch_forward(const ForwardLaunch& launch, cudaStream_t stream) {
  if (launch.batch == 0 || launch.length == 0) return cudaSuccess;
  const int v_chunks = (launch.v_dim + kVChunk - 1) / kVChunk;
  const dim3 grid((launch.length + kBlockRows - 1) / kBlockRows, launch.batch,
                  v_chunks * launch.branches);
  cudaError_t status = cudaSuccess;
  dispatch_dtype(launch.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_qk_dim(launch.qk_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      status = launch_with_smem(forward_kernel<T, D>, grid, ForwardSmem<T, D>::kBytes, stream,
                                launch);
    });
  });
  return status;
}

}  // namespace masked_attention
}  // namespace dsa_ops
