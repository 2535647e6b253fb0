// Unit tests of csrc/device/primitives.cuh under the host emulation (g++ -DDSA_OPS_HOST_EMULATION)
// against the PTX ISA's definitions, written out here per lane. nvcc compiles the kernels of
// this file too (-cubin, sm_80): the PTX side of every primitive assembles.
//
//   tests/test_cuda_emulation.py builds and runs it; exit status = number of failed checks.
#include <cstdint>
#include <cstring>

#include "device/primitives.cuh"

namespace dsa_ops {
namespace primitives_test {

using device::kFullWarp;

// ----------------------------------------------------------------------------- kernels
// ldmatrix: 4 matrices of 8×8 b16 elements with id 64·matrix + 8·row + col, rows stored in
// a scrambled order so that only the row addresses the lanes give can find them.
__device__ inline int stored_row(int matrix, int row) { return (5 * (8 * matrix + row) + 3) % 32; }

template <int N, bool TRANSPOSE>
__global__ void ldmatrix_kernel(uint32_t* out) {
  DSA_STATIC_SHARED_ARRAY(uint16_t, tile, 32 * 8);
  const int lane = threadIdx.x;
  for (int matrix = 0; matrix < 4; ++matrix) {
    if (lane < 8) {
      for (int col = 0; col < 8; ++col) {
        tile[stored_row(matrix, lane) * 8 + col] = static_cast<uint16_t>(64 * matrix + 8 * lane + col);
      }
    }
  }
  device::warp_barrier();
  uint32_t r[N];
  device::ldmatrix<N, TRANSPOSE>(r, tile + stored_row(lane / 8 % N, lane % 8) * 8);
  for (int i = 0; i < N; ++i) out[lane * N + i] = r[i];
}

// mma: A (16×16) row-major and B (16×8) given as Bᵀ (8×16, [n][k]) in global memory, both
// through ldmatrix (A: x4; Bᵀ: x2) and packed by hand from the PTX fragment table.
template <typename T>
__global__ void mma_kernel(const T* a, const T* b_nk, float* c_ldmatrix, float* c_packed) {
  DSA_STATIC_SHARED_ARRAY(T, a_s, 16 * 16);
  DSA_STATIC_SHARED_ARRAY(T, b_s, 8 * 16);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) a_s[i] = a[i];
  for (int i = lane; i < 128; i += 32) b_s[i] = b_nk[i];
  device::warp_barrier();
  uint32_t a_frag[4], b_frag[2];
  // x4 matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15 = a0..a3.
  device::ldmatrix<4, false>(a_frag, a_s + (lane % 16) * 16 + (lane / 16) * 8);
  device::ldmatrix<2, false>(b_frag, b_s + (lane % 8) * 16 + (lane / 8 % 2) * 8);
  float c[4] = {0.f, 1.f, 2.f, 3.f};
  device::mma_m16n8k16<T>(c, a_frag, b_frag);
  for (int e = 0; e < 4; ++e) c_ldmatrix[lane * 4 + e] = c[e];

  const int g = lane / 4, t = lane % 4;
  auto pack = [](T lo, T hi) {
    uint16_t l, h;
    std::memcpy(&l, &lo, 2);
    std::memcpy(&h, &hi, 2);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  };
  const uint32_t a_packed[4] = {pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                                pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                                pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                                pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t b_packed[2] = {pack(b_nk[g * 16 + 2 * t], b_nk[g * 16 + 2 * t + 1]),
                                pack(b_nk[g * 16 + 2 * t + 8], b_nk[g * 16 + 2 * t + 9])};
  float d[4] = {0.f, 1.f, 2.f, 3.f};
  device::mma_m16n8k16<T>(d, a_packed, b_packed);
  for (int e = 0; e < 4; ++e) c_packed[lane * 4 + e] = d[e];
}

// cp.async: two 16-byte groups per thread; what shared memory holds after wait<1>, after
// wait<0>, and a third copy left uncommitted across a wait<0> then committed and waited.
__global__ void cp_async_kernel(const uint32_t* source, uint32_t* seen) {
  DSA_DYNAMIC_SHARED_MEMORY(raw);
  uint32_t* const shared = reinterpret_cast<uint32_t*>(raw);
  const int t = threadIdx.x;
  device::cp_async_16(shared + 12 * t, source + 12 * t);
  device::cp_async_commit();
  device::cp_async_16(shared + 12 * t + 4, source + 12 * t + 4);
  device::cp_async_commit();
  device::cp_async_wait<1>();
  seen[t * 8 + 0] = shared[12 * t];      // landed
  seen[t * 8 + 1] = shared[12 * t + 4];  // still in flight: poison
  device::cp_async_wait<0>();
  seen[t * 8 + 2] = shared[12 * t + 4];  // landed
  device::cp_async_16(shared + 12 * t + 8, source + 12 * t + 8);
  device::cp_async_wait<0>();
  seen[t * 8 + 3] = shared[12 * t + 8];  // not committed yet: poison
  device::cp_async_commit();
  device::cp_async_wait<0>();
  seen[t * 8 + 4] = shared[12 * t + 8];  // landed
}

__global__ void cp_async_never_waited_kernel(const uint32_t* source) {
  DSA_DYNAMIC_SHARED_MEMORY(raw);
  device::cp_async_16(raw + 16 * threadIdx.x, source + 4 * threadIdx.x);
  device::cp_async_commit();
}

__global__ void cp_async_misaligned_kernel(const uint32_t* source) {
  DSA_DYNAMIC_SHARED_MEMORY(raw);
  device::cp_async_16(raw + 8, source);
  device::cp_async_wait<0>();
}

// Shuffles and votes over two warps; per lane: xor 5, idx (lane·7 % 32), up 3, down 3,
// ballot / any / all of lane % 3 == 0, any / all of lane < 32, popcount of the ballot.
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const int value = 100 * static_cast<int>(threadIdx.x);
  int* const row = out + threadIdx.x * 10;
  row[0] = device::shfl_xor(value, 5);
  row[1] = device::shfl_idx(value, lane * 7 % 32);
  row[2] = device::shfl_up(value, 3);
  row[3] = static_cast<int>(device::shfl_down(static_cast<float>(value), 3));
  const unsigned votes = device::ballot(lane % 3 == 0);
  row[4] = static_cast<int>(votes);
  row[5] = device::any(lane == 31);
  row[6] = device::all(lane % 3 == 0);
  row[7] = device::any(false);
  row[8] = device::all(lane < 32);
  row[9] = device::popcount(votes);
}

// Barriers: every thread writes its slot, then reads its neighbours' (block and warp).
__global__ void barrier_kernel(int* out) {
  DSA_STATIC_SHARED_ARRAY(int, slots, 256);
  const int t = threadIdx.x;
  slots[t] = 3 * t + 1;
  device::block_barrier();
  out[2 * t] = slots[(t + 97) % blockDim.x];
  device::block_barrier();
  const int warp_base = t / 32 * 32;
  slots[t] = 5 * t;
  device::warp_barrier();
  out[2 * t + 1] = slots[warp_base + (t + 1) % 32];
}

// Shared memory at block start, and static arrays: one per declaration, the same one on
// every call of the function that declares it.
__device__ inline int* counter_array() {
  DSA_STATIC_SHARED_ARRAY(int, counters, 4);
  return counters;
}

__global__ void shared_memory_kernel(uint32_t* out, unsigned long long* addresses) {
  DSA_DYNAMIC_SHARED_MEMORY(raw);
  DSA_STATIC_SHARED_ARRAY(uint32_t, first, 8);
  DSA_STATIC_SHARED_ARRAY(uint32_t, second, 8);
  if (threadIdx.x == 0) {
    out[blockIdx.x * 4 + 0] = reinterpret_cast<const uint32_t*>(raw)[5];
    out[blockIdx.x * 4 + 1] = first[3];
    out[blockIdx.x * 4 + 2] = second[7];
    out[blockIdx.x * 4 + 3] = blockDim.x * 1000 + gridDim.x;
    reinterpret_cast<uint32_t*>(raw)[5] = 7;  // the next block must see poison again
    first[3] = 7;
    addresses[0] = reinterpret_cast<unsigned long long>(counter_array());
    addresses[1] = reinterpret_cast<unsigned long long>(counter_array());
    addresses[2] = reinterpret_cast<unsigned long long>(first);
    addresses[3] = reinterpret_cast<unsigned long long>(second);
  }
}

__global__ void divergent_shuffle_kernel(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = device::shfl_xor(1, 1);
}

// Deadlock: half of warp 1 shuffles while everyone else waits at the block barrier.
__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x < 32 || threadIdx.x >= 48) {
    device::block_barrier();
  } else {
    out[threadIdx.x] = device::shfl_xor(1, 1);
  }
}

__global__ void empty_kernel(int*) {}

// Distinct kernels for the opt-in bookkeeping (the attribute stays set per kernel).
template <int ID>
__global__ void dynamic_shared_kernel(int* out) {
  DSA_DYNAMIC_SHARED_MEMORY(raw);
  if (threadIdx.x == 0) out[ID] = raw[0];
}

#ifdef DSA_OPS_HOST_EMULATION  // nvcc rejects it at compile time
__global__ void large_static_kernel(int* out) {
  DSA_STATIC_SHARED_ARRAY(int, big, 13 * 1024);  // 52 KiB > 48 KiB
  if (threadIdx.x == 0) out[0] = big[0];
}
#endif

// Every template instance, so that nvcc assembles each primitive's PTX form.
template __global__ void ldmatrix_kernel<1, false>(uint32_t*);
template __global__ void ldmatrix_kernel<2, false>(uint32_t*);
template __global__ void ldmatrix_kernel<4, false>(uint32_t*);
template __global__ void ldmatrix_kernel<1, true>(uint32_t*);
template __global__ void ldmatrix_kernel<2, true>(uint32_t*);
template __global__ void ldmatrix_kernel<4, true>(uint32_t*);
template __global__ void mma_kernel<__half>(const __half*, const __half*, float*, float*);
template __global__ void mma_kernel<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                   float*, float*);

}  // namespace primitives_test
}  // namespace dsa_ops

// ============================================================================= host
#ifdef DSA_OPS_HOST_EMULATION
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace {
using namespace dsa_ops;
using namespace dsa_ops::primitives_test;

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

void expect_launch_error(cudaError_t status, const std::string& what, const char* needle) {
  const std::string message = emulation::last_error_message();
  check(status != cudaSuccess && message.find(needle) != std::string::npos,
        what + ": expected an error mentioning '" + needle + "', got status " +
            std::to_string(status) + " '" + message + "'");
}

uint16_t element_id(int matrix, int row, int col) { return static_cast<uint16_t>(64 * matrix + 8 * row + col); }

template <int N, bool TRANSPOSE>
void test_ldmatrix() {
  std::vector<uint32_t> out(32 * N, 0);
  check(device::launch(ldmatrix_kernel<N, TRANSPOSE>, dim3(1), 32, 0, nullptr, out.data()) == cudaSuccess,
        "ldmatrix launch");
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < N; ++i) {
      // PTX ISA, ldmatrix fragment: lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of
      // matrix i; .trans: rows 2(l%4), 2(l%4)+1 of column l/4.
      const int r = lane / 4, c = 2 * (lane % 4);
      const uint32_t want = TRANSPOSE ? element_id(i, c, r) | (uint32_t{element_id(i, c + 1, r)} << 16)
                                      : element_id(i, r, c) | (uint32_t{element_id(i, r, c + 1)} << 16);
      check(out[lane * N + i] == want, "ldmatrix x" + std::to_string(N) + (TRANSPOSE ? ".trans" : "") +
                                           " lane " + std::to_string(lane) + " reg " + std::to_string(i));
    }
  }
}

template <typename T>
void test_mma(const char* name) {
  // Small integers and halves: every product and sum is exact in float32.
  std::vector<T> a(256), b(128);
  std::vector<double> a_value(256), b_value(128);
  for (int i = 0; i < 256; ++i) {
    a_value[i] = ((i * 7) % 11 - 5) * 0.5;
    a[i] = static_cast<T>(static_cast<float>(a_value[i]));
  }
  for (int i = 0; i < 128; ++i) {
    b_value[i] = ((i * 5) % 9 - 4) * 0.25;
    b[i] = static_cast<T>(static_cast<float>(b_value[i]));
  }
  std::vector<float> via_ldmatrix(128), packed(128);
  check(device::launch(mma_kernel<T>, dim3(1), 32, 0, nullptr, a.data(), b.data(),
                       via_ldmatrix.data(), packed.data()) == cudaSuccess,
        std::string("mma launch ") + name);
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 4; ++e) {
      // PTX ISA, C fragment of m16n8k16 (f32): row lane/4 (+8 for e ≥ 2), column 2(lane%4) + e%2.
      const int row = lane / 4 + (e >= 2 ? 8 : 0), col = 2 * (lane % 4) + e % 2;
      double want = e;
      for (int k = 0; k < 16; ++k) want += a_value[row * 16 + k] * b_value[col * 16 + k];
      const std::string where = std::string("mma ") + name + " lane " + std::to_string(lane) +
                                " c" + std::to_string(e);
      check(via_ldmatrix[lane * 4 + e] == want, where + " (ldmatrix fragments)");
      check(packed[lane * 4 + e] == want, where + " (packed fragments)");
    }
  }
}

void test_cp_async() {
  constexpr int threads = 64;
  std::vector<uint32_t> source(12 * threads);
  for (size_t i = 0; i < source.size(); ++i) source[i] = static_cast<uint32_t>(1000 + i);
  std::vector<uint32_t> seen(8 * threads, 0);
  check(device::launch(cp_async_kernel, dim3(1), threads, 12 * 4 * threads, nullptr, source.data(),
                       seen.data()) == cudaSuccess,
        std::string("cp.async launch: ") + emulation::last_error_message());
  for (int t = 0; t < threads; ++t) {
    const std::string who = " (thread " + std::to_string(t) + ")";
    check(seen[t * 8 + 0] == source[12 * t], "cp.async: wait_group 1 lands the older group" + who);
    check(seen[t * 8 + 1] == 0xffffffffu, "cp.async: wait_group 1 leaves the newest group in flight" + who);
    check(seen[t * 8 + 2] == source[12 * t + 4], "cp.async: wait_group 0 lands everything committed" + who);
    check(seen[t * 8 + 3] == 0xffffffffu, "cp.async: wait_group 0 leaves an uncommitted copy" + who);
    check(seen[t * 8 + 4] == source[12 * t + 8], "cp.async: commit + wait lands it" + who);
  }
  expect_launch_error(device::launch(cp_async_never_waited_kernel, dim3(1), 32, 512, nullptr, source.data()),
                      "cp.async never waited", "never waited");
  expect_launch_error(device::launch(cp_async_misaligned_kernel, dim3(1), 32, 512, nullptr, source.data()),
                      "cp.async misaligned", "16-byte aligned");
}

void test_warp_ops() {
  constexpr int threads = 64;
  std::vector<int> out(threads * 10, -1);
  check(device::launch(warp_ops_kernel, dim3(1), threads, 0, nullptr, out.data()) == cudaSuccess,
        "warp ops launch");
  unsigned every_third = 0;
  for (int lane = 0; lane < 32; lane += 3) every_third |= 1u << lane;
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, base = t - lane;
    const int* row = &out[t * 10];
    const std::string who = " (thread " + std::to_string(t) + ")";
    check(row[0] == 100 * (base + (lane ^ 5)), "shfl_xor" + who);
    check(row[1] == 100 * (base + lane * 7 % 32), "shfl_idx" + who);
    check(row[2] == 100 * (base + (lane >= 3 ? lane - 3 : lane)), "shfl_up" + who);
    check(row[3] == 100 * (base + (lane + 3 < 32 ? lane + 3 : lane)), "shfl_down (float)" + who);
    check(static_cast<unsigned>(row[4]) == every_third, "ballot" + who);
    check(row[5] == 1 && row[6] == 0 && row[7] == 0 && row[8] == 1, "any / all" + who);
    check(row[9] == 11, "popcount" + who);
  }
  std::vector<int> scratch(64, 0);
  expect_launch_error(device::launch(divergent_shuffle_kernel, dim3(1), 32, 0, nullptr, scratch.data()),
                      "shuffle by half a warp", "not at the same collective");
}

void test_barriers() {
  constexpr int threads = 256;
  std::vector<int> out(2 * threads, -1);
  check(device::launch(barrier_kernel, dim3(1), threads, 0, nullptr, out.data()) == cudaSuccess,
        "barrier launch");
  for (int t = 0; t < threads; ++t) {
    check(out[2 * t] == 3 * ((t + 97) % threads) + 1, "block barrier (thread " + std::to_string(t) + ")");
    check(out[2 * t + 1] == 5 * (t / 32 * 32 + (t + 1) % 32), "warp barrier (thread " + std::to_string(t) + ")");
  }
#ifndef DSA_OPS_EMULATION_OS_THREADS  // with OS threads a deadlock hangs
  std::vector<int> scratch(64, 0);
  expect_launch_error(device::launch(split_barrier_kernel, dim3(1), 64, 0, nullptr, scratch.data()),
                      "threads at different barriers", "deadlock");
#endif
}

void test_shared_memory_and_launch_checks() {
  std::vector<uint32_t> out(3 * 4, 0);
  std::vector<unsigned long long> addresses(4, 0);
  check(device::launch(shared_memory_kernel, dim3(3), 64, 64, nullptr, out.data(), addresses.data()) ==
            cudaSuccess,
        "shared memory launch");
  for (int block = 0; block < 3; ++block) {
    check(out[block * 4] == 0xffffffffu && out[block * 4 + 1] == 0xffffffffu && out[block * 4 + 2] == 0xffffffffu,
          "shared memory is poisoned at the start of block " + std::to_string(block));
    check(out[block * 4 + 3] == 64 * 1000 + 3, "blockDim / gridDim in block " + std::to_string(block));
  }
  check(addresses[0] == addresses[1], "a static array is the same on every call of its function");
  check(addresses[2] != addresses[3], "two static arrays are distinct");

  std::vector<int> scratch(64, 0);
  expect_launch_error(device::launch(empty_kernel, dim3(1), 1025, 0, nullptr, scratch.data()),
                      "1025 threads", "threads per block");
  expect_launch_error(device::launch(empty_kernel, dim3(1, 65536), 32, 0, nullptr, scratch.data()),
                      "grid y 65536", "grid");
  expect_launch_error(device::launch(empty_kernel, dim3(1, 1, 65536), 32, 0, nullptr, scratch.data()),
                      "grid z 65536", "grid");
  expect_launch_error(device::launch(empty_kernel, dim3(1), 32, 48 * 1024 + 16, nullptr, scratch.data()),
                      "dynamic shared memory above 48 KiB without the opt-in", "cudaFuncAttributeMaxDynamicSharedMemorySize");
  check(device::allow_dynamic_shared_memory(empty_kernel, 100 * 1024) == cudaSuccess, "opt-in to 100 KiB");
  check(device::launch(empty_kernel, dim3(1), 32, 100 * 1024, nullptr, scratch.data()) == cudaSuccess,
        "100 KiB after the opt-in");
  expect_launch_error(device::launch(empty_kernel, dim3(1), 32, 100 * 1024 + 16, nullptr, scratch.data()),
                      "above the opt-in", "limit");
  const int architecture_max = emulation::max_shared_memory_per_block_optin();
  expect_launch_error(device::allow_dynamic_shared_memory(empty_kernel, architecture_max + 1),
                      "opt-in above the architecture's maximum", "per block");
  expect_launch_error(device::launch(large_static_kernel, dim3(1), 32, 0, nullptr, scratch.data()),
                      "52 KiB of static shared memory", "static shared memory");
}

// ensure_dynamic_shared_memory sets the attribute once per kernel, device and larger size.
void test_dynamic_shared_memory_opt_in_once() {
  std::vector<int> out(3, 0);
  const int before = emulation::dynamic_shared_memory_attribute_calls();
  const auto calls = [&] { return emulation::dynamic_shared_memory_attribute_calls() - before; };
  const auto launch = [&](void (*kernel)(int*), int bytes) {
    const cudaError_t status = device::ensure_dynamic_shared_memory(kernel, bytes);
    return status != cudaSuccess ? status
                                 : device::launch(kernel, dim3(1), 32, bytes, nullptr, out.data());
  };
  check(launch(dynamic_shared_kernel<0>, 64 * 1024) == cudaSuccess &&
            launch(dynamic_shared_kernel<0>, 64 * 1024) == cudaSuccess,
        std::string("two launches with 64 KiB: ") + emulation::last_error_message());
  check(calls() == 1, "two launches set the attribute once (" + std::to_string(calls()) + " calls)");
  check(launch(dynamic_shared_kernel<0>, 32 * 1024) == cudaSuccess && calls() == 1,
        "a launch below the limit set sets nothing");
  check(launch(dynamic_shared_kernel<0>, 96 * 1024) == cudaSuccess && calls() == 2,
        "a larger launch raises the limit");
  check(launch(dynamic_shared_kernel<1>, 48 * 1024) == cudaSuccess && calls() == 2,
        "48 KiB needs no opt-in");
  check(launch(dynamic_shared_kernel<1>, 64 * 1024) == cudaSuccess && calls() == 3,
        "the limit is per kernel");

  emulation::set_current_device(1);
  expect_launch_error(device::launch(dynamic_shared_kernel<0>, dim3(1), 32, 64 * 1024, nullptr, out.data()),
                      "device 1 without its own opt-in", "cudaFuncAttributeMaxDynamicSharedMemorySize");
  check(launch(dynamic_shared_kernel<0>, 64 * 1024) == cudaSuccess && calls() == 4,
        "the limit is per device");
  emulation::set_current_device(0);

  const int too_large = emulation::max_shared_memory_per_block_optin() + 16;
  expect_launch_error(launch(dynamic_shared_kernel<1>, too_large), "opt-in above the maximum", "per block");
  expect_launch_error(launch(dynamic_shared_kernel<1>, too_large), "the same again", "per block");
  check(calls() == 6, "a failed opt-in is not remembered as set");

  // Host threads launching the same kernel at once: one of them sets it.
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([] { device::ensure_dynamic_shared_memory(dynamic_shared_kernel<2>, 80 * 1024); });
  }
  for (std::thread& thread : threads) thread.join();
  check(calls() == 7, "four host threads set the attribute once (" + std::to_string(calls()) + " calls)");
}

}  // namespace

int main() {
  test_ldmatrix<1, false>();
  test_ldmatrix<2, false>();
  test_ldmatrix<4, false>();
  test_ldmatrix<1, true>();
  test_ldmatrix<2, true>();
  test_ldmatrix<4, true>();
  test_mma<__half>("float16");
  test_mma<__nv_bfloat16>("bfloat16");
  test_cp_async();
  test_warp_ops();
  test_barriers();
  test_shared_memory_and_launch_checks();
  test_dynamic_shared_memory_opt_in_once();
  std::printf("primitives: %d failed checks\n", failures);
  return failures == 0 ? 0 : 1;
}
#endif
