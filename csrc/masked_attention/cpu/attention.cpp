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
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

// The 64-byte vector types never cross a function boundary (every helper is always-inline),
// so GCC's note that their calling convention depends on AVX-512 concerns no call here.
#pragma GCC diagnostic ignored "-Wpsabi"

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
const char* const kTilesBackwardOp = "attention_tiles_backward_";

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

// A block's scores take at most this many bytes. Measured at layer 14 on a 2-core Zen 4 (1 MiB
// L2 per core), blocks on both threads: 1, 2 and 4 MiB tiles within 3 % of each other on one
// thread and on two, 512 KiB 5 % slower (every GEMM packs the whole of V again); the tile is
// still read back from the cache (L2 or L3) by the P·V product.
constexpr int64_t kBlockScoreBytes = int64_t{2} << 20;
constexpr int64_t kMinTileRows = 16;

// A float32 scratch buffer of at least `elements`, kept per thread and per `slot` between
// calls: a multi-MiB allocation can come back as fresh pages (glibc returns freed memory at the
// top of its heap to the system), and a page fault costs about 1 µs per 4 KiB here.
at::Tensor thread_scratch(int slot, int64_t elements) {
  thread_local std::array<at::Tensor, 3> scratch;
  at::Tensor& buffer = scratch.at(slot);
  if (!buffer.defined() || buffer.numel() < elements)
    buffer = at::empty({elements}, at::TensorOptions().dtype(at::kFloat));
  return buffer;
}

// `a·b` (+ `bias`) into `out`, or added to `into`: 2-D operands (one sample) or 3-D (a batch).
void product_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  a.dim() == 2 ? at::mm_out(out, a, b) : at::bmm_out(out, a, b);
}
void biased_product_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                        const at::Tensor& b) {
  a.dim() == 2 ? at::addmm_out(out, bias, a, b) : at::baddbmm_out(out, bias, a, b);
}
void accumulate_product_(at::Tensor& into, const at::Tensor& a, const at::Tensor& b) {
  a.dim() == 2 ? into.addmm_(a, b) : into.baddbmm_(a, b);
}

// The work of one task: query rows [first_row, first_row + rows) of one sample (a row tile of
// a large problem; 2-D operands), or `samples` whole samples (small problems; 3-D operands,
// one batched GEMM for all of them).
struct Block {
  int64_t first_sample, samples, first_row, rows;
  bool batched;

  at::Tensor of(const at::Tensor& t) const {  // this block's rows of q, grad_out, out, grad_q
    return batched ? t.narrow(0, first_sample, samples) : t[first_sample].narrow(0, first_row, rows);
  }
  at::Tensor keys_of(const at::Tensor& t) const {  // this block's k, v, grad_k, grad_v, key_bias
    return batched ? t.narrow(0, first_sample, samples) : t[first_sample];
  }
  at::Tensor view(const at::Tensor& buffer, int64_t keys) const {  // its (…, rows, Nk) scores
    const int64_t elements = samples * rows * keys;
    const at::Tensor front = buffer.narrow(0, 0, elements);
    return batched ? front.view({samples, rows, keys}) : front.view({rows, keys});
  }
};

// One group of samples as the kernels see it: q (G, Nq, Dqk) with the scale folded in,
// k (G, Nk, Dqk), v (G, Nk, Dv), key_bias (G, 1, Nk) or none (−inf on padded key slots).
// Its blocks: row tiles of one sample when a sample's scores exceed kBlockScoreBytes, else
// batches of whole samples, at least as many batches as threads (when there are samples).
struct Group {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& key_bias;
  // Read once, outside any parallel region (inside one, ATen reports a single thread).
  const int64_t threads = at::get_num_threads();

  int64_t samples() const { return q.size(0); }
  int64_t queries() const { return q.size(1); }
  int64_t keys() const { return k.size(1); }
  int64_t sample_bytes() const { return queries() * keys() * int64_t{sizeof(float)}; }
  bool tiled() const { return sample_bytes() > kBlockScoreBytes; }
  // Query rows per tile (the last tile of a sample may be shorter).
  int64_t tile_rows() const {
    return std::clamp<int64_t>(kBlockScoreBytes / (keys() * int64_t{sizeof(float)}), kMinTileRows,
                               std::max<int64_t>(queries(), 1));
  }
  int64_t tiles_per_sample() const { return (queries() + tile_rows() - 1) / tile_rows(); }
  int64_t samples_per_batch() const {
    const int64_t by_budget = std::max<int64_t>(1, kBlockScoreBytes / std::max<int64_t>(sample_bytes(), 1));
    const int64_t by_threads = (samples() + threads - 1) / threads;
    return std::max<int64_t>(1, std::min(by_budget, by_threads));
  }
  int64_t blocks() const {
    return tiled() ? samples() * tiles_per_sample()
                   : (samples() + samples_per_batch() - 1) / samples_per_batch();
  }
  Block block(int64_t index) const {
    if (tiled()) {
      const int64_t rows = tile_rows(), first = index % tiles_per_sample() * rows;
      return {index / tiles_per_sample(), 1, first, std::min(rows, queries() - first), false};
    }
    const int64_t per_batch = samples_per_batch(), first = index * per_batch;
    return {first, std::min(per_batch, samples() - first), 0, queries(), true};
  }
  int64_t buffer_elements() const {
    return tiled() ? tile_rows() * keys() : samples_per_batch() * queries() * keys();
  }

  // P of a block, written over `scores` (its view of a buffer), with the lse of its rows.
  // Forward and backward compute it for the same blocks with the same calls from the same
  // kind of thread (a task of a parallel region, where ATen's GEMMs run serially), so the
  // backward's P is the forward's bit for bit: BLAS rounding depends on how a call is split.
  void probabilities(const Block& block, at::Tensor& scores, float* lse) const {
    const at::Tensor block_k_t = block.keys_of(k).transpose(-1, -2);
    if (key_bias) {
      biased_product_out(scores, block.keys_of(*key_bias), block.of(q), block_k_t);
    } else {
      product_out(scores, block.of(q), block_k_t);
    }
    const at::Tensor rows = scores.view({-1, keys()});
    run_rows(rows, rows, lse, 0, rows.size(0));
  }
  float* lse_of(const Block& block, float* lse) const {
    return lse + block.first_sample * queries() + block.first_row;
  }

  void check(const char* op) const {
    for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}})
      check_float32_cpu(op, name, *t);
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == k.size(0) &&
                    k.size(0) == v.size(0) && q.size(2) == k.size(2) && k.size(1) == v.size(1),
                op, ": q (G, Nq, Dqk), k (G, Nk, Dqk) and v (G, Nk, Dv) must agree, got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    if (key_bias) {
      check_float32_cpu(op, "key_bias", *key_bias);
      TORCH_CHECK(key_bias->sizes() == at::IntArrayRef({samples(), 1, keys()}), op,
                  ": key_bias must be (G, 1, Nk), got ", key_bias->sizes());
    }
    TORCH_CHECK(keys() > 0 || queries() == 0, op, ": k must hold at least one key");
  }
};

void check_output(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  check_float32_cpu(op, name, t);
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous(), op, ": ", name, " must be contiguous ",
              sizes, ", got ", t.sizes());
}

// Exact softmax attention of one group, block by block → out (G, Nq, Dv), lse (G, Nq): per
// block S = q·Kᵀ (+ key_bias), the row pass over S in place (P and lse), out = P·V. Blocks
// are split over the intra-op threads, each running its GEMMs on one thread: at the module's
// shapes, GEMMs of a few hundred rows split over threads scale worse than whole tiles do.
void attention_tiles_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_bias, const at::Tensor& out,
                         const at::Tensor& lse) {
  const Group group{q, k, v, key_bias};
  group.check(kTilesOp);
  check_output(kTilesOp, "out", out, {group.samples(), group.queries(), v.size(2)});
  check_output(kTilesOp, "lse", lse, {group.samples(), group.queries()});
  if (group.samples() == 0 || group.queries() == 0) return;
  at::parallel_for(0, group.blocks(), 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = thread_scratch(0, group.buffer_elements());
    for (int64_t index = begin; index < end; ++index) {
      const Block block = group.block(index);
      at::Tensor probs = block.view(buffer, group.keys());
      group.probabilities(block, probs, group.lse_of(block, lse.data_ptr<float>()));
      at::Tensor block_out = block.of(out);
      product_out(block_out, probs, block.keys_of(v));
    }
  });
}

// Per-task buffers of the backward: a block's P and dS, and the row pass's unused lse.
struct BackwardBuffers {
  at::Tensor probs, grad_scores, lse;
  explicit BackwardBuffers(const Group& group)
      : probs(thread_scratch(0, group.buffer_elements())),
        grad_scores(thread_scratch(1, group.buffer_elements())),
        lse(thread_scratch(2, group.buffer_elements() / std::max<int64_t>(group.keys(), 1))) {}
};

// The gradients of one block: dQ of its rows into grad_q, and its dK, dV added to
// `grad_k`, `grad_v` (the block's own samples, or one sample's partial sums).
// dV += Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K, dK += dSᵀ·Q, P recomputed by the
// forward's calls.
void backward_block(const Group& group, const Block& block, const at::Tensor& grad_out,
                    const at::Tensor& out, const at::Tensor& grad_q, at::Tensor& grad_k,
                    at::Tensor& grad_v, BackwardBuffers& buffers) {
  at::Tensor probs = block.view(buffers.probs, group.keys());
  group.probabilities(block, probs, buffers.lse.data_ptr<float>());
  const at::Tensor block_grad_out = block.of(grad_out);
  accumulate_product_(grad_v, probs.transpose(-1, -2), block_grad_out);
  at::Tensor grad_scores = block.view(buffers.grad_scores, group.keys());
  product_out(grad_scores, block_grad_out, block.keys_of(group.v).transpose(-1, -2));
  grad_scores.sub_((block_grad_out * block.of(out)).sum(-1, true)).mul_(probs);
  at::Tensor block_grad_q = block.of(grad_q);
  product_out(block_grad_q, grad_scores, block.keys_of(group.k));
  accumulate_product_(grad_k, grad_scores.transpose(-1, -2), block.of(group.q));
}

// Gradients of attention_tiles_ (same group, its out) → grad_q (with respect to the scaled
// q), grad_k, grad_v, on the forward's blocks. dK and dV sum over a sample's tiles. Batches
// of whole samples own their samples' dK, dV; a tiled sample's tiles go in order to one
// thread when there are at least as many samples as threads, else they are split over the
// threads, each adding into its own dK, dV, which are summed after.
void attention_tiles_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const std::optional<at::Tensor>& key_bias,
                                  const at::Tensor& grad_q, const at::Tensor& grad_k,
                                  const at::Tensor& grad_v) {
  const char* op = kTilesBackwardOp;
  const Group group{q, k, v, key_bias};
  group.check(op);
  const int64_t samples = group.samples(), queries = group.queries();
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, {"out", &out}})
    check_output(op, name, *t, {samples, queries, v.size(2)});
  check_output(op, "grad_q", grad_q, q.sizes());
  check_output(op, "grad_k", grad_k, k.sizes());
  check_output(op, "grad_v", grad_v, v.sizes());
  grad_k.zero_();
  grad_v.zero_();
  if (samples == 0 || queries == 0) return;
  const int64_t tiles = group.tiles_per_sample(), threads = group.threads;
  if (!group.tiled() || samples >= threads) {
    // Whole batches, or whole tiled samples: each task owns its samples' dK and dV.
    const int64_t tasks = group.tiled() ? samples : group.blocks();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      BackwardBuffers buffers(group);
      for (int64_t task = begin; task < end; ++task) {
        for (int64_t tile = 0; tile < (group.tiled() ? tiles : 1); ++tile) {
          const Block block = group.block(group.tiled() ? task * tiles + tile : task);
          at::Tensor block_grad_k = block.keys_of(grad_k), block_grad_v = block.keys_of(grad_v);
          backward_block(group, block, grad_out, out, grad_q, block_grad_k, block_grad_v, buffers);
        }
      }
    });
    return;
  }
  const at::Tensor partial_k = at::empty({threads, group.keys(), k.size(2)}, k.options());
  const at::Tensor partial_v = at::empty({threads, group.keys(), v.size(2)}, v.options());
  for (int64_t sample = 0; sample < samples; ++sample) {
    partial_k.zero_();
    partial_v.zero_();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      BackwardBuffers buffers(group);
      at::Tensor thread_k = partial_k[at::get_thread_num()];
      at::Tensor thread_v = partial_v[at::get_thread_num()];
      for (int64_t tile = begin; tile < end; ++tile)
        backward_block(group, group.block(sample * tiles + tile), grad_out, out, grad_q, thread_k,
                       thread_v, buffers);
    });
    at::Tensor sample_grad_k = grad_k[sample], sample_grad_v = grad_v[sample];
    at::sum_out(sample_grad_k, partial_k, 0);
    at::sum_out(sample_grad_v, partial_v, 0);
  }
}

// How many threads this library's at::parallel_for spreads `tasks` one-element tasks over.
// ATen's parallel_for is a header template: compiled without OpenMP while torch uses it, its
// parallel branch compiles away and every kernel here runs on the calling thread, with no
// error (setup.py passes -fopenmp). tests/test_cpu_kernels.py and `python -m dsa_ops` ask.
int64_t kernel_threads(int64_t tasks) {
  TORCH_CHECK(tasks >= 0, "kernel_threads: tasks must be >= 0, got ", tasks);
  std::vector<int> thread_of(tasks, -1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) thread_of[task] = at::get_thread_num();
  });
  std::sort(thread_of.begin(), thread_of.end());
  return std::unique(thread_of.begin(), thread_of.end()) - thread_of.begin();
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa_ops, CPU, m) {
  m.impl("softmax_rows_", &softmax_rows_cpu);
  m.impl("attention_tiles_", &attention_tiles_cpu);
  m.impl("attention_tiles_backward_", &attention_tiles_backward_cpu);
}

// No tensor argument to dispatch on: the one kernel serves every dispatch key.
TORCH_LIBRARY_IMPL(dsa_ops, CompositeExplicitAutograd, m) {
  m.impl("kernel_threads", &kernel_threads);
}

}  // namespace dsa_ops
