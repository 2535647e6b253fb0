// launch_forward: the instantiation for the inputs' dtype (forward_<dtype>.cu).
#include "masked_attention/forward.cuh"

namespace dsa_ops {
namespace masked_attention {

cudaError_t launch_forward(const ForwardLaunch& request, cudaStream_t stream) {
  if (request.batch == 0 || request.length == 0) return cudaSuccess;
  ForwardLaunch launch = request;
  launch.shared_memory_per_sm = device::shared_memory_per_multiprocessor();
  cudaError_t status = cudaSuccess;
  dispatch_dtype(launch.dtype, [&](auto tag) {
    status = launch_forward_for<typename decltype(tag)::type>(launch, stream);
  });
  return status;
}

}  // namespace masked_attention
}  // namespace dsa_ops
