// Stand-in for ATen's philox unpack (FA2's dropout path, never taken in fa2_forward.cu).
#pragma once

#include <tuple>

#include <ATen/cuda/PhiloxCudaState.h>

namespace at {
namespace cuda {
namespace philox {
__host__ __device__ __forceinline__ std::tuple<uint64_t, uint64_t> unpack(at::PhiloxCudaState arg) {
  return std::make_tuple(arg.seed_.val, arg.offset_.val + arg.offset_intragraph_);
}
}  // namespace philox
}  // namespace cuda
}  // namespace at
