// Host side of the simulated-GPU drivers (benchmarks/sim/): command line, masks and their
// partition, random inputs in the kernel's dtype, device buffers, the float64 references'
// error model and the output check. No torch. Built by nvcc for the simulator (or a GPU),
// or by g++ against the host emulation (-DDSA_OPS_HOST_EMULATION, csrc/emulation/), where
// "device" buffers are host memory, so CI checks the drivers without a simulator.
//
// Output lines the harness (benchmarks/sim/run.py) reads:
//   count KERNEL flops=N exp=N     useful work of every launch of KERNEL (a substring of its
//                                  mangled name): multiply-adds count 2, exp = exponentials
//   check NAME max_err=E worst=R bad=N of=N   R = max |err| / tolerance over the elements
//   result PASS|FAIL
#pragma once

#ifdef DSA_OPS_HOST_EMULATION
#include "emulation/emulation.h"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace sim {

[[noreturn]] inline void fail_usage(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(2);
}

// ----------------------------------------------------------------------------- dtypes
template <typename T>
struct Element;
template <>
struct Element<float> {
  static constexpr const char* kName = "float32";
  static constexpr double kUnitRoundoff = 0x1p-24;
  static float from_double(double x) { return static_cast<float>(x); }
  static double to_double(float x) { return x; }
};
template <>
struct Element<__half> {
  static constexpr const char* kName = "float16";
  static constexpr double kUnitRoundoff = 0x1p-11;
  static __half from_double(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double to_double(__half x) { return __half2float(x); }
};
template <>
struct Element<__nv_bfloat16> {
  static constexpr const char* kName = "bfloat16";
  static constexpr double kUnitRoundoff = 0x1p-8;
  static __nv_bfloat16 from_double(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Calls f(T{}) for the dtype named `name` (float32, float16, bfloat16).
template <typename F>
int dispatch_dtype(const std::string& name, F&& f) {
  if (name == Element<float>::kName) return f(float{});
  if (name == Element<__half>::kName) return f(__half{});
  if (name == Element<__nv_bfloat16>::kName) return f(__nv_bfloat16{});
  fail_usage("dtype must be float32, float16 or bfloat16, got '" + name + "'");
}

// ----------------------------------------------------------------------------- command line
// Which positions of a sample are keys: the complement of the queries (the DSA's cross
// branch), the queries themselves (self branch), or an explicit count (the first `keys`
// non-query positions: any rows × keys pair on one length).
enum class KeySet { kComplement, kQueries, kCount };

struct Shape {
  int batch = 1, length = 4096, qk_dim = 16, v_dim = 128;
  int query_run = 0;  // > 0: a centred run of this many positions are the queries
  int hole = 32;      // else: a centred hole × hole square of a √L × √L map
  KeySet key_set = KeySet::kComplement;
  int key_count = 0;  // KeySet::kCount
  bool odd = false;   // sample 1: every position a query; sample 2: none (needs batch ≥ 3)
  unsigned seed = 1;
};

struct Options {
  std::string family, dtype;
  Shape shape;
};

inline int parse_int(const std::string& flag, const std::string& text, int minimum) {
  char* end = nullptr;
  const long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || value < minimum || value > (1 << 30)) {
    fail_usage(flag + " expects an integer >= " + std::to_string(minimum) + ", got '" + text + "'");
  }
  return static_cast<int>(value);
}

// The odd preset: partial query and key tiles (L = 150, 70 queries, 80 keys), Dqk and Dv
// not multiples of the padded widths (24 → 32, 72 → 128 with a partial 64-column chunk),
// sample 1 all queries (no keys in the cross form), sample 2 no queries.
inline Shape odd_shape() {
  Shape s;
  s.batch = 3; s.length = 150; s.query_run = 70; s.qk_dim = 24; s.v_dim = 72; s.odd = true;
  return s;
}

// usage: DRIVER FAMILY DTYPE [--preset odd] [--batch B] [--length L] [--queries N | --hole H]
//        [--qk-dim D] [--v-dim D] [--keys complement|queries|N] [--seed S]
// (--preset first: later flags change it.)
inline Options parse_options(int argc, char** argv, const char* families) {
  const std::string usage = std::string("usage: ") + argv[0] + " FAMILY DTYPE [--preset odd] "
      "[--batch B] [--length L] [--queries N | --hole H] [--qk-dim D] [--v-dim D] "
      "[--keys complement|queries|N] [--seed S]; FAMILY: " + families +
      "; DTYPE: float32, float16, bfloat16";
  if (argc < 3) fail_usage(usage);
  Options o{argv[1], argv[2], {}};
  for (int i = 3; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) fail_usage(flag + " needs a value (" + usage + ")");
    const std::string value = argv[i + 1];
    Shape& s = o.shape;
    if (flag == "--preset") {
      if (value != "odd") fail_usage("--preset expects 'odd', got '" + value + "'");
      s = odd_shape();
    } else if (flag == "--batch") {
      s.batch = parse_int(flag, value, 1);
    } else if (flag == "--length") {
      s.length = parse_int(flag, value, 1);
    } else if (flag == "--queries") {
      s.query_run = parse_int(flag, value, 0);
    } else if (flag == "--hole") {
      s.hole = parse_int(flag, value, 0);
      s.query_run = 0;
    } else if (flag == "--qk-dim") {
      s.qk_dim = parse_int(flag, value, 1);
    } else if (flag == "--v-dim") {
      s.v_dim = parse_int(flag, value, 1);
    } else if (flag == "--seed") {
      s.seed = static_cast<unsigned>(parse_int(flag, value, 0));
    } else if (flag == "--keys") {
      if (value == "complement") {
        s.key_set = KeySet::kComplement;
      } else if (value == "queries") {
        s.key_set = KeySet::kQueries;
      } else {
        s.key_set = KeySet::kCount;
        s.key_count = parse_int("--keys", value, 0);
      }
    } else {
      fail_usage("unknown option '" + flag + "' (" + usage + ")");
    }
  }
  const Shape& s = o.shape;
  if (s.query_run > s.length) fail_usage("--queries must be <= --length");
  if (s.query_run == 0) {
    const int side = static_cast<int>(std::lround(std::sqrt(s.length)));
    if (side * side != s.length || s.hole > side) {
      fail_usage("--hole needs --length a square side² with side >= hole, got length " +
                 std::to_string(s.length) + " and hole " + std::to_string(s.hole));
    }
  }
  if (s.key_set == KeySet::kCount && s.key_count > s.length - s.query_run) {
    fail_usage("--keys N must be at most the non-query positions (" +
               std::to_string(s.length - s.query_run) + ")");
  }
  if (s.odd && s.batch < 3) fail_usage("--preset odd needs --batch >= 3");
  return o;
}

// ----------------------------------------------------------------------------- masks
struct Random {
  uint64_t state;
  double uniform() {  // [0, 1)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) * 0x1p-53;
  }
  double normal() {
    return std::sqrt(-2 * std::log(1 - uniform())) * std::cos(6.283185307179586 * uniform());
  }
};

// (B, L) masks, 1 = in the set.
struct Masks {
  std::vector<uint8_t> queries, keys;
};

inline Masks make_masks(const Shape& s) {
  const int B = s.batch, L = s.length;
  Masks m{std::vector<uint8_t>(size_t(B) * L), std::vector<uint8_t>(size_t(B) * L)};
  const int side = static_cast<int>(std::lround(std::sqrt(L)));
  const int corner = (side - s.hole) / 2, run_begin = (L - s.query_run) / 2;
  for (int b = 0; b < B; ++b) {
    int keys_left = s.key_count;
    for (int p = 0; p < L; ++p) {
      bool query;
      if (s.odd && b == 1) {
        query = true;
      } else if (s.odd && b == 2) {
        query = false;
      } else if (s.query_run > 0) {
        query = p >= run_begin && p < run_begin + s.query_run;
      } else {
        const int r = p / side - corner, c = p % side - corner;
        query = r >= 0 && r < s.hole && c >= 0 && c < s.hole;
      }
      bool key = s.key_set == KeySet::kQueries ? query : !query;
      if (s.key_set == KeySet::kCount) key = !query && keys_left-- > 0;
      m.queries[size_t(b) * L + p] = query;
      m.keys[size_t(b) * L + p] = key;
    }
  }
  return m;
}

// The stable partition of a mask (what partition_indices computes): per sample the true
// positions ascending, then the false ones; count = the true ones.
struct HostPartition {
  std::vector<int32_t> index, count;  // (B, L), (B,)
  int length = 0;
  // Positions of sample b in the set (complement: outside it), in order.
  std::vector<int> positions(int b, bool complement) const {
    const int32_t* row = index.data() + size_t(b) * length;
    return complement ? std::vector<int>(row + count[b], row + length)
                      : std::vector<int>(row, row + count[b]);
  }
};

inline HostPartition partition(const std::vector<uint8_t>& mask, int B, int L) {
  HostPartition p{std::vector<int32_t>(size_t(B) * L), std::vector<int32_t>(size_t(B)), L};
  for (int b = 0; b < B; ++b) {
    int32_t* row = p.index.data() + size_t(b) * L;
    int slot = 0;
    for (int l = 0; l < L; ++l) if (mask[size_t(b) * L + l]) row[slot++] = l;
    p.count[b] = slot;
    for (int l = 0; l < L; ++l) if (!mask[size_t(b) * L + l]) row[slot++] = l;
  }
  return p;
}

// ----------------------------------------------------------------------------- tensors
// A contiguous (B, L, D) tensor in dtype T; at() reads the stored (rounded) value.
template <typename T>
struct Tensor {
  int batch = 0, length = 0, width = 0;
  std::vector<T> values;
  Tensor() = default;
  Tensor(int B, int L, int D) : batch(B), length(L), width(D), values(size_t(B) * L * D) {}
  size_t offset(int b, int l) const { return (size_t(b) * length + l) * width; }
  double at(int b, int l, int d) const { return Element<T>::to_double(values[offset(b, l) + d]); }
  void set(int b, int l, int d, double x) { values[offset(b, l) + d] = Element<T>::from_double(x); }
};

// Normal values times `scale`, rounded to T.
template <typename T>
Tensor<T> random_tensor(int B, int L, int D, double scale, Random& rng) {
  Tensor<T> t(B, L, D);
  for (T& x : t.values) x = Element<T>::from_double(scale * rng.normal());
  return t;
}

// ----------------------------------------------------------------------------- device memory
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
#ifdef DSA_OPS_HOST_EMULATION
    std::printf("error: %s failed: %s\n", what, dsa_ops::emulation::last_error_message());
#else
    std::printf("error: %s failed: %s\n", what, cudaGetErrorString(status));
#endif
    std::printf("result FAIL\n");
    std::exit(1);
  }
}

inline void synchronize() {
#ifndef DSA_OPS_HOST_EMULATION
  check_cuda(cudaDeviceSynchronize(), "kernel");
#endif
}

// A device array of E. Fresh arrays hold 0xFF bytes (NaN in every float type, -1 in int32),
// so an element the kernels never write fails the check. Under the host emulation the
// kernels run on the host and the array is host memory.
template <typename E>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : size_(n) {
#ifdef DSA_OPS_HOST_EMULATION
    host_.assign(n, E{});
    std::memset(static_cast<void*>(host_.data()), 0xFF, n * sizeof(E));
    data_ = host_.data();
#else
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&data_), std::max<size_t>(n, 1) * sizeof(E)),
               "cudaMalloc");
    check_cuda(cudaMemset(data_, 0xFF, n * sizeof(E)), "cudaMemset");
#endif
  }
  explicit DeviceArray(const std::vector<E>& values) : DeviceArray(values.size()) {
#ifdef DSA_OPS_HOST_EMULATION
    std::copy(values.begin(), values.end(), host_.begin());
#else
    check_cuda(cudaMemcpy(data_, values.data(), size_ * sizeof(E), cudaMemcpyHostToDevice),
               "cudaMemcpy to device");
#endif
  }
  DeviceArray(DeviceArray&& other) noexcept
      : size_(other.size_), data_(std::exchange(other.data_, nullptr))
#ifdef DSA_OPS_HOST_EMULATION
      , host_(std::move(other.host_))
#endif
  {
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray& operator=(DeviceArray&&) = delete;
  ~DeviceArray() {
#ifndef DSA_OPS_HOST_EMULATION
    cudaFree(data_);
#endif
  }
  E* get() const { return data_; }
  std::vector<E> download() const {
    std::vector<E> values(size_);
#ifdef DSA_OPS_HOST_EMULATION
    std::copy(host_.begin(), host_.end(), values.begin());
#else
    check_cuda(cudaMemcpy(values.data(), data_, size_ * sizeof(E), cudaMemcpyDeviceToHost),
               "cudaMemcpy to host");
#endif
    return values;
  }

 private:
  size_t size_;
  E* data_ = nullptr;
#ifdef DSA_OPS_HOST_EMULATION
  std::vector<E> host_;
#endif
};

// ----------------------------------------------------------------------------- checks
// Error model of one output element against its float64 reference `want`, computed from
// the same stored inputs. Every output here is a float32-accumulated sum of products of
// terms (Σ|terms| = `magnitude`, which the reference returns beside `want`):
//  - a factor the kernel rounds to the 16-bit dtype before its product (P before P·V, dS
//    before dS·K) moves each term by at most u·|term|: `rounded_factors`·u·magnitude, with
//    the factor 2 of FlashAttention's rule (the kernel may err twice as much as rounding);
//  - float32 accumulation of n terms and the exp2.approx exponentials (relative error
//    below 2^-22): (n + Dqk + 16)·2^-24 + 2^-22, relative to magnitude, times the largest
//    |score| + 1 for outputs behind an exponential (a score's error moves p relatively);
//  - storing the result in its dtype: half an ulp, u_store·|want|.
// For a log-sum-exp or KL (float32 outputs), magnitude is 1 per log of a positive sum (its
// absolute error is the sum's relative error) plus Σ p|s| for the KL's weighted scores.
// A wrong fragment, barrier or mask is off by O(|want|), far above all of these.
struct ErrorModel {
  double relative = 0;  // × magnitude
  double store = 0;     // × |want|
};

template <typename T>
ErrorModel error_model(int rounded_factors, int terms, int qk_dim, double max_abs_score,
                       double store_roundoff = Element<T>::kUnitRoundoff) {
  const double float32 = (terms + qk_dim + 16) * 0x1p-24 + 0x1p-22;
  return {2.0 * rounded_factors * Element<T>::kUnitRoundoff + float32 * (1 + max_abs_score),
          store_roundoff};
}

class Checker {
 public:
  // One output: got (as stored), want and magnitude (float64 reference), `model`. A +inf
  // want must be met exactly; a NaN or unwritten element always fails.
  void check(const char* name, const std::vector<double>& got, const std::vector<double>& want,
             const std::vector<double>& magnitude, const ErrorModel& model) {
    double max_error = 0, worst = 0;
    size_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double g = got[i], w = want[i];
      double ratio;
      if (std::isinf(w)) {
        ratio = g == w ? 0 : std::numeric_limits<double>::infinity();
      } else {
        const double error = std::isfinite(g) ? std::abs(g - w) : std::numeric_limits<double>::infinity();
        const double tolerance = model.relative * magnitude[i] + model.store * std::abs(w);
        max_error = std::max(max_error, error);
        ratio = error == 0 ? 0 : tolerance > 0 ? error / tolerance : std::numeric_limits<double>::infinity();
      }
      worst = std::max(worst, ratio);
      if (!(ratio <= 1)) {
        if (bad < 3) std::printf("  %s[%zu]: got %.8g want %.8g\n", name, i, g, w);
        ++bad;
      }
    }
    std::printf("check %s max_err=%.3g worst=%.3g bad=%zu of=%zu\n", name, max_error, worst, bad,
                want.size());
    failed_ |= bad > 0;
  }
  void check_exact(const char* name, bool ok) {
    std::printf("check %s max_err=0 worst=%d bad=%d of=1\n", name, ok ? 0 : 1, ok ? 0 : 1);
    failed_ |= !ok;
  }
  int finish() const {
    std::printf("result %s\n", failed_ ? "FAIL" : "PASS");
    return failed_ ? 1 : 0;
  }

 private:
  bool failed_ = false;
};

template <typename T>
std::vector<double> to_doubles(const std::vector<T>& values) {
  std::vector<double> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = Element<T>::to_double(values[i]);
  return out;
}

inline void print_count(const char* kernel, double flops, double exponentials) {
  std::printf("count %s flops=%.0f exp=%.0f\n", kernel, flops, exponentials);
}

}  // namespace sim
