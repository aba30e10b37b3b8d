// fastbald::batchbald on the CPU: greedy BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019).
//
// Per greedy step, the gain of candidate x given the chosen points S is
//   g(x) = H(y_x | Y_S) - E_k H[p_k(.|x)] = sum_r a_r H(m_r(x)) - cond(x)      (batchbald_math.h)
// over the rows r of a configuration table of S:
//   exact   while C^|S| <= num_samples: every configuration, a_r = q_r (its mixture probability);
//   sampled beyond: M = K * floor(num_samples / K) configurations drawn from the K-mixture as
//           batchbald_redux draws them (floor(M/K) per MC sample k, then a class per chosen point
//           from p_k), a_r = 1/M. They are drawn once, at the first sampled step, and each later
//           chosen point only appends one sampled class per configuration (no re-sampling).
// The reported score of step i is the joint MI of the first i+1 points (batchbald_redux's
// CandidateBatch.scores): H(Y_S) + sum_r a_r H(m_r(x)) - sum_{S + x} cond.
//
// Work: every candidate's m_r(x) for all rows is a [rows, K] x [K, C] product: a register-blocked
// kernel over tiles of candidates (lanes) and blocks of rows, the mixture entropy fused behind it,
// so nothing of size N x rows x C (or rows x C per candidate) is stored; memory is the table
// O(rows K) plus a K x C tile per thread. Inner products in float32 (dtype float32: every term is
// >= 0, so the relative error of a sum of K products is <= K 2^-24, no cancellation) or float64;
// the sums over rows and everything outside the hot loop in float64.
//
// Lazy greedy (lazy=true, default): greedy gains only decrease as S grows (BatchBALD is
// submodular), so each candidate keeps its last gain as an upper bound; candidates are evaluated
// by decreasing bound, in doubling waves, until the best gain found exceeds every bound left. In
// the exact regime that is the argmax of a full evaluation (up to rounding); in the sampled regime
// the bound is min(old bound, estimate + 3 standard errors), and every bound is reset to +inf when
// the configurations are drawn (the first sampled step evaluates every candidate: an exact gain
// does not bound a Monte-Carlo estimate). lazy=false evaluates every candidate.
//
// The kernel body (batchbald_kernel.inc) is compiled three times, for AVX-512, AVX2+FMA and the
// x86-64 baseline (or just the baseline elsewhere), and chosen at run time from the CPU
// (FASTBALD_CPU_KERNEL=avx512|avx2|base overrides, as for the scoring kernel).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../batchbald_checks.h"
#include "../batchbald_math.h"

namespace fastbald {
namespace batchbald {
namespace {

template <class Tin>
struct Input {
  const Tin* data;
  int64_t N, K, C;
  int64_t sN, sK, sC;
  double at(int64_t n, int64_t k, int64_t c) const {
    return static_cast<double>(data[n * sN + k * sK + c * sC]);
  }
};

struct Result {
  std::vector<int64_t> indices;
  std::vector<double> scores;
  std::vector<int64_t> evaluated;
};

// Says what is wrong with pool item n (found invalid by the first pass). Always throws.
template <class Tin>
[[noreturn]] void report_bad_item(const Input<Tin>& in, int64_t n, double tol) {
  for (int64_t k = 0; k < in.K; ++k)
    for (int64_t c = 0; c < in.C; ++c) {
      const double v = in.at(n, k, c);
      TORCH_CHECK_VALUE(!std::isnan(v), "fastbald.batchbald: log_probs[", n, ", ", k, ", ", c,
                        "] is NaN (pool item ", n, ", MC sample ", k, ", class ", c, ")");
      TORCH_CHECK_VALUE(v != std::numeric_limits<double>::infinity(), "fastbald.batchbald: log_probs[",
                        n, ", ", k, ", ", c, "] is +inf (pool item ", n, ")");
    }
  for (int64_t k = 0; k < in.K; ++k) {
    double s = 0;
    for (int64_t c = 0; c < in.C; ++c) s += std::exp(in.at(n, k, c));
    TORCH_CHECK_VALUE(std::abs(s - 1.0) <= tol, "fastbald.batchbald: log_probs[", n, ", ", k,
                      ", :] is not a log-probability vector: its exp sums to ", s,
                      ", not 1 (tolerance prob_tol=", tol,
                      "); pass log_softmax outputs, or prob_tol=inf to skip this check");
  }
  TORCH_CHECK_VALUE(false, "fastbald.batchbald: pool item ", n, " is invalid");
}

// The configuration table of the chosen points (float64 master copy).
struct Table {
  int64_t K, C, M;
  bool sampled = false;
  int64_t rows = 1;
  std::vector<double> w;  // [rows][K], rows sum to 1
  std::vector<double> q;  // exact: q_r (mixture probability); sampled: log q_r
  double h_chosen = 0;    // H(Y_S): exact -sum q log q; sampled -mean log q
  std::vector<int64_t> chosen;

  Table(int64_t K_, int64_t C_, int64_t M_) : K(K_), C(C_), M(M_), w(K_, 1.0 / K_), q(1, 1.0) {}

  template <class Tin>
  std::vector<double> probs(const Input<Tin>& in, int64_t n) const {
    std::vector<double> p(K * C);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) p[k * C + c] = std::exp(in.at(n, k, c));
    return p;
  }

  // Appends one sampled class of point p (the step-th chosen) to every sampled configuration.
  void append(const std::vector<double>& p, int64_t step, uint64_t seed) {
    const int64_t S = rows / K;
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k_r = r / S;  // the MC sample this configuration was drawn from
        const int64_t c = sample_class(p.data() + k_r * C, C, 1,
                                       uniform01(seed, static_cast<uint64_t>(step),
                                                 static_cast<uint64_t>(r)));
        q[r] += append_row(w.data() + r * K, p.data(), K, C, c);  // s >= w[k_r] p_{k_r}(c) > 0
      }
    });
  }

  template <class Tin>
  void add(const Input<Tin>& in, int64_t n, int64_t step, uint64_t seed) {
    chosen.push_back(n);
    const std::vector<double> p = probs(in, n);
    if (!sampled && rows * C <= M) {
      std::vector<double> nw(rows * C * K), nq(rows * C);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t r2 = r * C + c;
          nq[r2] = q[r] * extend_row(w.data() + r * K, p.data() + c, C, K, nw.data() + r2 * K);
        }
      w.swap(nw);
      q.swap(nq);
      rows *= C;
      h_chosen = 0;
      for (double v : q) h_chosen -= xlogx(v);
      return;
    }
    if (!sampled) {
      // First sampled step: draw M configurations of all chosen points (in their order).
      sampled = true;
      rows = K * (M / K);
      w.assign(rows * K, 1.0 / K);
      q.assign(rows, 0.0);
      for (size_t i = 0; i < chosen.size(); ++i)
        append(i + 1 == chosen.size() ? p : probs(in, chosen[i]), static_cast<int64_t>(i), seed);
    } else {
      append(p, step, seed);
    }
    double s = 0;
    for (double v : q) s += v;
    h_chosen = -s / static_cast<double>(rows);
  }

  // Packs w into register blocks Wp[block][k][RB] (compute type T) and the row weights a.
  template <class T>
  void pack(int RB, std::vector<T>& Wp, std::vector<double>& a) const {
    const int64_t nb = (rows + RB - 1) / RB;
    Wp.assign(nb * K * RB, static_cast<T>(1.0 / K));
    a.assign(nb * RB, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t blk = r / RB, i = r % RB;
      for (int64_t k = 0; k < K; ++k) Wp[(blk * K + k) * RB + i] = static_cast<T>(w[r * K + k]);
      a[r] = sampled ? 1.0 / static_cast<double>(rows) : q[r];
    }
  }
};

}  // namespace

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")
#define FB_BB_NS avx512
#define FB_BB_VBYTES 64
#include "batchbald_kernel.inc"
#undef FB_BB_NS
#undef FB_BB_VBYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FB_BB_NS avx2
#define FB_BB_VBYTES 32
#include "batchbald_kernel.inc"
#undef FB_BB_NS
#undef FB_BB_VBYTES
#pragma GCC pop_options
#endif

#define FB_BB_NS base
#define FB_BB_VBYTES 16
#include "batchbald_kernel.inc"
#undef FB_BB_NS
#undef FB_BB_VBYTES

#pragma GCC diagnostic pop

namespace {

// The kernel build to run: FASTBALD_CPU_KERNEL if set, else the widest the CPU supports.
int pick_arch() {
  const char* forced = std::getenv("FASTBALD_CPU_KERNEL");
#if defined(__x86_64__) || defined(_M_X64)
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (forced != nullptr && std::string(forced) == "avx512" && has512) return 2;
  if (forced != nullptr && std::string(forced) == "avx2" && has2) return 1;
  if (forced != nullptr && std::string(forced) == "base") return 0;
  return has512 ? 2 : has2 ? 1 : 0;
#else
  (void)forced;
  return 0;
#endif
}

template <class Tin, class T>
Result dispatch(const Input<Tin>& in, int64_t b, int64_t M, uint64_t seed, bool lazy, double tol) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (pick_arch()) {
    case 2:
      return avx512::run<Tin, T>(in, b, M, seed, lazy, tol);
    case 1:
      return avx2::run<Tin, T>(in, b, M, seed, lazy, tol);
    default:
      break;
  }
#endif
  return base::run<Tin, T>(in, b, M, seed, lazy, tol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batchbald_cpu(const at::Tensor& log_probs,
                                                             int64_t batch_size,
                                                             int64_t num_samples, int64_t seed,
                                                             bool use_double, bool lazy,
                                                             double prob_tol) {
  check_batchbald_args(log_probs, batch_size, num_samples, prob_tol);
  const auto st = log_probs.scalar_type();
  const int64_t N = log_probs.size(0), K = log_probs.size(1), C = log_probs.size(2);
  at::Tensor x = log_probs;
  if (st == at::kHalf || st == at::kBFloat16) x = x.to(at::kFloat);
  Result r;
  const auto run = [&](auto tag_in) {
    using Tin = decltype(tag_in);
    const Input<Tin> in{x.data_ptr<Tin>(), N, K, C, x.stride(0), x.stride(1), x.stride(2)};
    r = use_double ? dispatch<Tin, double>(in, batch_size, num_samples,
                                           static_cast<uint64_t>(seed), lazy, prob_tol)
                   : dispatch<Tin, float>(in, batch_size, num_samples,
                                          static_cast<uint64_t>(seed), lazy, prob_tol);
  };
  if (x.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  auto idx = at::empty({batch_size}, log_probs.options().dtype(at::kLong));
  auto sc = at::empty({batch_size}, log_probs.options().dtype(at::kDouble));
  auto ev = at::empty({batch_size}, log_probs.options().dtype(at::kLong));
  if (batch_size > 0) {
    std::memcpy(idx.data_ptr<int64_t>(), r.indices.data(), batch_size * sizeof(int64_t));
    std::memcpy(sc.data_ptr<double>(), r.scores.data(), batch_size * sizeof(double));
    std::memcpy(ev.data_ptr<int64_t>(), r.evaluated.data(), batch_size * sizeof(int64_t));
  }
  return {idx, sc, ev};
}

}  // namespace
}  // namespace batchbald
}  // namespace fastbald

TORCH_LIBRARY_IMPL(fastbald, CPU, m) {
  m.impl("batchbald", &fastbald::batchbald::batchbald_cpu);
}
