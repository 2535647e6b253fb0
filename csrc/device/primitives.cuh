// Every low-level CUDA primitive the kernels use, behind one small interface with two
// implementations: nvcc builds the PTX below, a host build (-DDSA_OPS_HOST_EMULATION,
// g++) maps each primitive onto csrc/emulation/ so the same kernel source runs on the CPU.
// Kernels include this header and never spell asm, __shfl_*, __syncthreads, __shared__ or
// <<<...>>> themselves; threadIdx / blockIdx / blockDim / gridDim keep their CUDA names.
//
//   mma_m16n8k16<T>(c, a, b)            mma.sync.m16n8k16.row.col f32 += T·T, T = half/bf16
//   ldmatrix<N, TRANSPOSE>(r, row)      ldmatrix.m8n8.xN[.trans].b16: lane i gives row
//                                       i % 8 of matrix i / 8 (N = 1, 2, 4; 16-byte rows)
//   cp_async_16(smem, global)           16-byte cp.async.cg; lands at the wait that covers
//   cp_async_commit()                   its commit group, not before
//   cp_async_wait<N>()                  wait until at most N committed groups are pending
//   shfl_xor / shfl_idx / shfl_up / shfl_down, ballot, any, all   (whole warp), popcount
//   mul_rn(a, b)                        a·b rounded on its own: never contracted into an fma
//   block_barrier(), warp_barrier()     __syncthreads, __syncwarp
//   DSA_DYNAMIC_SHARED_MEMORY(name)     unsigned char* name: the launch's dynamic smem
//   DSA_STATIC_SHARED_ARRAY(T, name, n) T* name: n elements of static smem
//   allow_dynamic_shared_memory(kernel, bytes)   opt-in above 48 KiB
//   ensure_dynamic_shared_memory(kernel, bytes)  the same, once per kernel, device and size
//   max_dynamic_shared_memory()         bytes a block may opt into on the current device
//   shared_memory_per_multiprocessor()  bytes the blocks resident on one SM share
//   launch(kernel, grid, threads, smem_bytes, stream, args...) -> cudaError_t
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#ifdef DSA_OPS_HOST_EMULATION
#include "emulation/emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace dsa_ops {
namespace device {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kDefaultDynamicSharedBytes = 48 * 1024;  // usable without the opt-in

#ifndef DSA_OPS_HOST_EMULATION
// ============================================================================ nvcc
#define DSA_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#define DSA_STATIC_SHARED_ARRAY(T, name, n) __shared__ __align__(16) T name[n]

__device__ __forceinline__ void block_barrier() { __syncthreads(); }
__device__ __forceinline__ void warp_barrier() { __syncwarp(kFullWarp); }

// clang-format off
template <typename T> __device__ T shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(kFullWarp, v, lane_mask); }
template <typename T> __device__ T shfl_idx(T v, int source) { return __shfl_sync(kFullWarp, v, source); }
template <typename T> __device__ T shfl_up(T v, unsigned delta) { return __shfl_up_sync(kFullWarp, v, delta); }
template <typename T> __device__ T shfl_down(T v, unsigned delta) { return __shfl_down_sync(kFullWarp, v, delta); }
// clang-format on
__device__ __forceinline__ unsigned ballot(bool predicate) {
  return __ballot_sync(kFullWarp, predicate);
}
__device__ __forceinline__ bool any(bool predicate) { return __any_sync(kFullWarp, predicate); }
__device__ __forceinline__ bool all(bool predicate) { return __all_sync(kFullWarp, predicate); }
__device__ __forceinline__ int popcount(unsigned bits) { return __popc(bits); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16 takes float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

template <int N, bool TRANSPOSE>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t address = shared_address(row);
  if constexpr (N == 1 && !TRANSPOSE) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(address));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(address));
  } else if constexpr (N == 2 && !TRANSPOSE) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  } else if constexpr (!TRANSPOSE) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  }
}

__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               :: "r"(shared_address(shared)), "l"(global));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

inline cudaError_t current_device(int* device) { return cudaGetDevice(device); }

// An attribute of the current device; 0 when it cannot be read.
inline int current_device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess) {
    return 0;
  }
  return value;
}

inline int max_dynamic_shared_memory() {
  return current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// Shared memory of one SM (what the blocks resident on it share); 0 when unknown.
inline int shared_memory_per_multiprocessor() {
  return current_device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, threads, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

#else
// ============================================================================ host
// Each primitive is the emulation's; the planted faults (DSA_OPS_EMULATION_FAULT, for the
// test that shows the harness catches kernel bugs) alter what the kernel asked for here.
#define DSA_OPS_FAULT_NONE 0
#define DSA_OPS_FAULT_SWAP_A_FRAGMENT 1  // a kernel that packs A registers 1 and 2 swapped
#define DSA_OPS_FAULT_DROP_BARRIER 2     // a kernel missing its second __syncthreads
#ifndef DSA_OPS_EMULATION_FAULT
#define DSA_OPS_EMULATION_FAULT DSA_OPS_FAULT_NONE
#endif

#define DSA_DYNAMIC_SHARED_MEMORY(name) \
  unsigned char* const name = ::dsa_ops::emulation::dynamic_shared_memory()
#define DSA_STATIC_SHARED_ARRAY(T, name, n)  \
  static const char name##_declaration_site = 0; \
  T* const name = ::dsa_ops::emulation::static_shared_array<T>(&name##_declaration_site, (n))

inline void block_barrier() {
#if DSA_OPS_EMULATION_FAULT == DSA_OPS_FAULT_DROP_BARRIER
  if (emulation::block_barriers_passed() == 1) {
    emulation::skip_block_barrier();
    return;
  }
#endif
  emulation::block_barrier();
}
inline void warp_barrier() { emulation::warp_barrier(); }

template <typename T>
T shfl_xor(T value, int lane_mask) {
  return emulation::shuffle(value, [lane_mask](int lane) { return lane ^ lane_mask; });
}
template <typename T>
T shfl_idx(T value, int source_lane) {
  return emulation::shuffle(value, [source_lane](int) { return source_lane & 31; });
}
template <typename T>
T shfl_up(T value, unsigned delta) {  // lanes below delta keep their own value
  return emulation::shuffle(value, [delta](int lane) {
    return lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  });
}
template <typename T>
T shfl_down(T value, unsigned delta) {  // lanes past 31 - delta keep their own value
  return emulation::shuffle(value, [delta](int lane) {
    return lane + static_cast<int>(delta) < 32 ? lane + static_cast<int>(delta) : lane;
  });
}
inline unsigned ballot(bool predicate) { return emulation::ballot(predicate); }
inline bool any(bool predicate) { return emulation::ballot(predicate) != 0; }
inline bool all(bool predicate) { return emulation::ballot(!predicate) == 0; }
inline int popcount(unsigned bits) { return __builtin_popcount(bits); }
inline float mul_rn(float a, float b) { return a * b; }  // ISO C++ (-std=c++20): no contraction

template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma_m16n8k16 takes float16 or bfloat16");
#if DSA_OPS_EMULATION_FAULT == DSA_OPS_FAULT_SWAP_A_FRAGMENT
  const uint32_t swapped[4] = {a[0], a[2], a[1], a[3]};
  emulation::mma_m16n8k16<T>(c, swapped, b);
#else
  emulation::mma_m16n8k16<T>(c, a, b);
#endif
}

template <int N, bool TRANSPOSE>
void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  emulation::ldmatrix(r, N, TRANSPOSE, row);
}

inline void cp_async_16(void* shared, const void* global) { emulation::cp_async_16(shared, global); }
inline void cp_async_commit() { emulation::cp_async_commit(); }
template <int N>
void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative group count");
  emulation::cp_async_wait(N);
}

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, int bytes) {
  return emulation::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

inline cudaError_t current_device(int* device) {
  *device = emulation::current_device();
  return cudaSuccess;
}

inline int max_dynamic_shared_memory() { return emulation::max_shared_memory_per_block_optin(); }
inline int shared_memory_per_multiprocessor() { return emulation::shared_memory_per_multiprocessor(); }

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                   cudaStream_t /*stream*/, Args&&... args) {
  return emulation::launch(kernel, grid, threads, shared_bytes, std::forward<Args>(args)...);
}

#endif

// ============================================================================ both
// The opt-in attribute belongs to the kernel on one device and stays set, so it is set
// when a launch first needs more than the largest limit set so far on the current device
// (never at or below the default 48 KiB): no driver call on every launch.
struct DynamicSharedLimits {
  std::mutex mutex;
  std::map<std::pair<const void*, int>, int> bytes;  // (kernel, device) → limit set
};

inline DynamicSharedLimits& dynamic_shared_limits() {
  static DynamicSharedLimits limits;
  return limits;
}

template <typename Kernel>
cudaError_t ensure_dynamic_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= kDefaultDynamicSharedBytes) return cudaSuccess;
  int device = 0;
  cudaError_t status = current_device(&device);
  if (status != cudaSuccess) return status;
  DynamicSharedLimits& limits = dynamic_shared_limits();
  const std::lock_guard<std::mutex> lock(limits.mutex);
  int& limit = limits.bytes[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= limit) return cudaSuccess;
  status = allow_dynamic_shared_memory(kernel, bytes);
  if (status == cudaSuccess) limit = bytes;
  return status;
}

}  // namespace device
}  // namespace dsa_ops
