// The cpu backend's float32 kernels (dsa_ops/ops/masked_attention/cpu.py; schemas there):
//   softmax_rows_(scores, probs, lse)      each row s of a score tile → probs = softmax(s) and
//                                          lse = max s + log Σ exp(s − max s), in one read
//   attention_tiles_(q, k, v, key_bias, out, lse)   the forward of one group of samples:
//                                          per tile of query rows S = q·Kᵀ, the row pass, P·V
// Why: at the module's layer 14 (Dqk 16, Dv 128) the GEMMs are fast, and the softmax
// (torch.softmax plus the two amax calls that recover the lse) and a Python loop of tiles whose
// GEMMs each split over all threads cost a third of the op's time (docs/using-dsa.md,
// "CPU speed"). Kernels only: autograd, compaction and the fallback live in Python.
//
// The row loop is written once on 16-lane GCC vector types and instantiated for AVX-512,
// AVX2+FMA and the baseline ISA (target attributes: the extension itself is compiled for the
// baseline); the variant follows ATen's CPU capability, so ATEN_CPU_CAPABILITY=avx2
// (make test-avx2) runs the AVX2 variant on any machine. The lanes and the order of every
// reduction are the same in all variants; only FMA contraction differs.
//
// exp(x − max) = 2^y with y = (x − max)·log2 e ≤ 0: y = n + f, |f| ≤ 1/2, a degree-6 minimax
// polynomial for 2^f (relative error 1.6 ulp in float32 arithmetic) and n added to the
// exponent field. Rounding y costs |x − max|·2^-24 relative, the size of the score's own
// rounding. y < −125 (and −inf from padded keys) gives 0. NaN in a row makes its probs and
// lse NaN, as torch.softmax does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace dsa_ops {
namespace {

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

// 2^y for y below this is 0 (also for −inf): the result would not be a normal float.
constexpr float kExp2Lowest = -125.0f;
constexpr float kLog2E = 1.44269504088896341f;

#define DSA_ALWAYS_INLINE inline __attribute__((always_inline))

DSA_ALWAYS_INLINE Floats broadcast(float value) { return Floats{} + value; }

DSA_ALWAYS_INLINE Floats select(Ints mask, Floats if_true, Floats if_false) {
  return (Floats)((mask & (Ints)if_true) | (~mask & (Ints)if_false));
}

// 2^y for y ≤ 0 (NaN stays NaN, y < −125 gives 0): y = n + f with n an integer and
// |f| ≤ 1/2, a degree-6 minimax polynomial for 2^f, and n added to the exponent field.
DSA_ALWAYS_INLINE Floats exp2_nonpositive(Floats y) {
  const Floats round_magic = broadcast(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const Floats n_magic = y + round_magic;
  const Floats f = y - (n_magic - round_magic);
  Floats p = broadcast(1.535336188e-4f);
  p = p * f + broadcast(1.339887440e-3f);
  p = p * f + broadcast(9.618437357e-3f);
  p = p * f + broadcast(5.550332471e-2f);
  p = p * f + broadcast(2.402264791e-1f);
  p = p * f + broadcast(6.931472028e-1f);
  p = p * f + broadcast(1.0f);
  const Ints n = (Ints)n_magic - (Ints)round_magic;
  return select(y < broadcast(kExp2Lowest), broadcast(0.0f), (Floats)((Ints)p + (n << 23)));
}

DSA_ALWAYS_INLINE Floats load(const float* from, int64_t count, float fill) {
  Floats v = broadcast(fill);
  std::memcpy(&v, from, count * sizeof(float));
  return v;
}

DSA_ALWAYS_INLINE void store(float* to, Floats v, int64_t count) {
  std::memcpy(to, &v, count * sizeof(float));
}

DSA_ALWAYS_INLINE void take_max(Floats x, Floats& lane_max, Ints& lane_nan) {
  lane_max = select(x > lane_max, x, lane_max);
  lane_nan |= x != x;
}

// One row of `length` scores → probs (may alias scores) and its lse.
DSA_ALWAYS_INLINE float softmax_row(const float* scores, float* probs, int64_t length) {
  const int64_t full = length - length % kLanes;
  const int64_t tail = length - full;
  const float lowest = -std::numeric_limits<float>::infinity();
  Floats lane_max = broadcast(lowest);
  Ints lane_nan = {};
  for (int64_t i = 0; i < full; i += kLanes) take_max(load(scores + i, kLanes, lowest), lane_max, lane_nan);
  if (tail) take_max(load(scores + full, tail, lowest), lane_max, lane_nan);
  float row_max = lowest;
  bool any_nan = false;
  for (int lane = 0; lane < kLanes; ++lane) {
    row_max = lane_max[lane] > row_max ? lane_max[lane] : row_max;
    any_nan |= lane_nan[lane] != 0;
  }
  if (any_nan) row_max = std::numeric_limits<float>::quiet_NaN();
  const Floats shift = broadcast(row_max), log2e = broadcast(kLog2E);
  Floats lane_sum = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    const Floats e = exp2_nonpositive((load(scores + i, kLanes, lowest) - shift) * log2e);
    store(probs + i, e, kLanes);
    lane_sum += e;
  }
  if (tail) {  // −inf fill: the missing lanes add e^−inf = 0
    const Floats e = exp2_nonpositive((load(scores + full, tail, lowest) - shift) * log2e);
    store(probs + full, e, tail);
    lane_sum += e;
  }
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += lane_sum[lane];
  const Floats inverse = broadcast(1.0f / sum);
  for (int64_t i = 0; i < full; i += kLanes) store(probs + i, load(probs + i, kLanes, 0.0f) * inverse, kLanes);
  if (tail) store(probs + full, load(probs + full, tail, 0.0f) * inverse, tail);
  return row_max + std::log(sum);
}

// Rows [begin, end) of a (rows, length) tile with row strides; one function per ISA.
#define DSA_SOFTMAX_ROWS(NAME, ATTRIBUTES)                                                        \
  ATTRIBUTES void NAME(const float* scores, int64_t score_stride, float* probs,                  \
                       int64_t prob_stride, float* lse, int64_t length, int64_t begin,           \
                       int64_t end) {                                                            \
    for (int64_t row = begin; row < end; ++row)                                                  \
      lse[row] = softmax_row(scores + row * score_stride, probs + row * prob_stride, length);    \
  }

using RowsFunction = void (*)(const float*, int64_t, float*, int64_t, float*, int64_t, int64_t,
                              int64_t);

DSA_SOFTMAX_ROWS(softmax_rows_baseline, )
#if defined(__x86_64__) && defined(__GNUC__)
DSA_SOFTMAX_ROWS(softmax_rows_avx2, __attribute__((target("avx2,fma"))))
DSA_SOFTMAX_ROWS(softmax_rows_avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))))
#endif

// The variant of ATen's CPU capability (which honours ATEN_CPU_CAPABILITY).
RowsFunction rows_function() {
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string capability = at::get_cpu_capability();
  if (capability.rfind("AVX512", 0) == 0) return softmax_rows_avx512;
  if (capability == "AVX2") return softmax_rows_avx2;
#endif
  return softmax_rows_baseline;
}

const char* const kRowsOp = "softmax_rows_";
const char* const kTilesOp = "attention_tiles_";

void check_float32_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// The (rows, length) view of a tile whose rows are one stride apart, unit stride along a row.
at::Tensor row_view(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2 && t.stride(-1) == 1, op, ": ", name,
              " must be (..., rows, length) with unit stride along its rows, got sizes ", t.sizes(),
              " strides ", t.strides());
  return t.view({-1, t.size(-1)});  // fails loudly when the rows are not one stride apart
}

void run_rows(const at::Tensor& scores, const at::Tensor& probs, float* lse, int64_t begin,
              int64_t end) {
  static const RowsFunction function = rows_function();
  function(scores.const_data_ptr<float>(), scores.stride(0), probs.data_ptr<float>(),
           probs.stride(0), lse, scores.size(1), begin, end);
}

// scores, probs: (..., rows, length) float32 CPU, unit stride along a row (probs may be
// scores); lse: (..., rows) float32 contiguous. Rows are split over the intra-op threads.
void softmax_rows_cpu(const at::Tensor& scores, const at::Tensor& probs, const at::Tensor& lse) {
  for (const auto& [name, t] : {std::pair{"scores", &scores}, {"probs", &probs}, {"lse", &lse}})
    check_float32_cpu(kRowsOp, name, *t);
  TORCH_CHECK(scores.sizes() == probs.sizes(), kRowsOp, ": scores and probs must have one shape, got ",
              scores.sizes(), " and ", probs.sizes());
  const at::Tensor score_rows = row_view(kRowsOp, "scores", scores);
  const at::Tensor prob_rows = row_view(kRowsOp, "probs", probs);
  TORCH_CHECK(lse.sizes() == scores.sizes().slice(0, scores.dim() - 1) && lse.is_contiguous(),
              kRowsOp, ": lse must be contiguous with shape ", scores.sizes().slice(0, scores.dim() - 1),
              ", got ", lse.sizes());
  const int64_t rows = score_rows.size(0), length = score_rows.size(1);
  if (rows == 0) return;
  TORCH_CHECK(length > 0, kRowsOp, ": scores must have at least one column");
  // About 64 K scores per task: enough to amortise a task, small enough to balance threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / length);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    run_rows(score_rows, prob_rows, lse.data_ptr<float>(), begin, end);
  });
}

// A tile's scores take at most this many bytes. Measured at layer 14 on a 2-core Zen 4 (1 MiB
// L2 per core): 2 MiB tiles ran as fast as 512 KiB–1 MiB ones on one thread and 15–25 %
// faster on two, where every single-threaded GEMM packs the whole of V again, so fewer,
// larger tiles win; the tile is still read back from the cache (L2 or L3) by the P·V product.
constexpr int64_t kTileScoreBytes = int64_t{2} << 20;
constexpr int64_t kMinTileRows = 16;

// Exact softmax attention of one group of samples, in float32, tile by tile:
//   q (G, Nq, Dqk) with the scale folded in, k (G, Nk, Dqk), v (G, Nk, Dv),
//   key_bias (G, 1, Nk) or None (−inf on padded key slots), out (G, Nq, Dv), lse (G, Nq).
// A task is a tile of query rows of one sample: S = q·Kᵀ (+ key_bias), the row pass over S
// in place (P and lse), out = P·V. Tasks are split over the intra-op threads, each running
// its GEMMs on one thread (ATen's GEMMs run serially inside a parallel region): at the
// module's shapes, the GEMMs of a few hundred rows scale worse over threads than tiles do.
void attention_tiles_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_bias, const at::Tensor& out,
                         const at::Tensor& lse) {
  for (const auto& [name, t] :
       {std::pair{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}})
    check_float32_cpu(kTilesOp, name, *t);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == k.size(0) &&
                  k.size(0) == v.size(0) && q.size(2) == k.size(2) && k.size(1) == v.size(1),
              kTilesOp, ": q (G, Nq, Dqk), k (G, Nk, Dqk) and v (G, Nk, Dv) must agree, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t samples = q.size(0), queries = q.size(1), keys = k.size(1);
  TORCH_CHECK(out.sizes() == at::IntArrayRef({samples, queries, v.size(2)}) && out.is_contiguous(),
              kTilesOp, ": out must be contiguous (G, Nq, Dv), got ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({samples, queries}) && lse.is_contiguous(), kTilesOp,
              ": lse must be contiguous (G, Nq), got ", lse.sizes());
  if (key_bias) {
    check_float32_cpu(kTilesOp, "key_bias", *key_bias);
    TORCH_CHECK(key_bias->sizes() == at::IntArrayRef({samples, 1, keys}), kTilesOp,
                ": key_bias must be (G, 1, Nk), got ", key_bias->sizes());
  }
  if (samples == 0 || queries == 0) return;
  TORCH_CHECK(keys > 0, kTilesOp, ": k must hold at least one key");
  const int64_t rows = std::clamp<int64_t>(kTileScoreBytes / (keys * int64_t{sizeof(float)}),
                                           kMinTileRows, queries);
  const int64_t tiles_per_sample = (queries + rows - 1) / rows;
  float* const lse_data = lse.data_ptr<float>();
  const auto run_tasks = [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = at::empty({rows, keys}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / tiles_per_sample;
      const int64_t first = task % tiles_per_sample * rows;
      const int64_t count = std::min(rows, queries - first);
      at::Tensor scores = buffer.narrow(0, 0, count);
      const at::Tensor tile_q = q[sample].narrow(0, first, count);
      if (key_bias) {
        at::addmm_out(scores, (*key_bias)[sample], tile_q, k[sample].t());
      } else {
        at::mm_out(scores, tile_q, k[sample].t());
      }
      run_rows(scores, scores, lse_data + sample * queries + first, 0, count);
      at::Tensor tile_out = out[sample].narrow(0, first, count);
      at::mm_out(tile_out, scores, v[sample]);
    }
  };
  at::parallel_for(0, samples * tiles_per_sample, 1, run_tasks);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, CPU, m) {
  m.impl("softmax_rows_", &softmax_rows_cpu);
  m.impl("attention_tiles_", &attention_tiles_cpu);
}

}  // namespace dsa_ops
