// launch_backward: the instantiation for the inputs' dtype (backward_<dtype>.cu), and the
// workspace it needs.
#include "masked_attention/backward.cuh"

namespace dsa_ops {
namespace masked_attention {

int64_t backward_workspace_floats(ScalarKind dtype, int batch, int length, int qk_dim, int v_dim) {
  int chunks = 1;
  dispatch_dtype(dtype, [&](auto tag) { chunks = key_v_chunks<typename decltype(tag)::type>(v_dim); });
  const int64_t rows = static_cast<int64_t>(batch) * length;
  const int64_t partial_dq = static_cast<int64_t>(chunks) * dq_partials(length, qk_dim) * rows * qk_dim;
  return rows + partial_dq + (chunks > 1 ? chunks * rows * qk_dim : 0);
}

cudaError_t launch_backward(const BackwardLaunch& request, cudaStream_t stream) {
  if (request.batch == 0 || request.length == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(request.dtype, [&](auto tag) {
    status = launch_backward_for<typename decltype(tag)::type>(request, stream);
  });
  return status;
}

}  // namespace masked_attention
}  // namespace dsa_ops
