// FlashAttention-2's forward (Dao-AILab/flash-attention csrc/flash_attn, its sm80 code path)
// as the simulated-GPU anchor: the kernel FA2 runs for head dim 128 on sm_90
// (Flash_fwd_kernel_traits<128, 128, 64, 4>), float16, one head, no dropout, causal mask,
// alibi or softcap; every sample has `queries` rows and `keys` keys (multiples of 128 and
// 64: FA2's even-M/N path). Built by benchmarks/sim/run.py against a checkout of FA2 and
// CUTLASS (not vendored; stand-ins for two ATen headers in fa2_stub/).
//
//   fa2_forward --batch B --queries M --keys N
// Prints the counts, the check of every output element against a float64 reference
// (sim_host.h's error model: P rounded to float16 before P·V) and the result.
#include <cmath>
#include <cstring>

#include "flash.h"
#include "flash_fwd_kernel.h"

#include "sim_host.h"

// A named namespace: nvcc's registration stub cannot name a kernel in an anonymous one when
// CUTLASS's headers open anonymous namespaces too.
namespace fa2_anchor {

constexpr int kHeadDim = 128;
using Traits = Flash_fwd_kernel_traits<kHeadDim, 128, 64, 4, false, false, cutlass::half_t>;

__global__ void fa2_forward_kernel(__grid_constant__ const flash::Flash_fwd_params params) {
  // <Traits, dropout, causal, local, alibi, even MN, even K, softcap, return softmax>
  flash::compute_attn<Traits, false, false, false, false, true, true, false, false>(params);
}

}  // namespace fa2_anchor

int main(int argc, char** argv) {
  using namespace sim;
  using namespace fa2_anchor;
  int batch = 1, queries = 1024, keys = 3072;
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) fail_usage(flag + " needs a value (usage: fa2_forward --batch B --queries M --keys N)");
    if (flag == "--batch") batch = parse_int(flag, argv[i + 1], 1);
    else if (flag == "--queries") queries = parse_int(flag, argv[i + 1], 128);
    else if (flag == "--keys") keys = parse_int(flag, argv[i + 1], 64);
    else fail_usage("unknown option '" + flag + "' (usage: fa2_forward --batch B --queries M --keys N)");
  }
  if (queries % Traits::kBlockM || keys % Traits::kBlockN) {
    fail_usage("--queries must be a multiple of 128 and --keys of 64 (FA2's even-M/N kernel), got " +
               std::to_string(queries) + " and " + std::to_string(keys));
  }
  std::printf("family fa2-forward dtype float16 B=%d queries=%d keys=%d D=%d\n", batch, queries,
              keys, kHeadDim);
  Random rng{7};
  const sim::Tensor<__half> q = random_tensor<__half>(batch, queries, kHeadDim, 1.0, rng);
  const sim::Tensor<__half> k = random_tensor<__half>(batch, keys, kHeadDim, 1.0, rng);
  const sim::Tensor<__half> v = random_tensor<__half>(batch, keys, kHeadDim, 1.0, rng);
  const DeviceArray<__half> dq(q.values), dk(k.values), dv(v.values),
      dout(size_t(batch) * queries * kHeadDim);
  const DeviceArray<float> dlse(size_t(batch) * queries);

  flash::Flash_fwd_params p;
  std::memset(static_cast<void*>(&p), 0, sizeof(p));
  p.q_ptr = dq.get(); p.k_ptr = dk.get(); p.v_ptr = dv.get(); p.o_ptr = dout.get();
  p.softmax_lse_ptr = dlse.get();
  p.q_batch_stride = p.o_batch_stride = int64_t(queries) * kHeadDim;
  p.k_batch_stride = p.v_batch_stride = int64_t(keys) * kHeadDim;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = kHeadDim;  // one head
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = kHeadDim;
  p.h = p.h_k = 1; p.h_h_k_ratio = 1;
  p.b = batch; p.seqlen_q = queries; p.seqlen_k = keys; p.d = p.d_rounded = kHeadDim;
  p.seqlen_q_rounded = (queries + 127) / 128 * 128;
  p.seqlen_k_rounded = (keys + 127) / 128 * 128;
  const double scale = 1 / std::sqrt(double(kHeadDim));
  p.scale_softmax = static_cast<float>(scale);
  p.scale_softmax_log2 = static_cast<float>(scale * M_LOG2E);
  p.p_dropout = 1.f; p.p_dropout_in_uint8_t = 255; p.rp_dropout = 1.f;
  p.scale_softmax_rp_dropout = p.scale_softmax;
  p.window_size_left = p.window_size_right = -1;
  p.is_seqlens_k_cumulative = true;
  p.num_splits = 1;

  const double pairs = double(batch) * queries * keys;
  print_count("fa2_forward_kernel", 4 * pairs * kHeadDim, pairs);
  const int smem = Traits::kSmemSize;
  if (smem >= 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(fa2_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute");
  }
  fa2_forward_kernel<<<dim3(queries / Traits::kBlockM, batch), Traits::kNThreads, smem>>>(p);
  check_cuda(cudaGetLastError(), "fa2_forward_kernel launch");
  synchronize();

  // Reference: every row of every sample.
  std::vector<double> want(size_t(batch) * queries * kHeadDim, 0), magnitude(want.size(), 0),
      lse_want(size_t(batch) * queries), lse_magnitude(lse_want.size(), 1);
  double max_abs_score = 0;
  std::vector<double> s(keys);
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < queries; ++i) {
      double m = -INFINITY;
      for (int j = 0; j < keys; ++j) {
        double dot = 0;
        for (int d = 0; d < kHeadDim; ++d) dot += q.at(b, i, d) * k.at(b, j, d);
        s[j] = scale * dot;
        m = std::max(m, s[j]);
        max_abs_score = std::max(max_abs_score, std::abs(s[j]));
      }
      double sum = 0;
      for (double x : s) sum += std::exp(x - m);
      const size_t row = size_t(b) * queries + i;
      lse_want[row] = m + std::log(sum);
      for (int j = 0; j < keys; ++j) {
        const double p_ij = std::exp(s[j] - lse_want[row]);
        for (int d = 0; d < kHeadDim; ++d) {
          want[row * kHeadDim + d] += p_ij * v.at(b, j, d);
          magnitude[row * kHeadDim + d] += std::abs(p_ij * v.at(b, j, d));
        }
      }
    }
  }
  Checker checker;
  checker.check("out", to_doubles(dout.download()), want, magnitude,
                error_model<__half>(1, keys, kHeadDim, max_abs_score));
  checker.check("lse", to_doubles(dlse.download()), lse_want, lse_magnitude,
                error_model<__half>(0, keys, kHeadDim, max_abs_score, 0x1p-24));
  return checker.finish();
}
