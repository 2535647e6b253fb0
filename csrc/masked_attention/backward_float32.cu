// The float32 kernels of the masked-attention backward, one file per dtype so that ninja
// builds them in parallel (backward.cuh: the kernels; backward.cu: the dtype dispatch).
#include "masked_attention/backward.cuh"

template cudaError_t dsa_ops::masked_attention::launch_backward_for<float>(
    const dsa_ops::masked_attention::BackwardLaunch&, cudaStream_t);
