// The kernels of csrc/ (partition, masked-attention forward and backward, single and dual
// branch, the streaming attention KL forward and backward) run through their launchers on the host emulation, every output element compared
// with a float64 reference. No torch: this is what the sanitizer builds run
// (make emulate-sanitize) and what the planted-fault test builds (tests/test_cuda_emulation.py).
//
//   kernels_check [--quick]     exit status 0 when every case agrees; --quick: one float16 case
//                               (two key tiles per block: a dropped barrier shows)
//
// Cases: float32 / float16 / bfloat16; Dqk in every padded bucket (16, 32, 64); Dv with a
// partial last 64-column chunk, in every forward and key-side V width (forward: 64, 128,
// 256, two halves; key side: 64, 128, chunks of 128) and up to 512; L not a multiple of the 64-row tile (or the forward's 128-key one);
// q, k, v as strided channel slices; q, k, v one element past 16-byte alignment with an
// odd row pitch and Dqk, Dv not whole 16-byte chunks (the gather's scalar fallback); per
// batch an empty, a full and random masks; cross, self, independent
// and dual. Tolerances are loose (the pytest suite has the tight ones): a wrong fragment,
// a missing barrier or an unwritten element is off by far more.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emulation/emulation.h"
#include "attention_kl/launch.cuh"
#include "masked_attention/launch.cuh"
#include "partition/partition.cuh"

namespace {
using namespace dsa_ops;
using namespace dsa_ops::masked_attention;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

enum class Form { kCross, kSelf, kIndependent, kDual };

struct Case {
  Form form;
  ScalarKind dtype;
  int batch, length, qk_dim, v_dim;
  bool strided;
  bool misaligned = false;  // strided, one element off: rows and chunks not 16-byte aligned
};

const char* form_name(Form form) {
  switch (form) {
    case Form::kCross: return "cross";
    case Form::kSelf: return "self";
    case Form::kIndependent: return "independent";
    case Form::kDual: return "dual";
  }
  return "?";
}

const char* dtype_name(ScalarKind dtype) {
  switch (dtype) {
    case ScalarKind::kFloat32: return "float32";
    case ScalarKind::kFloat16: return "float16";
    case ScalarKind::kBFloat16: return "bfloat16";
  }
  return "?";
}

// Values are stored in the case's dtype; `exact` holds what they are after rounding.
struct Storage {
  ScalarKind dtype;
  std::vector<unsigned char> bytes;
  size_t element_size() const { return dtype == ScalarKind::kFloat32 ? 4 : 2; }
  void resize(size_t n) { bytes.assign(n * element_size(), 0xFF); }  // 0xFF: NaN
  void* data() { return bytes.data(); }
  double get(size_t i) const {
    if (dtype == ScalarKind::kFloat32) {
      float v;
      std::memcpy(&v, &bytes[i * 4], 4);
      return v;
    }
    if (dtype == ScalarKind::kFloat16) {
      __half v;
      std::memcpy(static_cast<void*>(&v), &bytes[i * 2], 2);
      return __half2float(v);
    }
    __nv_bfloat16 v;
    std::memcpy(static_cast<void*>(&v), &bytes[i * 2], 2);
    return __bfloat162float(v);
  }
  double set(size_t i, double value) {
    const float f = static_cast<float>(value);
    if (dtype == ScalarKind::kFloat32) {
      std::memcpy(&bytes[i * 4], &f, 4);
    } else if (dtype == ScalarKind::kFloat16) {
      const __half h = __float2half_rn(f);
      std::memcpy(&bytes[i * 2], static_cast<const void*>(&h), 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(f);
      std::memcpy(&bytes[i * 2], static_cast<const void*>(&h), 2);
    }
    return get(i);
  }
};

struct Random {
  uint64_t state;
  double uniform() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) / static_cast<double>(1ull << 53);
  }
  double normal() { return std::sqrt(-2 * std::log(uniform() + 1e-12)) * std::cos(6.283185307179586 * uniform()); }
};

// One (B, L, D) operand: a channel slice of a packed (B, L, C) buffer when strided.
struct Operand {
  Storage* storage;
  int64_t offset, batch_stride, row_stride;
  int width;
  size_t at(int b, int l, int d) const { return offset + b * batch_stride + l * row_stride + d; }
  MatrixArg arg() const {
    return {storage->bytes.data() + offset * storage->element_size(), batch_stride, row_stride};
  }
};

struct Problem {  // one attention branch: inputs, masks, outputs
  std::vector<uint8_t> query_mask, key_mask;  // (B, L)
};

// Per batch: sample 0 has no hole, sample 1 is all hole, the others random; `other` is an
// independent random key set.
struct Masks {
  std::vector<uint8_t> hole, background, other;
  Problem problem(Form form) const {  // the dual form's first branch (cross)
    switch (form) {
      case Form::kSelf: return {hole, hole};
      case Form::kIndependent: return {hole, other};
      default: return {hole, background};
    }
  }
};

Masks random_masks(int B, int L, Random& rng) {
  Masks m{std::vector<uint8_t>(size_t(B) * L), std::vector<uint8_t>(size_t(B) * L),
          std::vector<uint8_t>(size_t(B) * L)};
  for (int b = 0; b < B; ++b) {
    for (int l = 0; l < L; ++l) {
      m.hole[b * L + l] = b == 0 ? 0 : b == 1 ? 1 : rng.uniform() < 0.4;
      m.other[b * L + l] = rng.uniform() < 0.3;
      m.background[b * L + l] = !m.hole[b * L + l];
    }
  }
  return m;
}

double value(const Operand& o, int b, int l, int d) { return o.storage->get(o.at(b, l, d)); }

// Calls f(b, i, keys) for every query row i of sample b with keys (their positions, in order).
template <typename F>
void for_each_query_row(const Problem& p, int B, int L, F&& f) {
  for (int b = 0; b < B; ++b) {
    std::vector<int> keys;
    for (int j = 0; j < L; ++j) if (p.key_mask[b * L + j]) keys.push_back(j);
    for (int i = 0; i < L && !keys.empty(); ++i) {
      if (p.query_mask[b * L + i]) f(b, i, keys);
    }
  }
}

// float64 reference of one branch: out, lse, dq, dk, dv (zeros / +inf off the sets).
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Case& c, const Operand& q, const Operand& k, const Operand& v,
                    const Operand& grad_out, const Problem& p, double scale) {
  const int B = c.batch, L = c.length, Dk = c.qk_dim, Dv = c.v_dim;
  Reference r;
  r.out.assign(size_t(B) * L * Dv, 0);
  r.lse.assign(size_t(B) * L, kInf);
  r.dq.assign(size_t(B) * L * Dk, 0);
  r.dk.assign(size_t(B) * L * Dk, 0);
  r.dv.assign(size_t(B) * L * Dv, 0);
  const auto val = value;
  for_each_query_row(p, B, L, [&](int b, int i, const std::vector<int>& keys) {
    std::vector<double> s(keys.size());
    double m = -kInf;
    for (size_t n = 0; n < keys.size(); ++n) {
      double dot = 0;
      for (int d = 0; d < Dk; ++d) dot += val(q, b, i, d) * val(k, b, keys[n], d);
      s[n] = scale * dot;
      m = std::max(m, s[n]);
    }
    double sum = 0;
    for (double& x : s) sum += (x = std::exp(x - m));
    for (double& x : s) x /= sum;  // P
    r.lse[b * L + i] = m + std::log(sum);
    std::vector<double> dp(keys.size(), 0);
    double delta = 0;
    for (size_t n = 0; n < keys.size(); ++n) {
      for (int d = 0; d < Dv; ++d) {
        r.out[(size_t(b) * L + i) * Dv + d] += s[n] * val(v, b, keys[n], d);
        dp[n] += val(grad_out, b, i, d) * val(v, b, keys[n], d);
      }
      delta += s[n] * dp[n];
    }
    for (size_t n = 0; n < keys.size(); ++n) {
      const double ds = s[n] * (dp[n] - delta);
      for (int d = 0; d < Dk; ++d) {
        r.dq[(size_t(b) * L + i) * Dk + d] += scale * ds * val(k, b, keys[n], d);
        r.dk[(size_t(b) * L + keys[n]) * Dk + d] += scale * ds * val(q, b, i, d);
      }
      for (int d = 0; d < Dv; ++d) {
        r.dv[(size_t(b) * L + keys[n]) * Dv + d] += s[n] * val(grad_out, b, i, d);
      }
    }
  });
  return r;
}

int failures = 0;

void compare(const std::string& what, const Storage& got, const std::vector<double>& want,
             double tolerance) {
  double magnitude = 1, error = 0;
  for (double w : want) if (std::isfinite(w)) magnitude = std::max(magnitude, std::abs(w));
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got.get(i), w = want[i];
    if (std::isinf(w) ? g != w : !(std::abs(g - w) <= tolerance * magnitude)) ++bad;
    if (std::isfinite(w)) error = std::max(error, std::isfinite(g) ? std::abs(g - w) : kInf);
  }
  std::printf("  %-10s max error %.2e  %s\n", what.c_str(), error, bad ? "FAIL" : "ok");
  if (bad) {
    ++failures;
    std::printf("  %-10s %zu of %zu elements off (NaN = never written or poison read)\n",
                what.c_str(), bad, want.size());
  }
}

struct Partition {
  std::vector<int32_t> index, count;
};

Partition partition(const std::vector<uint8_t>& mask, int B, int L, const std::string& what) {
  Partition p{std::vector<int32_t>(size_t(B) * L, std::numeric_limits<int32_t>::min()),
              std::vector<int32_t>(size_t(B), std::numeric_limits<int32_t>::min())};
  const cudaError_t status = launch_partition_indices(reinterpret_cast<const bool*>(mask.data()), L, 1,
                                                      p.index.data(), p.count.data(), B, L, nullptr);
  bool ok = status == cudaSuccess;
  for (int b = 0; b < B && ok; ++b) {
    std::vector<int32_t> want;
    for (int l = 0; l < L; ++l) if (mask[b * L + l]) want.push_back(l);
    const int32_t count = static_cast<int32_t>(want.size());
    for (int l = 0; l < L; ++l) if (!mask[b * L + l]) want.push_back(l);
    ok = p.count[b] == count && std::equal(want.begin(), want.end(), p.index.begin() + b * L);
  }
  std::printf("  %-10s %s\n", what.c_str(), ok ? "ok" : "FAIL");
  failures += !ok;
  return p;
}

void run_case(const Case& c, uint64_t seed) {
  std::printf("%s %s B=%d L=%d Dqk=%d Dv=%d%s%s\n", form_name(c.form), dtype_name(c.dtype),
              c.batch, c.length, c.qk_dim, c.v_dim, c.strided ? " strided" : "",
              c.misaligned ? " misaligned" : "");
  const int B = c.batch, L = c.length, Dk = c.qk_dim, Dv = c.v_dim;
  const int branches = c.form == Form::kDual ? 2 : 1;
  const double tolerance = c.dtype == ScalarKind::kFloat32 ? 1e-4 : c.dtype == ScalarKind::kFloat16 ? 2e-2 : 8e-2;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dk));
  Random rng{seed};

  const Masks masks = random_masks(B, L, rng);
  Problem problems[2];
  problems[0] = masks.problem(c.form);
  if (c.form == Form::kDual) problems[1] = masks.problem(Form::kSelf);

  // Inputs: per branch q, k, v (and dO) in one packed buffer, or contiguous each.
  const int offset = c.misaligned ? 1 : 0;
  const int channels = 2 * Dk + Dv + offset;
  std::vector<Storage> inputs(static_cast<size_t>(branches)), grad_outs(static_cast<size_t>(branches));
  std::vector<Operand> q(static_cast<size_t>(branches)), k(static_cast<size_t>(branches)), v(static_cast<size_t>(branches)), grad_out(static_cast<size_t>(branches));
  for (int br = 0; br < branches; ++br) {
    Storage& storage = inputs[br];
    storage.dtype = c.dtype;
    storage.resize(size_t(B) * L * channels);
    for (size_t i = 0; i < size_t(B) * L * channels; ++i) storage.set(i, rng.normal());
    if (c.strided) {
      q[br] = {&storage, offset, int64_t(L) * channels, channels, Dk};
      k[br] = {&storage, offset + Dk, int64_t(L) * channels, channels, Dk};
      v[br] = {&storage, offset + 2 * Dk, int64_t(L) * channels, channels, Dv};
    } else {
      q[br] = {&storage, 0, int64_t(L) * Dk, Dk, Dk};
      k[br] = {&storage, int64_t(B) * L * Dk, int64_t(L) * Dk, Dk, Dk};
      v[br] = {&storage, 2 * int64_t(B) * L * Dk, int64_t(L) * Dv, Dv, Dv};
    }
    grad_outs[br].dtype = c.dtype;
    grad_outs[br].resize(size_t(B) * L * Dv);
    for (size_t i = 0; i < size_t(B) * L * Dv; ++i) grad_outs[br].set(i, rng.normal());
    grad_out[br] = {&grad_outs[br], 0, int64_t(L) * Dv, Dv, Dv};
  }

  // Partitions: the dual launch rotates one partition for the background, as bindings.cpp does.
  const Partition queries = partition(problems[0].query_mask, B, L, "partition");
  const Partition keys = c.form == Form::kIndependent ? partition(problems[0].key_mask, B, L, "partition")
                                                      : queries;
  auto rowset = [](const Partition& p, bool complement) {
    return RowSetArg{p.index.data(), p.count.data(), complement};
  };
  const RowSetArg key_sets[2] = {
      rowset(keys, c.form == Form::kCross || c.form == Form::kDual), rowset(queries, false)};

  struct Outputs {
    Storage out, grad_q, grad_k, grad_v;
    std::vector<float> lse, workspace;
  };
  std::vector<Outputs> outputs(static_cast<size_t>(branches));
  ForwardLaunch forward;
  BackwardLaunch backward;
  forward.branches = backward.branches = branches;
  forward.dtype = backward.dtype = c.dtype;
  forward.batch = backward.batch = B;
  forward.length = backward.length = L;
  forward.qk_dim = backward.qk_dim = Dk;
  forward.v_dim = backward.v_dim = Dv;
  forward.scale = backward.scale = static_cast<float>(scale);
  for (int br = 0; br < branches; ++br) {
    Outputs& o = outputs[br];
    for (Storage* s : {&o.out, &o.grad_v}) { s->dtype = c.dtype; s->resize(size_t(B) * L * Dv); }
    for (Storage* s : {&o.grad_q, &o.grad_k}) { s->dtype = c.dtype; s->resize(size_t(B) * L * Dk); }
    o.lse.assign(size_t(B) * L, std::numeric_limits<float>::quiet_NaN());
    o.workspace.assign(size_t(backward_workspace_floats(c.dtype, B, L, Dk, Dv)),
                       std::numeric_limits<float>::quiet_NaN());
    ForwardBranch& f = forward.branch[br];
    f.q = q[br].arg(); f.k = k[br].arg(); f.v = v[br].arg();
    f.out = {o.out.data(), int64_t(L) * Dv, Dv};
    f.lse = o.lse.data();
    f.queries = rowset(queries, false);
    f.keys = key_sets[br];
    BackwardBranch& g = backward.branch[br];
    g.grad_out = grad_out[br].arg(); g.q = f.q; g.k = f.k; g.v = f.v; g.out = f.out;
    g.lse = o.lse.data();
    g.grad_q = {o.grad_q.data(), int64_t(L) * Dk, Dk};
    g.grad_k = {o.grad_k.data(), int64_t(L) * Dk, Dk};
    g.grad_v = {o.grad_v.data(), int64_t(L) * Dv, Dv};
    g.workspace = o.workspace.data();
    g.queries = f.queries;
    g.keys = f.keys;
  }
  const cudaError_t forward_status = launch_forward(forward, nullptr);
  const cudaError_t backward_status =
      forward_status == cudaSuccess ? launch_backward(backward, nullptr) : forward_status;
  if (forward_status != cudaSuccess || backward_status != cudaSuccess) {
    std::printf("  launch failed: %s\n", emulation::last_error_message());
    ++failures;
    return;
  }
  for (int br = 0; br < branches; ++br) {
    const std::string suffix = branches == 2 ? (br == 0 ? "[cross]" : "[self]") : "";
    const Reference want = reference(c, q[br], k[br], v[br], grad_out[br], problems[br], scale);
    Storage lse{ScalarKind::kFloat32, {}};
    lse.bytes.resize(outputs[br].lse.size() * 4);
    std::memcpy(lse.bytes.data(), outputs[br].lse.data(), lse.bytes.size());
    compare("out" + suffix, outputs[br].out, want.out, tolerance);
    compare("lse" + suffix, lse, want.lse, tolerance);
    compare("dq" + suffix, outputs[br].grad_q, want.dq, tolerance);
    compare("dk" + suffix, outputs[br].grad_k, want.dk, tolerance);
    compare("dv" + suffix, outputs[br].grad_v, want.dv, tolerance);
  }
}

// ----------------------------------------------------------------------------- attention KL
// float64 reference of KL(E_oracle‖E) per row, its lse's and the gradients for grad_kl.
struct KlReference {
  std::vector<double> kl, lse, lse_oracle, dq, dk;
};

KlReference kl_reference(const Case& c, const Operand (&x)[4], const std::vector<double>& grad_kl,
                         const Problem& p, double scale) {
  const int B = c.batch, L = c.length, Dk = c.qk_dim;
  KlReference r;
  r.kl.assign(size_t(B) * L, 0);
  r.lse.assign(size_t(B) * L, kInf);
  r.lse_oracle.assign(size_t(B) * L, kInf);
  r.dq.assign(size_t(B) * L * Dk, 0);
  r.dk.assign(size_t(B) * L * Dk, 0);
  const auto val = value;
  for_each_query_row(p, B, L, [&](int b, int i, const std::vector<int>& keys) {
    // log-probabilities of both passes (x[0], x[1] = q, k; x[2], x[3] = the oracle's)
    std::vector<double> log_p[2];
    for (int pass = 0; pass < 2; ++pass) {
      std::vector<double>& s = log_p[pass];
      s.resize(keys.size());
      double m = -kInf;
      for (size_t n = 0; n < keys.size(); ++n) {
        double dot = 0;
        for (int d = 0; d < Dk; ++d) dot += val(x[2 * pass], b, i, d) * val(x[2 * pass + 1], b, keys[n], d);
        m = std::max(m, s[n] = scale * dot);
      }
      double sum = 0;
      for (double v : s) sum += std::exp(v - m);
      const double lse = m + std::log(sum);
      (pass == 0 ? r.lse : r.lse_oracle)[b * L + i] = lse;
      for (double& v : s) v -= lse;
    }
    double kl = 0;
    for (size_t n = 0; n < keys.size(); ++n) {
      kl += std::exp(log_p[1][n]) * (log_p[1][n] - log_p[0][n]);
      const double ds = scale * grad_kl[b * L + i] * (std::exp(log_p[0][n]) - std::exp(log_p[1][n]));
      for (int d = 0; d < Dk; ++d) {
        r.dq[(size_t(b) * L + i) * Dk + d] += ds * val(x[1], b, keys[n], d);
        r.dk[(size_t(b) * L + keys[n]) * Dk + d] += ds * val(x[0], b, i, d);
      }
    }
    r.kl[b * L + i] = kl;
  });
  return r;
}

Storage float_storage(const std::vector<float>& values) {
  Storage s{ScalarKind::kFloat32, {}};
  s.bytes.resize(values.size() * 4);
  std::memcpy(s.bytes.data(), values.data(), s.bytes.size());
  return s;
}

// Forms: cross, self, independent (dual has no KL counterpart). Strided: q, k, q°, k° as
// channel slices of one packed (B, L, 4·Dqk) buffer. grad_kl is small in one sample
// (a mean over rows), the float16 range of the dK kernel's tile scaling.
void run_kl_case(const Case& c, uint64_t seed) {
  std::printf("attention_kl %s %s B=%d L=%d Dqk=%d%s\n", form_name(c.form), dtype_name(c.dtype),
              c.batch, c.length, c.qk_dim, c.strided ? " strided" : "");
  const int B = c.batch, L = c.length, Dk = c.qk_dim;
  const double tolerance = c.dtype == ScalarKind::kFloat32 ? 1e-4 : c.dtype == ScalarKind::kFloat16 ? 2e-2 : 8e-2;
  const double scale = 1.5 / std::sqrt(static_cast<double>(Dk));
  Random rng{seed};
  const Problem problem = random_masks(B, L, rng).problem(c.form);

  Storage storage;
  storage.dtype = c.dtype;
  storage.resize(size_t(B) * L * 4 * Dk);
  for (size_t i = 0; i < size_t(B) * L * 4 * Dk; ++i) storage.set(i, rng.normal());
  Operand x[4];  // q, k, q°, k°
  for (int t = 0; t < 4; ++t) {
    x[t] = c.strided ? Operand{&storage, int64_t(t) * Dk, int64_t(L) * 4 * Dk, 4 * Dk, Dk}
                     : Operand{&storage, int64_t(t) * B * L * Dk, int64_t(L) * Dk, Dk, Dk};
  }
  std::vector<double> grad_kl(size_t(B) * L);
  std::vector<float> grad_kl_f(grad_kl.size());
  for (size_t i = 0; i < grad_kl.size(); ++i) {
    const double magnitude = i / L == 2 ? 1e-3 : 1.0;  // sample 2: dS in float16 subnormals unscaled
    grad_kl[i] = grad_kl_f[i] = static_cast<float>(magnitude * rng.normal());
  }

  const Partition queries = partition(problem.query_mask, B, L, "partition");
  const Partition keys = c.form == Form::kIndependent ? partition(problem.key_mask, B, L, "partition")
                                                      : queries;
  const bool complement = c.form == Form::kCross;
  const float kNaNf = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> kl(size_t(B) * L, kNaNf), lse(kl), lse_oracle(kl);
  Storage grad_q, grad_k;
  for (Storage* s : {&grad_q, &grad_k}) { s->dtype = c.dtype; s->resize(size_t(B) * L * Dk); }

  attention_kl::KlInputs in;
  in.q = x[0].arg(); in.k = x[1].arg(); in.q_oracle = x[2].arg(); in.k_oracle = x[3].arg();
  in.queries = {queries.index.data(), queries.count.data(), false};
  in.keys = {keys.index.data(), keys.count.data(), complement};
  in.dtype = c.dtype;
  in.batch = B; in.length = L; in.qk_dim = Dk;
  in.scale = static_cast<float>(scale);
  attention_kl::KlForwardLaunch forward;
  forward.in = in;
  forward.kl = kl.data(); forward.lse = lse.data(); forward.lse_oracle = lse_oracle.data();
  attention_kl::KlBackwardLaunch backward;
  backward.in = in;
  backward.grad_kl = grad_kl_f.data();
  backward.lse = lse.data(); backward.lse_oracle = lse_oracle.data();
  backward.grad_q = {grad_q.data(), int64_t(L) * Dk, Dk};
  backward.grad_k = {grad_k.data(), int64_t(L) * Dk, Dk};
  const cudaError_t forward_status = attention_kl::launch_forward(forward, nullptr);
  const cudaError_t backward_status =
      forward_status == cudaSuccess ? attention_kl::launch_backward(backward, nullptr) : forward_status;
  if (forward_status != cudaSuccess || backward_status != cudaSuccess) {
    std::printf("  launch failed: %s\n", emulation::last_error_message());
    ++failures;
    return;
  }
  const KlReference want = kl_reference(c, x, grad_kl, problem, scale);
  compare("kl", float_storage(kl), want.kl, tolerance);
  compare("lse", float_storage(lse), want.lse, tolerance);
  compare("lse_oracle", float_storage(lse_oracle), want.lse_oracle, tolerance);
  compare("dq", grad_q, want.dq, tolerance);
  compare("dk", grad_k, want.dk, tolerance);
  // The float16-subnormal sample on its own (compare's tolerance is relative to the
  // largest element, which the other samples set).
  const size_t begin = size_t(2) * L * Dk, end = size_t(3) * L * Dk;
  Storage small_dk{c.dtype, {}};
  small_dk.bytes.assign(grad_k.bytes.begin() + begin * grad_k.element_size(),
                        grad_k.bytes.begin() + end * grad_k.element_size());
  std::vector<double> small_want(want.dk.begin() + begin, want.dk.begin() + end);
  for (double& w : small_want) w *= 1e3;
  for (size_t i = 0; i < small_want.size(); ++i) small_dk.set(i, small_dk.get(i) * 1e3);
  compare("dk[g~1e-3]", small_dk, small_want, tolerance);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  std::vector<Case> cases, kl_cases;
  if (quick) {
    cases.push_back({Form::kCross, ScalarKind::kFloat16, 3, 150, 24, 40, true});
  } else {
    for (ScalarKind dtype : {ScalarKind::kFloat32, ScalarKind::kFloat16, ScalarKind::kBFloat16}) {
      kl_cases.push_back({Form::kCross, dtype, 4, 70, 8, 0, false});
      kl_cases.push_back({Form::kSelf, dtype, 4, 130, 24, 0, true});
      kl_cases.push_back({Form::kIndependent, dtype, 4, 65, 64, 0, true});
    }
    for (ScalarKind dtype : {ScalarKind::kFloat32, ScalarKind::kFloat16, ScalarKind::kBFloat16}) {
      cases.push_back({Form::kCross, dtype, 3, 70, 8, 8, false});
      cases.push_back({Form::kSelf, dtype, 3, 130, 24, 72, true});
      cases.push_back({Form::kIndependent, dtype, 3, 65, 64, 136, true});
      cases.push_back({Form::kDual, dtype, 3, 99, 16, 40, true});
      cases.push_back({Form::kDual, dtype, 3, 70, 20, 36, true, true});
      cases.push_back({Form::kCross, dtype, 3, 70, 32, 264, true});
      cases.push_back({Form::kCross, dtype, 2, 70, 8, 512, true});  // widest V: split key side
      // The paper's head sizes (Dqk 16, Dv 128): query and key sets over several tiles of
      // 64 and of 128 keys (the 16-bit forward's wide tiles, under DSA_OPS_CUDA_EMULATE_ARCH
      // 90), the last ones partial.
      cases.push_back({Form::kCross, dtype, 3, 300, 16, 128, true});
      // Dqk 64: four key lanes over five key tiles, so lane 0 adds a second tile's dQ share
      // to its partial (and, at Dv 264, per V chunk).
      cases.push_back({Form::kSelf, dtype, 2, 300, 40, 136, true});
      cases.push_back({Form::kCross, dtype, 2, 300, 64, 264, false});
    }
  }
  // The backward's key side holds V in chunks of up to 128 columns for 16-bit dtypes (one
  // chunk: no partial dK) and 64 for float32. Each chunk has a partial dQ per key lane: two
  // here (two key tiles, Dqk 24 padded to 32).
  struct Split { ScalarKind dtype; int v_dim, chunks; };
  for (const Split& split : {Split{ScalarKind::kFloat16, 128, 1}, Split{ScalarKind::kBFloat16, 136, 2},
                             Split{ScalarKind::kFloat16, 264, 3}, Split{ScalarKind::kBFloat16, 512, 4},
                             Split{ScalarKind::kFloat32, 64, 1}, Split{ScalarKind::kFloat32, 512, 8}}) {
    const int64_t rows = 2 * 70, qk_dim = 24, lanes = 2;
    const int64_t expected = rows + split.chunks * lanes * rows * qk_dim +
                             (split.chunks > 1 ? split.chunks * rows * qk_dim : 0);
    const int64_t floats = backward_workspace_floats(split.dtype, 2, 70, qk_dim, split.v_dim);
    if (floats != expected) {
      std::printf("key side at Dv=%d: workspace of %lld floats, expected %d chunk(s): %lld  MISMATCH\n",
                  split.v_dim, static_cast<long long>(floats), split.chunks,
                  static_cast<long long>(expected));
      ++failures;
    }
  }
  uint64_t seed = 1;
  for (const Case& c : cases) run_case(c, seed++);
  for (const Case& c : kl_cases) run_kl_case(c, seed++);
  std::printf("FAILURES: %d\n", failures);
  return failures == 0 ? 0 : 1;
}
