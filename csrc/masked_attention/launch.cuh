// Host-side entry points of the masked-attention kernels. Plain structs of pointers and
// strides (no ATen types), so the kernels compile without torch headers; the bindings in
// masked_attention/bindings.cpp check the tensors and fill these in.
//
// Each launch handles one or two "branches" (independent attention problems over the same
// batch and length, e.g. the cross and self branches of Dual Spatial Attention) in a
// single grid, so a whole DSA layer is one launch per kernel.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "device/kernel_args.h"

namespace dsa_ops {
namespace masked_attention {

// Dv the kernels accept (FUSED_V_DIMS in dsa_ops/ops/registry.py mirrors these; Dqk:
// kMinQkDim..kMaxQkDim of device/kernel_args.h). A forward block holds a V width of 64, 128 or 256
// columns for 16-bit dtypes (Dv in (256, 512] in two parts), 64 for float32 (forward.cuh); the
// backward's split is described in backward.cuh.
constexpr int kMinVDim = 8;
constexpr int kMaxVDim = 512;
constexpr int kMaxBranches = 2;

struct ForwardBranch {
  MatrixArg q, k, v;       // inputs
  MatrixArg out;           // (B, L, Dv) output, written entirely (zeros off the query set)
  float* lse = nullptr;    // (B, L) contiguous, written entirely (+inf off the query set)
  RowSetArg queries, keys;
};

struct ForwardLaunch {
  ForwardBranch branch[kMaxBranches];
  int branches = 1;
  ScalarKind dtype = ScalarKind::kFloat32;
  int batch = 0, length = 0, qk_dim = 0, v_dim = 0;
  float scale = 1.f;
  // Set by launch_forward (callers leave it): the shared memory of one SM, which decides
  // whether two blocks of 128-key tiles fit on one (forward.cuh).
  int shared_memory_per_sm = 0;
};

struct BackwardBranch {
  MatrixArg grad_out, q, k, v, out;  // inputs
  const float* lse = nullptr;        // (B, L) contiguous, from the forward
  MatrixArg grad_q, grad_k, grad_v;  // outputs, written entirely (zeros off the sets)
  float* workspace = nullptr;        // backward_workspace_floats(...) float32 scratch
  RowSetArg queries, keys;
};

struct BackwardLaunch {
  BackwardBranch branch[kMaxBranches];
  int branches = 1;
  ScalarKind dtype = ScalarKind::kFloat32;
  int batch = 0, length = 0, qk_dim = 0, v_dim = 0;
  float scale = 1.f;
};

// Both return the first CUDA error met while launching (cudaSuccess otherwise).
cudaError_t launch_forward(const ForwardLaunch& launch, cudaStream_t stream);
cudaError_t launch_backward(const BackwardLaunch& launch, cudaStream_t stream);

// Floats of BackwardBranch::workspace per branch: Δ = rowsum(dO∘O) per query slot, the key
// side's partial dQ arrays (backward.cuh: dq_partials) and, when it splits V into column
// chunks, their partial dK.
int64_t backward_workspace_floats(ScalarKind dtype, int batch, int length, int qk_dim, int v_dim);

}  // namespace masked_attention
}  // namespace dsa_ops
