// The host emulation's runtime: launches, blocks, barriers, warp exchanges, shared memory,
// cp.async groups, and the PTX fragment tables of ldmatrix and mma.sync (see emulation.h).
#include "emulation/emulation.h"

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#ifdef DSA_OPS_EMULATION_OS_THREADS
#include <barrier>
#include <thread>
#else
#include <ucontext.h>
#endif

namespace dsa_ops {
namespace emulation {
namespace {

constexpr unsigned char kPoison = 0xFF;  // NaN in float32, float16 and bfloat16

struct ThreadState;
thread_local ThreadState* current = nullptr;  // the emulated thread running on this OS thread

// ----------------------------------------------------------------------------- scheduling
// Two ways to run the threads of a block, same semantics:
//  - fibers (default): every CUDA thread is a ucontext fiber on the launching thread; a
//    fiber runs until it waits at a barrier, so a thread reads shared memory as early as
//    the missing barriers let it (the poison shows) and runs are deterministic; fast.
//  - OS threads (-DDSA_OPS_EMULATION_OS_THREADS, the sanitizer builds): one std::thread
//    per CUDA thread and std::barrier, so ThreadSanitizer sees the races between them and
//    AddressSanitizer needs no stack-switch annotations.
// run_blocks(blocks, threads, set_up, body): for each block b in order, set_up(b) (false:
// stop), then body(t) for every thread t; false when a block deadlocked.
#ifdef DSA_OPS_EMULATION_OS_THREADS
using Barrier = std::barrier<>;

// The OS threads live for the whole grid (creating them per block would dominate): they
// meet at a barrier between blocks, whose completion step sets up the next block.
template <typename SetUp, typename Body>
bool run_blocks(uint64_t blocks, int count, SetUp set_up, Body body) {
  uint64_t next = 0;
  bool more = false;
  auto advance = [&]() noexcept {
    more = next < blocks && set_up(next);
    ++next;
  };
  advance();
  std::barrier between(count, advance);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(count));
  for (int t = 0; t < count; ++t) {
    threads.emplace_back([&, t] {
      while (more) {
        body(t);
        between.arrive_and_wait();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return true;  // a deadlock hangs here
}
#else
class FiberScheduler {
 public:
  // Runs body(t), t = 0..count-1, as fibers until all return; false when every unfinished
  // fiber waits (a deadlock: threads at different barriers).
  template <typename Body>
  bool run(int count, Body& body) {
    static_assert(std::is_invocable_v<Body&, int>);
    body_ = &body;
    call_ = [](void* b, int t) { (*static_cast<Body*>(b))(t); };
    while (fibers_.size() < static_cast<size_t>(count)) fibers_.push_back(std::make_unique<Fiber>());
    for (int t = 0; t < count; ++t) {
      Fiber& fiber = *fibers_[static_cast<size_t>(t)];
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &FiberScheduler::trampoline, 0);
      fiber.finished = false;
      fiber.wait_phase = nullptr;
    }
    FiberScheduler* const outer = active_;
    active_ = this;
    int finished = 0;
    bool deadlock = false;
    while (finished < count && !deadlock) {
      deadlock = true;
      for (int t = 0; t < count; ++t) {
        Fiber& fiber = *fibers_[static_cast<size_t>(t)];
        if (fiber.finished || (fiber.wait_phase != nullptr && *fiber.wait_phase == fiber.wait_seen)) {
          continue;
        }
        fiber.wait_phase = nullptr;
        running_ = t;
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        swapcontext(&scheduler_, &fiber.context);
        deadlock = false;
        if (fiber.finished) ++finished;
      }
    }
    active_ = outer;
    return !deadlock;
  }

  // Suspends the running fiber until *phase differs from seen.
  static void wait_while(const uint64_t* phase, uint64_t seen) {
    FiberScheduler& self = *active_;
    Fiber& fiber = *self.fibers_[static_cast<size_t>(self.running_)];
    fiber.wait_phase = phase;
    fiber.wait_seen = seen;
    // Fibers share the OS thread's thread_locals: each keeps its own across the switch.
    ThreadState* const state = current;
    const Index3 thread = threadIdx;
    swapcontext(&fiber.context, &self.scheduler_);
    current = state;
    threadIdx = thread;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    bool finished = false;
    const uint64_t* wait_phase = nullptr;
    uint64_t wait_seen = 0;
  };

  static void trampoline() {
    FiberScheduler& self = *active_;
    const int t = self.running_;
    self.call_(self.body_, t);
    self.fibers_[static_cast<size_t>(t)]->finished = true;
  }  // returns to uc_link: the scheduler

  static thread_local FiberScheduler* active_;
  std::vector<std::unique_ptr<Fiber>> fibers_;  // stacks reused from block to block
  ucontext_t scheduler_;
  int running_ = -1;
  void* body_ = nullptr;
  void (*call_)(void*, int) = nullptr;
};
thread_local FiberScheduler* FiberScheduler::active_ = nullptr;

// std::barrier's interface, for fibers.
class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}
  void arrive_and_wait() {
    if (++arrived_ == expected_) {
      complete_phase();
      return;
    }
    FiberScheduler::wait_while(&phase_, phase_);
  }
  void arrive_and_drop() {
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) complete_phase();
  }

 private:
  void complete_phase() {
    arrived_ = 0;
    ++phase_;
  }
  int expected_;
  int arrived_ = 0;
  uint64_t phase_ = 0;
};

template <typename SetUp, typename Body>
bool run_blocks(uint64_t blocks, int count, SetUp set_up, Body body) {
  static thread_local FiberScheduler scheduler;
  for (uint64_t b = 0; b < blocks && set_up(b); ++b) {
    if (!scheduler.run(count, body)) return false;
  }
  return true;
}
#endif

struct Warp {
  explicit Warp(int lanes_) : lanes(lanes_), barrier(lanes_) {
    for (auto& parity : slots) {
      for (ExchangeSlot& slot : parity) slot.sequence = ~uint64_t{0};  // no collective yet
    }
  }
  int lanes;
  Barrier barrier;
  ExchangeSlot slots[2][kWarpSize];  // alternate by parity of the collective count
};

struct StaticArray {
  const void* site;
  size_t bytes;
  std::unique_ptr<unsigned char[]> memory;
};

struct Block {
  Block(int threads, int dynamic_bytes)
      : barrier(threads), dynamic_shared(static_cast<size_t>(dynamic_bytes), kPoison) {
    for (int first = 0; first < threads; first += kWarpSize) {
      warps.push_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic_shared;
  std::mutex static_mutex;
  std::vector<StaticArray> static_arrays;
  size_t static_bytes = 0;
};

struct PendingCopy {
  void* destination;
  const void* source;
};

struct ThreadState {
  Block* block = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  uint64_t collectives = 0;
  int block_barriers = 0;
  std::vector<PendingCopy> open_group;
  std::deque<std::vector<PendingCopy>> committed_groups;
};

std::mutex launch_mutex;       // one launch at a time (gridDim / blockDim are global)
std::mutex failure_mutex;
bool launch_failed = false;
std::string failure_message;   // first failure of the running launch
std::string last_error;        // reported by last_error_message()
// (kernel, device) → cudaFuncAttributeMaxDynamicSharedMemorySize
std::map<std::pair<const void*, int>, int> dynamic_shared_optin;
int dynamic_shared_attribute_calls = 0;
thread_local int host_thread_device = 0;  // cudaSetDevice is per host thread

ThreadState& state() {
  if (current == nullptr) {
    std::fprintf(stderr, "dsa_ops emulation: a device primitive was called outside a kernel\n");
    std::abort();
  }
  return *current;
}

cudaError_t report(cudaError_t status, const std::string& message) {
  last_error = message;
  return status;
}

bool in_shared_memory(const void* pointer, size_t bytes) {
  Block& block = *state().block;
  const auto* p = static_cast<const unsigned char*>(pointer);
  const auto inside = [&](const unsigned char* begin, size_t size) {
    return p >= begin && p + bytes <= begin + size;
  };
  if (inside(block.dynamic_shared.data(), block.dynamic_shared.size())) return true;
  const std::lock_guard<std::mutex> lock(block.static_mutex);
  for (const StaticArray& array : block.static_arrays) {
    if (inside(array.memory.get(), array.bytes)) return true;
  }
  return false;
}

bool aligned(const void* pointer, uintptr_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment == 0;
}

uint16_t load_b16(const void* pointer) {
  uint16_t bits;
  std::memcpy(&bits, pointer, sizeof(bits));
  return bits;
}

uint32_t pack_b16(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
}

uint16_t half_of(uint32_t reg, int which) {
  return static_cast<uint16_t>(which == 0 ? reg & 0xffffu : reg >> 16);
}

}  // namespace

// ----------------------------------------------------------------------------- limits
int architecture() {
  static const int arch = [] {
    const char* value = std::getenv("DSA_OPS_CUDA_EMULATE_ARCH");
    return value == nullptr || *value == '\0' ? 80 : std::atoi(value);
  }();
  return arch;
}

namespace {
// Shared memory of the emulated GPU: a block's opt-in limit and an SM's whole.
struct SharedMemoryLimits {
  int per_block_optin;
  int per_multiprocessor;
};

SharedMemoryLimits shared_memory_limits() {
  switch (architecture()) {
    case 80: return {163 * 1024, 164 * 1024};
    case 86:
    case 89: return {99 * 1024, 100 * 1024};
    case 90: return {227 * 1024, 228 * 1024};
    default: return {-1, -1};
  }
}
}  // namespace

int max_shared_memory_per_block_optin() { return shared_memory_limits().per_block_optin; }
int shared_memory_per_multiprocessor() { return shared_memory_limits().per_multiprocessor; }

void fail(const std::string& message) {
  std::string where;
  if (current != nullptr) {
    where = " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
            std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + ")";
  }
  const std::lock_guard<std::mutex> lock(failure_mutex);
  if (!launch_failed) {
    launch_failed = true;
    failure_message = message + where;
  }
}

const char* last_error_message() { return last_error.c_str(); }

// ----------------------------------------------------------------------------- barriers
void block_barrier() {
  ThreadState& self = state();
  self.block->barrier.arrive_and_wait();
  ++self.block_barriers;
}

int block_barriers_passed() { return state().block_barriers; }

void skip_block_barrier() { ++state().block_barriers; }

const ExchangeSlot* exchange(const void* offer, size_t bytes) {
  ThreadState& self = state();
  Warp& warp = *self.warp;
  const int parity = static_cast<int>(self.collectives & 1);
  ExchangeSlot& mine = warp.slots[parity][self.lane];
  mine.sequence = self.collectives;
  if (bytes > 0) std::memcpy(mine.bytes, offer, bytes);
  warp.barrier.arrive_and_wait();
  // A lane that sits at another collective, or has exited, left a different count here.
  if (warp.lanes != kWarpSize) {
    fail("a warp collective needs all 32 lanes; this warp has " + std::to_string(warp.lanes));
  }
  for (int lane = 0; lane < warp.lanes; ++lane) {
    if (warp.slots[parity][lane].sequence != self.collectives) {
      fail("warp collective #" + std::to_string(self.collectives) + ": lane " +
           std::to_string(lane) + " is not at the same collective (divergent or exited lanes)");
      break;
    }
  }
  ++self.collectives;
  return warp.slots[parity];
}

void warp_barrier() { exchange(nullptr, 0); }

int lane_id() { return state().lane; }

unsigned ballot(bool predicate) {
  const unsigned char mine = predicate ? 1 : 0;
  const ExchangeSlot* slots = exchange(&mine, 1);
  unsigned bits = 0;
  for (int lane = 0; lane < state().warp->lanes; ++lane) bits |= unsigned{slots[lane].bytes[0]} << lane;
  return bits;
}

// ----------------------------------------------------------------------------- shared memory
unsigned char* dynamic_shared_memory() { return state().block->dynamic_shared.data(); }

void* static_shared_memory(const void* site, size_t bytes) {
  Block& block = *state().block;
  const std::lock_guard<std::mutex> lock(block.static_mutex);
  for (StaticArray& array : block.static_arrays) {
    if (array.site == site) return array.memory.get();
  }
  block.static_bytes += bytes;
  const size_t total = block.static_bytes + block.dynamic_shared.size();
  if (block.static_bytes > static_cast<size_t>(kMaxStaticShared) ||
      total > static_cast<size_t>(max_shared_memory_per_block_optin())) {
    fail("static shared memory of " + std::to_string(block.static_bytes) + " bytes (+ " +
         std::to_string(block.dynamic_shared.size()) + " dynamic) exceeds the limits (48 KiB "
         "static, " + std::to_string(max_shared_memory_per_block_optin()) + " in all on sm_" +
         std::to_string(architecture()) + ")");
  }
  StaticArray array{site, bytes, std::make_unique<unsigned char[]>(bytes)};
  std::memset(array.memory.get(), kPoison, bytes);
  block.static_arrays.push_back(std::move(array));
  return block.static_arrays.back().memory.get();
}

// ----------------------------------------------------------------------------- fragments
// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"; lane = 4·g + t.
//   A (16×16, .row): a_i (i = 0..7) in register i/2, low half for even i;
//                    row g for i ∈ {0,1,4,5}, g+8 otherwise; column 2t + i%2 (+8 for i ≥ 4).
//   B (16×8, .col):  b_i (i = 0..3) in register i/2; row 2t + i%2 (+8 for i ≥ 2); column g.
//   C (16×8, f32):   c_i, row g (+8 for i ≥ 2), column 2t + i%2.
// Inverted below: which lane, register and half hold A(row, col) and B(row, col).
namespace {
struct Fragments {
  uint32_t a[4];
  uint32_t b[2];
};

uint16_t a_element(const ExchangeSlot* slots, int row, int col) {
  const int lane = 4 * (row % 8) + (col % 8) / 2;
  const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
  Fragments f;
  std::memcpy(&f, slots[lane].bytes, sizeof(f));
  return half_of(f.a[reg], col % 2);
}

uint16_t b_element(const ExchangeSlot* slots, int row, int col) {
  const int lane = 4 * col + (row % 8) / 2;
  const int reg = row >= 8 ? 1 : 0;
  Fragments f;
  std::memcpy(&f, slots[lane].bytes, sizeof(f));
  return half_of(f.b[reg], row % 2);
}

float half_bits_to_float(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

float bfloat16_bits_to_float(uint16_t bits) {
  // bfloat16 is the top half of a float32: exact.
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

template <float (*ToFloat)(uint16_t)>
void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(sizeof(Fragments) <= kExchangeBytes);
  Fragments mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const ExchangeSlot* slots = exchange(&mine, sizeof(mine));
  const int g = state().lane / 4, t = state().lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0);
    const int col = 2 * t + i % 2;
    float sum = c[i];
    for (int k = 0; k < 16; ++k) {
      sum = std::fma(ToFloat(a_element(slots, row, k)), ToFloat(b_element(slots, k, col)), sum);
    }
    c[i] = sum;
  }
}
}  // namespace

void mma_m16n8k16_half(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma<half_bits_to_float>(c, a, b);
}

void mma_m16n8k16_bfloat16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma<bfloat16_bits_to_float>(c, a, b);
}

// PTX ISA, ldmatrix: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes
// each). Lane l receives, of matrix i, the pair at row l/4, columns 2(l%4) and 2(l%4)+1;
// with .trans, the pair at rows 2(l%4) and 2(l%4)+1, column l/4. Each lane reads its row
// when it arrives, not when the last lane does: a row another warp has not yet written
// (a missing __syncthreads) is read as the poison it still holds.
void ldmatrix(uint32_t* r, int count, bool transpose, const void* row) {
  const int lane = state().lane;
  unsigned char mine[16];
  std::memset(mine, kPoison, sizeof(mine));
  if (lane < 8 * count) {
    if (!aligned(row, 16) || !in_shared_memory(row, 16)) {
      fail("ldmatrix: lane " + std::to_string(lane) +
           "'s row address is not a 16-byte aligned row of shared memory");
    } else {
      std::memcpy(mine, row, sizeof(mine));
    }
  }
  const ExchangeSlot* slots = exchange(mine, sizeof(mine));
  const auto element = [&](int matrix, int r_, int c_) {
    return load_b16(slots[8 * matrix + r_].bytes + 2 * c_);
  };
  const int pair_row = lane / 4, pair_col = 2 * (lane % 4);
  for (int i = 0; i < count; ++i) {
    r[i] = transpose ? pack_b16(element(i, pair_col, pair_row), element(i, pair_col + 1, pair_row))
                     : pack_b16(element(i, pair_row, pair_col), element(i, pair_row, pair_col + 1));
  }
}

// ----------------------------------------------------------------------------- cp.async
void cp_async_16(void* shared, const void* global) {
  if (!aligned(shared, 16) || !in_shared_memory(shared, 16)) {
    fail("cp.async: the destination is not 16 bytes of 16-byte aligned shared memory");
    return;
  }
  if (!aligned(global, 16)) {
    fail("cp.async: the 16-byte source is not 16-byte aligned");
    return;
  }
  state().open_group.push_back({shared, global});
}

void cp_async_commit() {
  ThreadState& self = state();
  self.committed_groups.push_back(std::move(self.open_group));
  self.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  ThreadState& self = state();
  while (self.committed_groups.size() > static_cast<size_t>(pending_groups)) {
    for (const PendingCopy& copy : self.committed_groups.front()) {
      std::memcpy(copy.destination, copy.source, 16);
    }
    self.committed_groups.pop_front();
  }
}

// ----------------------------------------------------------------------------- launches
int current_device() { return host_thread_device; }
void set_current_device(int device) { host_thread_device = device; }

int dynamic_shared_memory_attribute_calls() {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  return dynamic_shared_attribute_calls;
}

cudaError_t set_max_dynamic_shared_memory(const void* kernel, int bytes) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  ++dynamic_shared_attribute_calls;
  const int limit = max_shared_memory_per_block_optin();
  if (limit < 0) {
    return report(cudaErrorInvalidDevice, "unknown DSA_OPS_CUDA_EMULATE_ARCH " +
                                              std::to_string(architecture()) +
                                              " (emulated: 80, 86, 89, 90)");
  }
  if (bytes < 0 || bytes > limit) {
    return report(cudaErrorInvalidValue,
                  "cudaFuncAttributeMaxDynamicSharedMemorySize " + std::to_string(bytes) +
                      " is above sm_" + std::to_string(architecture()) + "'s " +
                      std::to_string(limit) + " bytes per block");
  }
  dynamic_shared_optin[{kernel, current_device()}] = bytes;
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, dim3 grid, int threads, int shared_bytes,
                     const LaunchBody& body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  if (max_shared_memory_per_block_optin() < 0) {
    return report(cudaErrorInvalidDevice, "unknown DSA_OPS_CUDA_EMULATE_ARCH " +
                                              std::to_string(architecture()));
  }
  if (threads < 1 || threads > kMaxThreadsPerBlock) {
    return report(cudaErrorInvalidConfiguration,
                  "launch with " + std::to_string(threads) + " threads per block (1..1024)");
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ) {
    return report(cudaErrorInvalidConfiguration,
                  "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                      std::to_string(grid.z) + ") outside x 1..2^31-1, y and z 1..65535");
  }
  const auto optin = dynamic_shared_optin.find({kernel, current_device()});
  const int shared_limit =
      optin == dynamic_shared_optin.end() ? kDefaultDynamicSharedLimit : optin->second;
  if (shared_bytes < 0 || shared_bytes > shared_limit) {
    return report(cudaErrorInvalidValue,
                  std::to_string(shared_bytes) + " bytes of dynamic shared memory above the "
                  "kernel's limit of " + std::to_string(shared_limit) +
                  (optin == dynamic_shared_optin.end()
                       ? " (above 48 KiB needs cudaFuncAttributeMaxDynamicSharedMemorySize)"
                       : ""));
  }
  {
    const std::lock_guard<std::mutex> failure_lock(failure_mutex);
    launch_failed = false;
    failure_message.clear();
  }
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  const auto failed = [] {
    const std::lock_guard<std::mutex> failure_lock(failure_mutex);
    return launch_failed;
  };
  std::unique_ptr<Block> block;
  std::vector<ThreadState> states;
  Index3 block_index;
  // Blocks in order x, then y, then z; a failed block ends the launch.
  const auto set_up = [&](uint64_t b) {
    if (failed()) return false;
    block_index = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / grid.x / grid.y)};
    block.reset();
    block = std::make_unique<Block>(threads, shared_bytes);
    states.assign(static_cast<size_t>(threads), ThreadState{});
    return true;
  };
  const bool finished = run_blocks(uint64_t{grid.x} * grid.y * grid.z, threads, set_up, [&](int t) {
    ThreadState& self = states[static_cast<size_t>(t)];
    self.block = block.get();
    self.warp = block->warps[static_cast<size_t>(t / kWarpSize)].get();
    self.lane = t % kWarpSize;
    current = &self;
    threadIdx = {static_cast<unsigned>(t), 0, 0};
    blockIdx = block_index;
    body.run();
    if (!self.open_group.empty() || !self.committed_groups.empty()) {
      fail("thread exited with cp.async copies it never waited for");
    }
    // Exited threads no longer take part in barriers, as on the GPU.
    self.warp->barrier.arrive_and_drop();
    self.block->barrier.arrive_and_drop();
    current = nullptr;
  });
  if (!finished) fail("deadlock: the block's threads wait at different barriers");
  return failed() ? report(cudaErrorLaunchFailure, failure_message) : cudaSuccess;
}

}  // namespace emulation
}  // namespace dsa_ops
