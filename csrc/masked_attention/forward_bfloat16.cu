// The bfloat16 kernels of the masked-attention forward, one file per dtype so that ninja
// builds them in parallel (forward.cuh: the kernels; forward.cu: the dtype dispatch).
#include "masked_attention/forward.cuh"

template cudaError_t dsa_ops::masked_attention::launch_forward_for<__nv_bfloat16>(
    const dsa_ops::masked_attention::ForwardLaunch&, cudaStream_t);
