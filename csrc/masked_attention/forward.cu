// launch_forward: the instantiation for the inputs' dtype (forward_<dtype>.cu).
#include "masked_attention/forward.cuh"

namespace dsa_ops {
namespace masked_attention {

cudaError_t launch_forward(const ForwardLaunch& launch, cudaStream_t stream) {
  if (launch.batch == 0 || launch.length == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(launch.dtype, [&](auto tag) {
    status = launch_forward_for<typename decltype(tag)::type>(launch, stream);
  });
  return status;
}

}  // namespace masked_attention
}  // namespace dsa_ops
