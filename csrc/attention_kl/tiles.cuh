// Device-side pieces shared by the attention-KL forward and backward: the shared-memory
// layout (the block's own 64-row tiles and the streamed 64-row tiles, each for both passes)
// and the scores of both passes for a warp's strip. Tile loads, the warp GEMM (tensor cores
// for 16-bit dtypes, FMA for float32), the online softmax and the row-set addressing are the
// shared tile layer's (csrc/device/).
#pragma once

#include "attention_kl/launch.cuh"
#include "device/kernel.cuh"

namespace dsa_ops {
namespace attention_kl {

using namespace device;  // the shared tile layer, which these kernels are written in

constexpr int kScoreTiles = kBlockCols / 8;  // n-tiles of a warp's 16 × 64 score strip
static_assert(kBlockRows == kBlockCols, "own and streamed tiles share one loader");

// Own rows (the block's 64 slots) and streamed rows (64 slots per step), prediction and
// oracle each, Dqk wide; then the backward's per-warp scratch for its gradient strip
// (float32 only: 16-bit strips stay in registers, warp_gemm_acc_a) and three float32
// statistics per streamed column.
template <typename T, int D>
struct KlSmem {
  static constexpr int kQkPitch = padded_pitch<T>(D);
  static constexpr int kStripScratch = acc_a_scratch_elements<T, kScoreTiles>();  // per warp
  static constexpr int kOwn = 0;
  static constexpr int kOwnOracle = kOwn + kBlockRows * kQkPitch;
  static constexpr int kStreamed = kOwnOracle + kBlockRows * kQkPitch;
  static constexpr int kStreamedOracle = kStreamed + kBlockCols * kQkPitch;
  static constexpr int kStrip = kStreamedOracle + kBlockCols * kQkPitch;
  static constexpr int kForwardBytes = kStrip * static_cast<int>(sizeof(T));
  static constexpr int kElements = kStrip + kWarps * kStripScratch;
  static constexpr int kStatsFloats = 3 * kBlockCols;
  static constexpr int kBackwardBytes = kElements * static_cast<int>(sizeof(T)) +
                                        kStatsFloats * static_cast<int>(sizeof(float));
};

// The four tiles of one block in shared memory.
template <typename T, int D>
struct KlTiles {
  using Smem = KlSmem<T, D>;
  T* own;
  T* own_oracle;
  T* streamed;
  T* streamed_oracle;

  __device__ explicit KlTiles(T* smem)
      : own(smem + Smem::kOwn), own_oracle(smem + Smem::kOwnOracle),
        streamed(smem + Smem::kStreamed), streamed_oracle(smem + Smem::kStreamedOracle) {}

  // Gathers `rows` slots from slot0 of `set` into the own (or streamed) tiles, both passes.
  __device__ void load(bool own_rows, const Rows<const T>& x, const Rows<const T>& x_oracle,
                       const SampleRowSet& set, int sample, int slot0, int rows,
                       int qk_dim) const {
    T* const dst = own_rows ? own : streamed;
    T* const dst_oracle = own_rows ? own_oracle : streamed_oracle;
    load_tile<T, kBlockRows, D>(dst, Smem::kQkPitch, x, set, sample, slot0, rows,
                                                  0, qk_dim);
    load_tile<T, kBlockRows, D>(dst_oracle, Smem::kQkPitch, x_oracle, set,
                                                  sample, slot0, rows, 0, qk_dim);
  }

  // scale·(own · streamedᵀ) for the calling warp's 16 own rows × the 64 streamed rows,
  // prediction into `s`, oracle into `s_oracle`. All 32 lanes must call.
  __device__ void scores(float (&s)[kScoreTiles][4], float (&s_oracle)[kScoreTiles][4], int warp,
                         float scale) const {
    const int offset = warp * kWarpRows * Smem::kQkPitch;
    zero_fill(s);
    zero_fill(s_oracle);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(s, own + offset, Smem::kQkPitch,
                                                                 streamed, Smem::kQkPitch);
    warp_gemm<T, D, kScoreTiles, BLayout::kNK>(
        s_oracle, own_oracle + offset, Smem::kQkPitch, streamed_oracle, Smem::kQkPitch);
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] *= scale;
        s_oracle[j][e] *= scale;
      }
    }
  }
};

// Grid of every KL kernel: x = 64-slot tiles of a partition (all L slots), y = sample.
inline dim3 tile_grid(const KlInputs& in) {
  return dim3((in.length + kBlockRows - 1) / kBlockRows, in.batch);
}

// Calls f(TypeTag<T>{}, integral_constant<int, D>{}) for the inputs' dtype and padded Dqk.
template <typename F>
void dispatch_kernel(const KlInputs& in, F&& f) {
  dispatch_dtype(in.dtype, [&](auto tag) {
    dispatch_qk_dim(in.qk_dim, [&](auto dim) { f(tag, dim); });
  });
}

}  // namespace attention_kl
}  // namespace dsa_ops
