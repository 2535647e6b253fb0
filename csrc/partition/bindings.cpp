// partition_indices for the kernels' dispatch key (the schema is in
// dsa_ops/ops/partition/op.py), and the partition_of every op's bindings start from (common/partition.h).
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/kernel_device.h"
#include "common/partition.h"
#include "partition/partition.cuh"

namespace dsa_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> partition_indices_cuda(const at::Tensor& mask) {
  TORCH_CHECK(on_kernel_device(mask), "partition_indices: mask must be ", kKernelTensors, ", got ",
              mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "partition_indices: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, "partition_indices: mask must have shape (B, L), got ", mask.sizes());
  TORCH_CHECK(mask.size(1) <= std::numeric_limits<int32_t>::max(),
              "partition_indices: L must fit in int32, got ", mask.size(1));
  const KernelDeviceGuard guard(mask.device());
  auto index = new_output(mask, mask.sizes(), at::kInt);
  auto count = new_output(mask, {mask.size(0)}, at::kInt);
  check_launch(launch_partition_indices(mask.data_ptr<bool>(), mask.stride(0), mask.stride(1),
                                        index.data_ptr<int32_t>(), count.data_ptr<int32_t>(),
                                        mask.size(0), mask.size(1), kernel_stream()),
               "partition_indices");
  return {index, count};
}

}  // namespace

Partition partition_of(const at::Tensor& mask) {
  auto [index, count] = partition_indices_cuda(mask);
  return {index, count};
}

TORCH_LIBRARY_IMPL(dsa_ops, DSA_OPS_KERNEL_DISPATCH_KEY, m) {
  m.impl("partition_indices", &partition_indices_cuda);
}

}  // namespace dsa_ops
