// Host-side dispatch shared by every op's launchers: runtime dtype and padded head size to
// template arguments, and a launch that raises the kernel's dynamic shared-memory limit.
#pragma once

#include <type_traits>

#include "device/kernel_args.h"
#include "device/primitives.cuh"
#include "device/tiles.cuh"

namespace dsa_ops {
namespace device {

// Dispatch the padded head size (padded_qk_dim: 16, 32 or 64) to a template parameter.
template <typename F>
void dispatch_qk_dim(int qk_dim, F&& f) {
  switch (padded_qk_dim(qk_dim)) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, 64>{}); break;
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(ScalarKind dtype, F&& f) {
  switch (dtype) {
    case ScalarKind::kFloat32: f(TypeTag<float>{}); break;
    case ScalarKind::kFloat16: f(TypeTag<__half>{}); break;
    case ScalarKind::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
  }
}

// Raises the dynamic shared-memory limit of a kernel (needed above 48 KiB) and launches
// THREADS threads per block.
template <int THREADS = kThreads, typename Kernel, typename... Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream,
                             Args... args) {
  const cudaError_t status = device::ensure_dynamic_shared_memory(kernel, smem_bytes);
  if (status != cudaSuccess) return status;
  return device::launch(kernel, grid, THREADS, smem_bytes, stream, args...);
}

}  // namespace device
}  // namespace dsa_ops
