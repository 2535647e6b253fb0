// One thread block per row. Each warp owns a contiguous slice of the row; a first pass
// counts the true entries of every slice, a block-wide exclusive scan of those counts
// gives each warp its write offsets, and a second pass writes positions using warp
// ballots, so the order of positions within each part is kept (a stable partition).
#include "partition/partition.cuh"

#include "device/primitives.cuh"

namespace dsa_ops {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 16;
constexpr int kThreads = kWarps * kWarpSize;

__global__ void partition_indices_kernel(const bool* __restrict__ mask, int64_t row_stride,
                                         int64_t col_stride, int32_t* __restrict__ index,
                                         int32_t* __restrict__ count, int64_t length) {
  DSA_STATIC_SHARED_ARRAY(int32_t, warp_true, kWarps);
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const bool* row_mask = mask + row * row_stride;
  int32_t* row_index = index + row * length;

  // Slices are whole multiples of the warp width so that ballots never straddle warps.
  const int64_t chunks = (length + kWarpSize - 1) / kWarpSize;
  const int64_t chunks_per_warp = (chunks + kWarps - 1) / kWarps;
  const int64_t begin = min(length, warp * chunks_per_warp * kWarpSize);
  const int64_t end = min(length, begin + chunks_per_warp * kWarpSize);

  int32_t trues = 0;
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t pos = base + lane;
    const bool flag = pos < end && row_mask[pos * col_stride];
    trues += device::popcount(device::ballot(flag));
  }
  if (lane == 0) warp_true[warp] = trues;
  device::block_barrier();

  int32_t true_before = 0, total_true = 0;
  for (int w = 0; w < kWarps; ++w) {
    true_before += w < warp ? warp_true[w] : 0;
    total_true += warp_true[w];
  }
  // Positions before this slice that are false: everything before it minus the trues.
  int32_t next_true = true_before;
  int32_t next_false = total_true + static_cast<int32_t>(begin) - true_before;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t pos = base + lane;
    const bool in_range = pos < end;
    const bool flag = in_range && row_mask[pos * col_stride];
    const unsigned true_ballot = device::ballot(flag);
    const unsigned false_ballot = device::ballot(in_range && !flag);
    if (in_range) {
      const int32_t slot = flag ? next_true + device::popcount(true_ballot & lanes_below)
                                : next_false + device::popcount(false_ballot & lanes_below);
      row_index[slot] = static_cast<int32_t>(pos);
    }
    next_true += device::popcount(true_ballot);
    next_false += device::popcount(false_ballot);
  }
  if (threadIdx.x == 0) count[row] = total_true;
}

}  // namespace

cudaError_t launch_partition_indices(const bool* mask, int64_t mask_row_stride,
                                     int64_t mask_col_stride, int32_t* index, int32_t* count,
                                     int64_t batch, int64_t length, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return device::launch(partition_indices_kernel, dim3(static_cast<unsigned>(batch)), kThreads, 0,
                        stream, mask, mask_row_stride, mask_col_stride, index, count, length);
}

}  // namespace dsa_ops
