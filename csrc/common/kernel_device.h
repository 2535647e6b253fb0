// Where the bindings' kernels run: CUDA tensors on a GPU (nvcc build), or CPU tensors
// through the host emulation (-DDSA_OPS_HOST_EMULATION, the emulated "cuda" backend).
// Every op's bindings.cpp is written once against this.
#pragma once

#include <limits>

#include <ATen/core/Tensor.h>

#ifdef DSA_OPS_HOST_EMULATION
#include <cuda_runtime.h>

namespace dsa_ops::emulation {
const char* last_error_message();  // emulation/emulation.h, without its CUDA-keyword macros
}
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dsa_ops {

#ifdef DSA_OPS_HOST_EMULATION
#define DSA_OPS_KERNEL_DISPATCH_KEY CPU
constexpr const char* kKernelTensors = "a CPU tensor (emulated CUDA kernels)";

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const c10::Device&) {}
};

inline cudaStream_t kernel_stream() { return nullptr; }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": emulated CUDA kernel failed: ",
              emulation::last_error_message());
}

// Outputs start as NaN (integers: INT32_MIN), so an element the kernels never write shows.
inline at::Tensor kernel_output(at::Tensor t) {
  if (at::isFloatingType(t.scalar_type())) return t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t.fill_(std::numeric_limits<int32_t>::min());
}
#else
#define DSA_OPS_KERNEL_DISPATCH_KEY CUDA
constexpr const char* kKernelTensors = "a CUDA tensor";

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }

using KernelDeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t kernel_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline void check_launch(cudaError_t status, const char* /*op*/) { C10_CUDA_CHECK(status); }

inline at::Tensor kernel_output(at::Tensor t) { return t; }
#endif

}  // namespace dsa_ops
