// CUDA implementations of the ops whose schemas dsa_ops/ops.py defines. Each binding
// checks what its kernel assumes, allocates outputs and launches on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "partition.cuh"

namespace dsa_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> partition_indices_cuda(const at::Tensor& mask) {
  TORCH_CHECK(mask.is_cuda(), "partition_indices: mask must be a CUDA tensor, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "partition_indices: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, "partition_indices: mask must have shape (B, L), got ", mask.sizes());
  TORCH_CHECK(mask.size(1) <= std::numeric_limits<int32_t>::max(),
              "partition_indices: L must fit in int32, got ", mask.size(1));
  const c10::cuda::CUDAGuard guard(mask.device());
  auto index = at::empty(mask.sizes(), mask.options().dtype(at::kInt));
  auto count = at::empty({mask.size(0)}, mask.options().dtype(at::kInt));
  launch_partition_indices(mask.data_ptr<bool>(), mask.stride(0), mask.stride(1),
                           index.data_ptr<int32_t>(), count.data_ptr<int32_t>(), mask.size(0),
                           mask.size(1), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, CUDA, m) {
  m.impl("partition_indices", &partition_indices_cuda);
}

}  // namespace dsa_ops
