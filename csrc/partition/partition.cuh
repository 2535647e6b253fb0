// Stable partition of boolean mask rows into index lists (the compaction step of the
// fused masked-attention backends). No autograd, no Python: launch helpers only.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsa_ops {

// mask: (batch, length) bool, row-major with the given row stride (elements).
// index: (batch, length) int32, contiguous: the true positions of each row in
//        increasing order, then the false positions in increasing order.
// count: (batch,) int32: the number of true positions per row.
// Returns the launch's CUDA error (cudaSuccess otherwise).
cudaError_t launch_partition_indices(const bool* mask, int64_t mask_row_stride,
                                     int64_t mask_col_stride, int32_t* index, int32_t* count,
                                     int64_t batch, int64_t length, cudaStream_t stream);

}  // namespace dsa_ops
