// Host emulation of the CUDA execution model, for csrc/device/primitives.cuh built with
// -DDSA_OPS_HOST_EMULATION: the kernels of csrc/ compiled by g++ and run on the CPU.
//
// Model: blocks run one after another; each CUDA thread of a block is a fiber (default:
// runs until it waits, deterministic) or a std::thread (-DDSA_OPS_EMULATION_OS_THREADS, for
// the sanitizers). __syncthreads is a barrier over the block, and every warp collective
// (shuffles, ballot, __syncwarp, ldmatrix, mma.sync) is an exchange through per-warp slots
// at a barrier over the warp. Where bugs hide it is strict:
//  - shared memory (static and dynamic) is filled with 0xFF bytes, NaN in every float
//    type, at block start; each static array and the dynamic area are separate heap
//    blocks, so AddressSanitizer sees overruns;
//  - cp.async copies land only at the cp.async.wait_group that covers their commit group;
//  - ldmatrix and mma.sync follow the PTX ISA fragment tables, coded here independently
//    of the kernels' own index helpers;
//  - launches check the grid (y, z ≤ 65535), threads (≤ 1024), static shared memory
//    (≤ 48 KiB), dynamic shared memory above 48 KiB only after the opt-in attribute, and
//    the emulated architecture's per-block maximum (DSA_OPS_CUDA_EMULATE_ARCH, default 80);
//  - a warp collective that not all 32 lanes reach at the same point, a partial mask, a
//    misaligned or non-shared ldmatrix / cp.async address, or a thread that exits with
//    cp.async copies never waited for fails the launch (cudaErrorLaunchFailure, with the
//    reason in last_error_message()).
// Not modelled: memory ordering between blocks, warp-specialised / asynchronous Hopper
// instructions (wgmma, TMA), rounding of real tensor cores (mma accumulates in float32 in
// k order with fma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// CUDA's headers give these g++ attributes it does not know; kernels need them as nothing.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__

namespace dsa_ops {
namespace emulation {
struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
}  // namespace emulation
}  // namespace dsa_ops

// The CUDA built-in variables: per emulated thread, and per launch.
inline thread_local dsa_ops::emulation::Index3 threadIdx, blockIdx;
inline dsa_ops::emulation::Index3 blockDim, gridDim;

namespace dsa_ops {
// CUDA's min/max overloads accept mixed integer types; kernels live in dsa_ops.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

namespace emulation {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr int kDefaultDynamicSharedLimit = 48 * 1024;
constexpr int kMaxStaticShared = 48 * 1024;

// The emulated architecture (DSA_OPS_CUDA_EMULATE_ARCH: 80, 86, 89, 90) and its largest
// per-block shared memory after the opt-in.
int architecture();
int max_shared_memory_per_block_optin();
int shared_memory_per_multiprocessor();

// Failure reporting: the first failure of a launch is kept; the launch returns
// cudaErrorLaunchFailure.
void fail(const std::string& message);
const char* last_error_message();

// ----------------------------------------------------------------------------- per thread
void block_barrier();
int block_barriers_passed();   // by the calling thread in its current block
void skip_block_barrier();     // counts as passed, synchronises nothing (fault injection)
void warp_barrier();
unsigned char* dynamic_shared_memory();
void* static_shared_memory(const void* declaration_site, size_t bytes);

template <typename T>
T* static_shared_array(const void* declaration_site, size_t count) {
  return static_cast<T*>(static_shared_memory(declaration_site, count * sizeof(T)));
}

// One warp-wide exchange: each lane offers up to kExchangeBytes bytes; once every lane of
// the warp has arrived, the returned array (indexed by lane) holds all offers. Valid until
// the calling lane enters its next collective.
constexpr int kExchangeBytes = 24;
struct ExchangeSlot {
  uint64_t sequence;  // the offering lane's collective count: lanes must agree
  alignas(8) unsigned char bytes[kExchangeBytes];
};
const ExchangeSlot* exchange(const void* offer, size_t bytes);
int lane_id();

template <typename T, typename SourceLane>
T shuffle(T value, SourceLane source_lane) {
  static_assert(sizeof(T) <= kExchangeBytes && std::is_trivially_copyable_v<T>,
                "shuffles move trivially copyable values of at most 24 bytes");
  const ExchangeSlot* slots = exchange(&value, sizeof(T));
  T result;
  std::memcpy(&result, slots[source_lane(lane_id())].bytes, sizeof(T));
  return result;
}

unsigned ballot(bool predicate);

// mma.sync.m16n8k16.row.col.f32.{f16,bf16}: c += A·B for the warp's fragments.
void mma_m16n8k16_half(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void mma_m16n8k16_bfloat16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    mma_m16n8k16_half(c, a, b);
  } else {
    mma_m16n8k16_bfloat16(c, a, b);
  }
}

// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16 into r[0..count).
void ldmatrix(uint32_t* r, int count, bool transpose, const void* row);

void cp_async_16(void* shared, const void* global);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// ----------------------------------------------------------------------------- launches
// The current device of the calling host thread (cudaGetDevice / cudaSetDevice: every
// emulated device is the emulated architecture); launches and the opt-in apply to it.
int current_device();
void set_current_device(int device);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) on the
// current device; the count of calls so far (all kernels) shows how often it is set.
cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes);
int dynamic_shared_memory_attribute_calls();

// Runs `body(thread)` for every thread of every block of the grid (blocks in order), after
// checking the configuration. Serialises launches from different host threads.
struct LaunchBody {
  virtual void run() const = 0;
  virtual ~LaunchBody() = default;
};
cudaError_t run_grid(const void* kernel, dim3 grid, int threads, int shared_bytes,
                     const LaunchBody& body);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes,
                   Args&&... args) {
  // Arguments are converted to the parameter types once, as for a real launch; each
  // emulated thread gets its own by-value copy when the kernel is called.
  struct Body final : LaunchBody {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> arguments;
    Body(void (*k)(Params...), Args&&... a) : kernel(k), arguments(std::forward<Args>(a)...) {}
    void run() const override { std::apply(kernel, arguments); }
  };
  const Body body(kernel, std::forward<Args>(args)...);
  return run_grid(reinterpret_cast<const void*>(kernel), grid, threads, shared_bytes, body);
}

}  // namespace emulation
}  // namespace dsa_ops
