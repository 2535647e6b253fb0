// Standalone driver (no torch) of the project's CUDA kernels for the simulated GPU
// (benchmarks/sim/run.py builds it as sm_90 PTX and runs it under GPGPU-Sim), a real GPU,
// or the host emulation (CI). One run = one kernel family at one shape and dtype: inputs
// are random, the partitions come from the host, the kernels run through their launchers,
// and every output element is compared with a float64 reference (sim_host.h's error model).
//
//   dsa_sim FAMILY DTYPE [shape options, sim_host.h]
//   FAMILY: forward         masked attention forward (forward_kernel)
//           backward        its backward: Δ (delta_kernel), dK, dV and dQ shares (key_kernel), dQ (reduce_kernel), from a
//                           host forward's out and lse
//           dual-forward    both DSA branches in one launch: cross (keys = complement of
//                           the queries) and self (keys = the queries)
//           dual-backward   their backward
//           kl-forward      streaming attention KL (kl_forward_kernel)
//           kl-backward     its backward (kl_dq_kernel, kl_dk_kernel), from host lse's
//           partition       partition_indices on a random mask
// Prints the counts of every kernel (FLOPs of the useful query-key pairs, exponentials),
// one check line per output and the result (sim_host.h).
#include "sim_host.h"

#include "attention_kl/launch.cuh"
#include "masked_attention/launch.cuh"
#include "partition/partition.cuh"

namespace {

using namespace sim;
using dsa_ops::MatrixArg;
using dsa_ops::RowSetArg;
using dsa_ops::ScalarKind;
namespace ma = dsa_ops::masked_attention;
namespace kl = dsa_ops::attention_kl;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr const char* kFamilies =
    "forward, backward, dual-forward, dual-backward, kl-forward, kl-backward, partition";

template <typename T>
constexpr ScalarKind kScalarKind = std::is_same_v<T, float>    ? ScalarKind::kFloat32
                                   : std::is_same_v<T, __half> ? ScalarKind::kFloat16
                                                               : ScalarKind::kBFloat16;

// One attention problem's row sets: the query partition and the key set, on host and device.
struct RowSets {
  const HostPartition* queries;
  const HostPartition* keys;
  bool keys_complement;
  std::vector<int> query_positions(int b) const { return queries->positions(b, false); }
  std::vector<int> key_positions(int b) const { return keys->positions(b, keys_complement); }
  // Σ over samples of queries × keys: the pairs every count below is per.
  double pairs(int batch) const {
    double n = 0;
    for (int b = 0; b < batch; ++b) n += double(query_positions(b).size()) * key_positions(b).size();
    return n;
  }
};

struct DevicePartition {
  DeviceArray<int32_t> index, count;
  explicit DevicePartition(const HostPartition& p) : index(p.index), count(p.count) {}
  RowSetArg arg(bool complement) const { return {index.get(), count.get(), complement}; }
};

// The problem of a run: masks → partitions, and the branches' row sets (the dual forms:
// cross then self over the same queries; the others: the --keys choice).
struct Problem {
  Masks masks;
  HostPartition queries, keys;
  DevicePartition device_queries, device_keys;
  std::vector<RowSets> branches;

  Problem(const Shape& s, bool dual)
      : masks(make_masks(s)),
        queries(partition(masks.queries, s.batch, s.length)),
        keys(partition(masks.keys, s.batch, s.length)),
        device_queries(queries),
        device_keys(keys) {
    if (dual) {
      branches = {{&queries, &queries, true}, {&queries, &queries, false}};
    } else if (s.key_set == KeySet::kCount) {
      branches = {{&queries, &keys, false}};
    } else {
      branches = {{&queries, &queries, s.key_set == KeySet::kComplement}};
    }
  }
  RowSetArg query_arg() const { return device_queries.arg(false); }
  RowSetArg key_arg(const RowSets& r) const {
    return (r.keys == &queries ? device_queries : device_keys).arg(r.keys_complement);
  }
  double pairs(int batch) const {
    double n = 0;
    for (const RowSets& r : branches) n += r.pairs(batch);
    return n;
  }
  // The most keys (queries) a query row (key row) sums over, for the error model.
  int max_keys(int batch) const {
    size_t n = 0;
    for (const RowSets& r : branches)
      for (int b = 0; b < batch; ++b) n = std::max(n, r.key_positions(b).size());
    return static_cast<int>(n);
  }
  int max_queries(int batch) const {
    size_t n = 0;
    for (int b = 0; b < batch; ++b) n = std::max(n, queries.positions(b, false).size());
    return static_cast<int>(n);
  }
};

template <typename T>
double dot(const Tensor<T>& a, int b, int i, const Tensor<T>& c, int j) {
  double sum = 0;
  for (int d = 0; d < a.width; ++d) sum += a.at(b, i, d) * c.at(b, j, d);
  return sum;
}

// A float64 output with the magnitude (Σ|terms|) of every element (sim_host.h).
struct Output {
  std::vector<double> want, magnitude;
  Output(size_t n, double fill) : want(n, fill), magnitude(n, 0) {}
};

// ----------------------------------------------------------------------------- masked attention
struct AttentionReference {
  Output out, lse;
  double max_abs_score = 0;
  AttentionReference(const Shape& s) : out(size_t(s.batch) * s.length * s.v_dim, 0),
                                       lse(size_t(s.batch) * s.length, kInf) {}
};

// Calls f(b, i, keys, scores) for every query row i (position) with keys of branch r.
template <typename T, typename F>
void for_each_row(const RowSets& r, const Tensor<T>& q, const Tensor<T>& k, double scale, F&& f) {
  for (int b = 0; b < q.batch; ++b) {
    const std::vector<int> keys = r.key_positions(b);
    if (keys.empty()) continue;
    std::vector<double> s(keys.size());
    for (int i : r.query_positions(b)) {
      for (size_t n = 0; n < keys.size(); ++n) s[n] = scale * dot(q, b, i, k, keys[n]);
      f(b, i, keys, s);
    }
  }
}

// log Σ exp(s) and s replaced by exp(s − lse).
inline double softmax_in_place(std::vector<double>& s) {
  const double m = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (double x : s) sum += std::exp(x - m);
  const double lse = m + std::log(sum);
  for (double& x : s) x = std::exp(x - lse);
  return lse;
}

template <typename T>
AttentionReference forward_reference(const Shape& shape, const RowSets& r, const Tensor<T>& q,
                                     const Tensor<T>& k, const Tensor<T>& v, double scale) {
  AttentionReference ref(shape);
  const int Dv = shape.v_dim;
  for_each_row(r, q, k, scale, [&](int b, int i, const std::vector<int>& keys, std::vector<double>& s) {
    for (double x : s) ref.max_abs_score = std::max(ref.max_abs_score, std::abs(x));
    const size_t row = size_t(b) * shape.length + i;
    ref.lse.want[row] = softmax_in_place(s);
    ref.lse.magnitude[row] = 1;
    for (size_t n = 0; n < keys.size(); ++n)
      for (int d = 0; d < Dv; ++d) {
        const double term = s[n] * v.at(b, keys[n], d);
        ref.out.want[row * Dv + d] += term;
        ref.out.magnitude[row * Dv + d] += std::abs(term);
      }
  });
  return ref;
}

struct GradientReference {
  Output dq, dk, dv;
  GradientReference(const Shape& s)
      : dq(size_t(s.batch) * s.length * s.qk_dim, 0), dk(dq), dv(size_t(s.batch) * s.length * s.v_dim, 0) {}
};

// The backward from the forward's stored out (dtype T) and lse (float32), as the kernels
// get them: P = exp(s − lse), dP = dO·Vᵀ, Δ = rowsum(dO∘O), dS = P∘(dP − Δ). A dS term's
// magnitude is P·(Σ|dO·V| + Σ|dO·O|): what its float32 sums and its rounding act on.
template <typename T>
GradientReference backward_reference(const Shape& shape, const RowSets& r, const Tensor<T>& q,
                                     const Tensor<T>& k, const Tensor<T>& v, const Tensor<T>& out,
                                     const std::vector<float>& lse, const Tensor<T>& grad_out,
                                     double scale) {
  GradientReference g(shape);
  const int Dk = shape.qk_dim, Dv = shape.v_dim, L = shape.length;
  for_each_row(r, q, k, scale, [&](int b, int i, const std::vector<int>& keys, std::vector<double>& s) {
    double delta = 0, delta_magnitude = 0;
    for (int d = 0; d < Dv; ++d) {
      delta += grad_out.at(b, i, d) * out.at(b, i, d);
      delta_magnitude += std::abs(grad_out.at(b, i, d) * out.at(b, i, d));
    }
    const size_t qrow = size_t(b) * L + i;
    for (size_t n = 0; n < keys.size(); ++n) {
      const size_t krow = size_t(b) * L + keys[n];
      const double p = std::exp(s[n] - lse[qrow]);
      double dp = 0, dp_magnitude = 0;
      for (int d = 0; d < Dv; ++d) {
        dp += grad_out.at(b, i, d) * v.at(b, keys[n], d);
        dp_magnitude += std::abs(grad_out.at(b, i, d) * v.at(b, keys[n], d));
      }
      const double ds = p * (dp - delta), ds_magnitude = p * (dp_magnitude + delta_magnitude);
      for (int d = 0; d < Dk; ++d) {
        g.dq.want[qrow * Dk + d] += scale * ds * k.at(b, keys[n], d);
        g.dq.magnitude[qrow * Dk + d] += scale * ds_magnitude * std::abs(k.at(b, keys[n], d));
        g.dk.want[krow * Dk + d] += scale * ds * q.at(b, i, d);
        g.dk.magnitude[krow * Dk + d] += scale * ds_magnitude * std::abs(q.at(b, i, d));
      }
      for (int d = 0; d < Dv; ++d) {
        g.dv.want[krow * Dv + d] += p * grad_out.at(b, i, d);
        g.dv.magnitude[krow * Dv + d] += std::abs(p * grad_out.at(b, i, d));
      }
    }
  });
  return g;
}

template <typename T>
MatrixArg matrix_arg(const DeviceArray<T>& data, const Shape& s, int width) {
  return {data.get(), int64_t(s.length) * width, width};
}

// Per branch: q, k, v (and dO for the backward) random in T.
template <typename T>
struct BranchInputs {
  Tensor<T> q, k, v, grad_out;
  BranchInputs(const Shape& s, Random& rng)
      : q(random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng)),
        k(random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng)),
        v(random_tensor<T>(s.batch, s.length, s.v_dim, 1.0, rng)),
        grad_out(random_tensor<T>(s.batch, s.length, s.v_dim, 1.0, rng)) {}
};

template <typename T>
std::vector<BranchInputs<T>> branch_inputs(const Shape& s, int branches) {
  Random rng{s.seed};
  std::vector<BranchInputs<T>> inputs;
  for (int br = 0; br < branches; ++br) inputs.emplace_back(s, rng);
  return inputs;
}

// What a forward and a backward launch share: branches, dtype, sizes, scale.
template <typename T, typename Launch>
Launch masked_attention_launch(const Shape& s, int branches, double scale) {
  Launch launch;
  launch.branches = branches;
  launch.dtype = kScalarKind<T>;
  launch.batch = s.batch; launch.length = s.length;
  launch.qk_dim = s.qk_dim; launch.v_dim = s.v_dim;
  launch.scale = static_cast<float>(scale);
  return launch;
}

// Output names of the dual forms carry their branch.
inline std::string output_name(const char* name, int branch, int branches) {
  return name + std::string(branches == 1 ? "" : branch == 0 ? "[cross]" : "[self]");
}

template <typename T>
int run_forward(const Shape& s, bool dual) {
  const Problem problem(s, dual);
  const int branches = static_cast<int>(problem.branches.size());
  const double scale = 1 / std::sqrt(double(s.qk_dim));
  const std::vector<BranchInputs<T>> inputs = branch_inputs<T>(s, branches);
  ma::ForwardLaunch launch = masked_attention_launch<T, ma::ForwardLaunch>(s, branches, scale);
  std::vector<DeviceArray<T>> device;  // per branch: q, k, v, out
  std::vector<DeviceArray<float>> lse;
  device.reserve(4 * branches);
  lse.reserve(branches);
  for (int br = 0; br < branches; ++br) {
    const BranchInputs<T>& x = inputs[br];
    device.emplace_back(x.q.values);
    device.emplace_back(x.k.values);
    device.emplace_back(x.v.values);
    device.emplace_back(size_t(s.batch) * s.length * s.v_dim);
    lse.emplace_back(size_t(s.batch) * s.length);
    ma::ForwardBranch& f = launch.branch[br];
    f.q = matrix_arg(device[4 * br], s, s.qk_dim);
    f.k = matrix_arg(device[4 * br + 1], s, s.qk_dim);
    f.v = matrix_arg(device[4 * br + 2], s, s.v_dim);
    f.out = matrix_arg(device[4 * br + 3], s, s.v_dim);
    f.lse = lse[br].get();
    f.queries = problem.query_arg();
    f.keys = problem.key_arg(problem.branches[br]);
  }
  const double pairs = problem.pairs(s.batch);
  print_count("forward_kernel", 2 * pairs * (s.qk_dim + s.v_dim), pairs);
  check_cuda(ma::launch_forward(launch, nullptr), "launch_forward");
  synchronize();

  Checker checker;
  for (int br = 0; br < branches; ++br) {
    const BranchInputs<T>& x = inputs[br];
    const AttentionReference ref =
        forward_reference(s, problem.branches[br], x.q, x.k, x.v, scale);
    const int keys = problem.max_keys(s.batch);
    // P is rounded to T before P·V.
    checker.check(output_name("out", br, branches).c_str(), to_doubles(device[4 * br + 3].download()), ref.out.want,
                  ref.out.magnitude, error_model<T>(1, keys, s.qk_dim, ref.max_abs_score));
    checker.check(output_name("lse", br, branches).c_str(), to_doubles(lse[br].download()), ref.lse.want,
                  ref.lse.magnitude, error_model<T>(0, keys, s.qk_dim, ref.max_abs_score, 0x1p-24));
  }
  return checker.finish();
}

template <typename T>
int run_backward(const Shape& s, bool dual) {
  const Problem problem(s, dual);
  const int branches = static_cast<int>(problem.branches.size());
  const double scale = 1 / std::sqrt(double(s.qk_dim));
  const std::vector<BranchInputs<T>> inputs = branch_inputs<T>(s, branches);
  ma::BackwardLaunch launch = masked_attention_launch<T, ma::BackwardLaunch>(s, branches, scale);
  const size_t rows = size_t(s.batch) * s.length;
  // The forward's results, as the kernels would have stored them (out in T, lse float32).
  std::vector<Tensor<T>> outs;
  std::vector<std::vector<float>> lses;
  std::vector<double> max_abs_scores;
  std::vector<DeviceArray<T>> device;  // per branch: q, k, v, dO, out, dq, dk, dv
  std::vector<DeviceArray<float>> floats;  // per branch: lse, workspace
  device.reserve(8 * branches);
  floats.reserve(2 * branches);
  for (int br = 0; br < branches; ++br) {
    const BranchInputs<T>& x = inputs[br];
    const AttentionReference forward = forward_reference(s, problem.branches[br], x.q, x.k, x.v, scale);
    outs.emplace_back(s.batch, s.length, s.v_dim);
    for (size_t e = 0; e < forward.out.want.size(); ++e)
      outs.back().values[e] = Element<T>::from_double(forward.out.want[e]);
    lses.emplace_back(forward.lse.want.begin(), forward.lse.want.end());
    max_abs_scores.push_back(forward.max_abs_score);
    const Tensor<T>& out = outs.back();
    for (const Tensor<T>* t : {&x.q, &x.k, &x.v, &x.grad_out, &out}) device.emplace_back(t->values);
    device.emplace_back(rows * s.qk_dim);
    device.emplace_back(rows * s.qk_dim);
    device.emplace_back(rows * s.v_dim);
    floats.emplace_back(lses.back());
    floats.emplace_back(size_t(ma::backward_workspace_floats(kScalarKind<T>, s.batch, s.length,
                                                             s.qk_dim, s.v_dim)));
    const DeviceArray<T>* d = &device[8 * br];
    ma::BackwardBranch& g = launch.branch[br];
    g.q = matrix_arg(d[0], s, s.qk_dim);
    g.k = matrix_arg(d[1], s, s.qk_dim);
    g.v = matrix_arg(d[2], s, s.v_dim);
    g.grad_out = matrix_arg(d[3], s, s.v_dim);
    g.out = matrix_arg(d[4], s, s.v_dim);
    g.grad_q = matrix_arg(d[5], s, s.qk_dim);
    g.grad_k = matrix_arg(d[6], s, s.qk_dim);
    g.grad_v = matrix_arg(d[7], s, s.v_dim);
    g.lse = floats[2 * br].get();
    g.workspace = floats[2 * br + 1].get();
    g.queries = problem.query_arg();
    g.keys = problem.key_arg(problem.branches[br]);
  }
  // key_kernel: S, dP, dV, dK, dQ (delta_kernel's rowsum(dO∘O) and reduce_kernel's sums of
  // partials are linear in L, not counted).
  const double pairs = problem.pairs(s.batch);
  print_count("delta_kernel", 0, 0);
  print_count("key_kernel", 2 * pairs * (3 * s.qk_dim + 2 * s.v_dim), pairs);
  print_count("reduce_kernel", 0, 0);
  check_cuda(ma::launch_backward(launch, nullptr), "launch_backward");
  synchronize();

  Checker checker;
  const int terms = s.v_dim + std::max(problem.max_keys(s.batch), problem.max_queries(s.batch));
  for (int br = 0; br < branches; ++br) {
    const BranchInputs<T>& x = inputs[br];
    const GradientReference ref = backward_reference(s, problem.branches[br], x.q, x.k, x.v,
                                                     outs[br], lses[br], x.grad_out, scale);
    // dS is rounded to T before dS·K and dSᵀ·Q, P before Pᵀ·dO.
    const ErrorModel model = error_model<T>(1, terms, s.qk_dim, max_abs_scores[br]);
    const DeviceArray<T>* d = &device[8 * br];
    checker.check(output_name("dq", br, branches).c_str(), to_doubles(d[5].download()), ref.dq.want, ref.dq.magnitude, model);
    checker.check(output_name("dk", br, branches).c_str(), to_doubles(d[6].download()), ref.dk.want, ref.dk.magnitude, model);
    checker.check(output_name("dv", br, branches).c_str(), to_doubles(d[7].download()), ref.dv.want, ref.dv.magnitude, model);
  }
  return checker.finish();
}

// ----------------------------------------------------------------------------- attention KL
// Per query row of the prediction (q, k) and oracle (q°, k°) passes: lse, lse°,
// KL = Σ p°(s° − s) − lse° + lse, and for grad_kl g: dS = g·(p − p°), dQ = scale·dS·K,
// dK = scale·dSᵀ·Q (the prediction's q, k; the oracle gets no gradient).
struct KlReference {
  Output kl, lse, lse_oracle, dq, dk;
  double max_abs_score = 0;
  KlReference(const Shape& s)
      : kl(size_t(s.batch) * s.length, 0), lse(size_t(s.batch) * s.length, kInf), lse_oracle(lse),
        dq(size_t(s.batch) * s.length * s.qk_dim, 0), dk(dq) {}
};

template <typename T>
KlReference kl_reference(const Shape& shape, const RowSets& r, const Tensor<T> (&x)[4],
                         const std::vector<float>& grad_kl, double scale) {
  KlReference ref(shape);
  const int Dk = shape.qk_dim, L = shape.length;
  for_each_row(r, x[0], x[1], scale, [&](int b, int i, const std::vector<int>& keys, std::vector<double>& s) {
    std::vector<double> s_oracle(keys.size());
    for (size_t n = 0; n < keys.size(); ++n) s_oracle[n] = scale * dot(x[2], b, i, x[3], keys[n]);
    const size_t row = size_t(b) * L + i;
    std::vector<double> p = s, p_oracle = s_oracle;
    const double lse = softmax_in_place(p), lse_oracle = softmax_in_place(p_oracle);
    ref.lse.want[row] = lse;
    ref.lse_oracle.want[row] = lse_oracle;
    ref.lse.magnitude[row] = ref.lse_oracle.magnitude[row] = 1;
    double kl = lse - lse_oracle, kl_magnitude = 2;
    // The backward gets the lse's as float32 (what the forward stores): its p, p° use them.
    const float lse_stored = static_cast<float>(lse), lse_oracle_stored = static_cast<float>(lse_oracle);
    for (size_t n = 0; n < keys.size(); ++n) {
      ref.max_abs_score = std::max({ref.max_abs_score, std::abs(s[n]), std::abs(s_oracle[n])});
      kl += p_oracle[n] * (s_oracle[n] - s[n]);
      kl_magnitude += p_oracle[n] * (std::abs(s_oracle[n]) + std::abs(s[n]));
      const double p_stored = std::exp(s[n] - lse_stored),
                   p_oracle_stored = std::exp(s_oracle[n] - lse_oracle_stored);
      const double g = grad_kl[row], ds = g * (p_stored - p_oracle_stored),
                   ds_magnitude = std::abs(g) * (p_stored + p_oracle_stored);
      const size_t krow = size_t(b) * L + keys[n];
      for (int d = 0; d < Dk; ++d) {
        ref.dq.want[row * Dk + d] += scale * ds * x[1].at(b, keys[n], d);
        ref.dq.magnitude[row * Dk + d] += scale * ds_magnitude * std::abs(x[1].at(b, keys[n], d));
        ref.dk.want[krow * Dk + d] += scale * ds * x[0].at(b, i, d);
        ref.dk.magnitude[krow * Dk + d] += scale * ds_magnitude * std::abs(x[0].at(b, i, d));
      }
    }
    ref.kl.want[row] = kl;
    ref.kl.magnitude[row] = kl_magnitude;
  });
  return ref;
}

template <typename T>
int run_kl(const Shape& s, bool backward) {
  Random rng{s.seed};
  const Problem problem(s, false);
  const RowSets& sets = problem.branches[0];
  const double scale = 1 / std::sqrt(double(s.qk_dim));
  const Tensor<T> x[4] = {random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng),
                          random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng),
                          random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng),
                          random_tensor<T>(s.batch, s.length, s.qk_dim, 1.0, rng)};
  const size_t rows = size_t(s.batch) * s.length;
  std::vector<float> grad_kl(rows);
  for (float& g : grad_kl) g = static_cast<float>(rng.normal());
  const KlReference ref = kl_reference(s, sets, x, grad_kl, scale);

  DeviceArray<T> q(x[0].values), k(x[1].values), q_oracle(x[2].values), k_oracle(x[3].values);
  kl::KlInputs in;
  in.q = matrix_arg(q, s, s.qk_dim);
  in.k = matrix_arg(k, s, s.qk_dim);
  in.q_oracle = matrix_arg(q_oracle, s, s.qk_dim);
  in.k_oracle = matrix_arg(k_oracle, s, s.qk_dim);
  in.queries = problem.query_arg();
  in.keys = problem.key_arg(sets);
  in.dtype = kScalarKind<T>;
  in.batch = s.batch; in.length = s.length; in.qk_dim = s.qk_dim;
  in.scale = static_cast<float>(scale);
  const double pairs = problem.pairs(s.batch);
  const int keys = problem.max_keys(s.batch), queries = problem.max_queries(s.batch);
  Checker checker;
  if (!backward) {
    DeviceArray<float> kl_out(rows), lse(rows), lse_oracle(rows);
    kl::KlForwardLaunch launch;
    launch.in = in;
    launch.kl = kl_out.get(); launch.lse = lse.get(); launch.lse_oracle = lse_oracle.get();
    print_count("kl_forward_kernel", 2 * pairs * 2 * s.qk_dim, 2 * pairs);  // both passes
    check_cuda(kl::launch_forward(launch, nullptr), "attention_kl launch_forward");
    synchronize();
    // No 16-bit rounding inside: scores of 16-bit inputs are exact products summed in float32.
    const ErrorModel model = error_model<T>(0, keys, s.qk_dim, ref.max_abs_score, 0x1p-24);
    checker.check("kl", to_doubles(kl_out.download()), ref.kl.want, ref.kl.magnitude, model);
    checker.check("lse", to_doubles(lse.download()), ref.lse.want, ref.lse.magnitude, model);
    checker.check("lse_oracle", to_doubles(lse_oracle.download()), ref.lse_oracle.want,
                  ref.lse_oracle.magnitude, model);
  } else {
    const std::vector<float> lse_values(ref.lse.want.begin(), ref.lse.want.end()),
        lse_oracle_values(ref.lse_oracle.want.begin(), ref.lse_oracle.want.end());
    DeviceArray<float> grad(grad_kl), lse(lse_values), lse_oracle(lse_oracle_values);
    DeviceArray<T> grad_q(rows * s.qk_dim), grad_k(rows * s.qk_dim);
    kl::KlBackwardLaunch launch;
    launch.in = in;
    launch.grad_kl = grad.get(); launch.lse = lse.get(); launch.lse_oracle = lse_oracle.get();
    launch.grad_q = matrix_arg(grad_q, s, s.qk_dim);
    launch.grad_k = matrix_arg(grad_k, s, s.qk_dim);
    // Each kernel: the scores of both passes and one gradient product.
    print_count("kl_dq_kernel", 2 * pairs * 3 * s.qk_dim, 2 * pairs);
    print_count("kl_dk_kernel", 2 * pairs * 3 * s.qk_dim, 2 * pairs);
    check_cuda(kl::launch_backward(launch, nullptr), "attention_kl launch_backward");
    synchronize();
    const ErrorModel model = error_model<T>(1, std::max(keys, queries), s.qk_dim, ref.max_abs_score);
    checker.check("dq", to_doubles(grad_q.download()), ref.dq.want, ref.dq.magnitude, model);
    checker.check("dk", to_doubles(grad_k.download()), ref.dk.want, ref.dk.magnitude, model);
  }
  return checker.finish();
}

// ----------------------------------------------------------------------------- partition
// A random mask (40 % true; with the odd preset sample 1 all true and sample 2 all false).
int run_partition(const Shape& s) {
  Random rng{s.seed};
  std::vector<uint8_t> mask(size_t(s.batch) * s.length);
  for (int b = 0; b < s.batch; ++b)
    for (int l = 0; l < s.length; ++l)
      mask[size_t(b) * s.length + l] = s.odd && b == 1 ? 1 : s.odd && b == 2 ? 0 : rng.uniform() < 0.4;
  const HostPartition want = partition(mask, s.batch, s.length);
  const DeviceArray<uint8_t> device_mask(mask);
  DeviceArray<int32_t> index(mask.size()), count(size_t(s.batch));
  print_count("partition_indices_kernel", 0, 0);
  check_cuda(dsa_ops::launch_partition_indices(reinterpret_cast<const bool*>(device_mask.get()),
                                               s.length, 1, index.get(), count.get(), s.batch,
                                               s.length, nullptr),
             "launch_partition_indices");
  synchronize();
  Checker checker;
  checker.check_exact("index", index.download() == want.index);
  checker.check_exact("count", count.download() == want.count);
  return checker.finish();
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_options(argc, argv, kFamilies);
  const Shape& s = o.shape;
  std::printf("family %s dtype %s B=%d L=%d Dqk=%d Dv=%d%s\n", o.family.c_str(), o.dtype.c_str(),
              s.batch, s.length, s.qk_dim, s.v_dim, s.odd ? " odd" : "");
  if (o.family == "partition") return run_partition(s);
  if (s.qk_dim < dsa_ops::kMinQkDim || s.qk_dim > dsa_ops::kMaxQkDim) {
    fail_usage("--qk-dim must be in [" + std::to_string(dsa_ops::kMinQkDim) + ", " +
               std::to_string(dsa_ops::kMaxQkDim) + "], got " + std::to_string(s.qk_dim));
  }
  if (s.v_dim < ma::kMinVDim || s.v_dim > ma::kMaxVDim) {
    fail_usage("--v-dim must be in [" + std::to_string(ma::kMinVDim) + ", " +
               std::to_string(ma::kMaxVDim) + "], got " + std::to_string(s.v_dim));
  }
  return dispatch_dtype(o.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (o.family == "forward") return run_forward<T>(s, false);
    if (o.family == "dual-forward") return run_forward<T>(s, true);
    if (o.family == "backward") return run_backward<T>(s, false);
    if (o.family == "dual-backward") return run_backward<T>(s, true);
    if (o.family == "kl-forward") return run_kl<T>(s, false);
    if (o.family == "kl-backward") return run_kl<T>(s, true);
    fail_usage("FAMILY must be one of " + std::string(kFamilies) + ", got '" + o.family + "'");
  });
}
