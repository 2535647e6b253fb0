// Host-side entry points of the streaming attention-KL kernels: KL(E_oracle‖E) per query
// row from the q, k of two passes (prediction and oracle) over the same query and key
// sets, with no L×L map (dsa_ops.attention_kl). Plain structs of pointers and strides, no
// ATen types; attention_kl/bindings.cpp checks the tensors and fills these in.
//
// Per query row i (keys j of its sample's key set, s = scale·q·kᵀ, s° = scale·q°·k°ᵀ):
//   KL_i = Σ_j p°_ij (s°_ij − s_ij) − lse°_i + lse_i,   ∂KL_i/∂s_ij = p_ij − p°_ij.
// Rows that are no query or have no keys: kl 0, lse = lse° = +inf, zero gradients.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "device/kernel_args.h"

namespace dsa_ops {
namespace attention_kl {

// Head sizes: kMinQkDim..kMaxQkDim of device/kernel_args.h (zero-padded to 16, 32 or 64).

// The four (B, L, Dqk) inputs, unit stride along Dqk, all of one dtype.
struct KlInputs {
  MatrixArg q, k, q_oracle, k_oracle;
  RowSetArg queries, keys;
  ScalarKind dtype = ScalarKind::kFloat32;
  int batch = 0, length = 0, qk_dim = 0;
  float scale = 1.f;
};

struct KlForwardLaunch {
  KlInputs in;
  // (B, L) float32 contiguous, written entirely.
  float* kl = nullptr;
  float* lse = nullptr;
  float* lse_oracle = nullptr;
};

struct KlBackwardLaunch {
  KlInputs in;
  const float* grad_kl = nullptr;     // (B, L) float32 contiguous
  const float* lse = nullptr;         // (B, L) float32 contiguous, from the forward
  const float* lse_oracle = nullptr;  // likewise
  MatrixArg grad_q, grad_k;           // (B, L, Dqk) in the input dtype, written entirely
};

// Both return the first CUDA error met while launching (cudaSuccess otherwise).
cudaError_t launch_forward(const KlForwardLaunch& launch, cudaStream_t stream);
cudaError_t launch_backward(const KlBackwardLaunch& launch, cudaStream_t stream);

}  // namespace attention_kl
}  // namespace dsa_ops
