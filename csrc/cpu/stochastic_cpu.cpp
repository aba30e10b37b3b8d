// CPU kernel of fastbald::stochastic_topk: stochastic batch acquisition (Kirsch et al., TMLR 2023)
// as an exact Gumbel top-k over a pool's scores, fused into one pass with no temporary of size N.
//
// Item i gets the log-weight l_i (mode 0: l = score, given as is; mode 1 "power":
// l = beta * (log(max(score, 0)) - shift); mode 2 "softmax": l = beta * (score - shift); the caller
// passes shift = the largest log max(score, 0) resp. score, so the best item's l is 0 and no l
// overflows to +inf however large beta is) and the key
//     key_i = l_i - log(E_i),  E_i = -log(1 - v_i) ~ Exp(1),  v_i = (splitmix64(seed, i) >> 11 + 1/2) 2^-53,
// i.e. l_i plus a standard Gumbel. The k largest keys are a sample of k items without replacement
// with probabilities proportional to exp(l_i) (Plackett-Luce: Gumbel top-k). The noise of item i is
// a pure function of (seed, i), so the draw does not depend on the number of threads or the chunking,
// and fastbald/stochastic.py reproduces it bit for bit in PyTorch on other devices.
//
// Cost: a running top-k per thread chunk. Once its heap is full (k items), an item can only enter
// if key_i > tau (the heap's worst key), i.e. log E_i < l_i - tau. As E_i >= v_i, that needs
// log2 v_i < (l_i - tau) / ln 2, and log2 v_i >= 10 - clz(53 random bits): so the item needs its
// score above a threshold that depends only on tau and that leading-zero count (a 64-entry table,
// refreshed when tau changes). Per item: one 64-bit hash, a clz, a table load and a compare; only
// the few items that pass (O(k log(N / k)) expected) compute their exact key (std::log, double).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

namespace fastbald {
namespace stochastic {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
constexpr double kLn2 = 0.6931471805599453;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Entry {
  double key;
  int64_t idx;
};
// a before b in the acquisition order: larger key first, ties: lower pool index first.
inline bool better(const Entry& a, const Entry& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// Index of the first non-finite value in p[b, e), or -1. Branch-free blocks (vectorised).
template <typename scalar_t>
int64_t first_nonfinite(const scalar_t* p, int64_t b, int64_t e) {
  constexpr scalar_t kMax = std::numeric_limits<scalar_t>::max();
  for (int64_t i = b; i < e; i += 1024) {
    const int64_t j_end = std::min<int64_t>(i + 1024, e);
    bool bad = false;
    for (int64_t j = i; j < j_end; ++j) bad |= !(std::fabs(p[j]) <= kMax);
    if (bad) {
      for (int64_t j = i; j < j_end; ++j) {
        if (!(std::fabs(p[j]) <= kMax)) return j;
      }
    }
  }
  return -1;
}

// The log-weight of score x.
template <int kMode>
inline double log_weight(double x, double beta, double shift) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (beta == 0.0 && kMode != 0) return 0.0;
  if constexpr (kMode == 1) {
    return x > 0.0 ? beta * (std::log(x) - shift) : -kInf;
  } else if constexpr (kMode == 2) {
    return beta * (x - shift);
  } else {
    return x;
  }
}

// thr[c], c = count of leading zeros of m (the 53 random bits of v): an item whose uniform v has
// clz(m) = c can only get a key > tau if its score x > thr[c]. log2 v >= lb(c) = 10 - c
// (m >= 2^(63 - c)), -54 for c = 63 (m in {0, 1}); key > tau needs log2 v < (l - tau) / ln 2, so
// l > tau + lb(c) ln 2, solved for x per mode. Rounded down (conservative), with 1e-3 bits slack.
template <typename scalar_t, int kMode>
void thresholds(double tau, double beta, double shift, scalar_t* thr) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (int c = 0; c < 64; ++c) {
    const double lb = (c == 63 ? -54.0 : 10.0 - c) - 1e-3;
    const double lmin = tau + lb * kLn2;  // the item needs l > lmin
    double t;
    if (beta == 0.0 && kMode != 0) {
      t = 0.0 > lmin - 1e-9 * std::fabs(lmin) ? -kInf : kInf;
    } else if constexpr (kMode == 1) {
      t = std::exp(shift + lmin / beta) * (1.0 - 1e-9);  // (x / e^shift)^beta > e^lmin
    } else if constexpr (kMode == 2) {
      const double a = lmin / beta;
      t = shift + a;
      t -= 1e-9 * (std::fabs(shift) + std::fabs(a));  // covers the rounding of both terms
    } else {
      t = lmin - 1e-9 * std::fabs(lmin);
    }
    if (std::isnan(t)) t = -kInf;  // never skip on an undefined bound
    scalar_t ts = static_cast<scalar_t>(t);
    if (static_cast<double>(ts) > t) ts = std::nextafter(ts, -std::numeric_limits<scalar_t>::infinity());
    thr[c] = ts;
  }
}

template <typename scalar_t, int kMode>
void scan(const scalar_t* s, int64_t begin, int64_t end, int64_t k, double beta, double shift,
          uint64_t s0, std::vector<Entry>& heap) {
  heap.clear();
  heap.reserve(static_cast<size_t>(k));
  scalar_t thr[64];
  int64_t i = begin;
  // Fill the heap with the first k items (exact keys).
  for (; i < end && static_cast<int64_t>(heap.size()) < k; ++i) {
    const uint64_t m = mix64(s0 + static_cast<uint64_t>(i + 1) * kGamma) >> 11;
    const double v = (static_cast<double>(static_cast<int64_t>(m)) + 0.5) * 0x1p-53;
    heap.push_back(
        {log_weight<kMode>(static_cast<double>(s[i]), beta, shift) - std::log(-std::log1p(-v)), i});
    std::push_heap(heap.begin(), heap.end(), better);
  }
  if (static_cast<int64_t>(heap.size()) < k) return;
  thresholds<scalar_t, kMode>(heap.front().key, beta, shift, thr);
  for (; i < end; ++i) {
    const scalar_t x = s[i];
    const uint64_t m = mix64(s0 + static_cast<uint64_t>(i + 1) * kGamma) >> 11;
    if (!(x > thr[__builtin_clzll(m | 1)])) continue;  // cannot beat the heap's worst key
    // m < 2^53: a signed conversion is exact (and one instruction, unlike uint64 -> double).
    const double v = (static_cast<double>(static_cast<int64_t>(m)) + 0.5) * 0x1p-53;  // in (0, 1)
    const Entry e{log_weight<kMode>(static_cast<double>(x), beta, shift) - std::log(-std::log1p(-v)),
                  i};
    if (better(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), better);
      thresholds<scalar_t, kMode>(heap.front().key, beta, shift, thr);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> stochastic_topk_cpu(const at::Tensor& scores, int64_t k,
                                                       int64_t mode, double beta, int64_t seed,
                                                       double shift) {
  TORCH_CHECK_VALUE(scores.dim() == 1, "fastbald::stochastic_topk: scores must be [N], got shape ",
                    scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                   "fastbald::stochastic_topk: scores must be float32 or float64, got ", st);
  const int64_t N = scores.size(0);
  TORCH_CHECK_VALUE(k >= 0 && k <= N, "fastbald::stochastic_topk: k must be in [0, N=", N,
                    "], got ", k);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2,
                    "fastbald::stochastic_topk: mode must be 0 (log-weights), 1 (power) or 2 "
                    "(softmax), got ",
                    mode);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0,
                    "fastbald::stochastic_topk: beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(shift), "fastbald::stochastic_topk: shift must be finite, got ",
                    shift);
  const at::Tensor x = scores.contiguous();
  const uint64_t s0 = mix64(static_cast<uint64_t>(seed));
  std::vector<Entry> all;
  std::mutex mu;
  std::atomic<int64_t> first_bad{N};
  if (k > 0) {
    AT_DISPATCH_FLOATING_TYPES(st, "fastbald_stochastic_topk", [&] {
      const scalar_t* p = x.const_data_ptr<scalar_t>();
      // About 1 ns per item: threads only pay off for pools of millions (and a parallel region
      // on a busy machine costs more than a 1M-item scan).
      const int64_t grain = std::max<int64_t>(1 << 20, 8 * k);
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        std::vector<Entry> heap;
        const int64_t bad = first_nonfinite(p, b, e);
        if (bad < 0) {
          if (mode == 1) {
            scan<scalar_t, 1>(p, b, e, k, beta, shift, s0, heap);
          } else if (mode == 2) {
            scan<scalar_t, 2>(p, b, e, k, beta, shift, s0, heap);
          } else {
            scan<scalar_t, 0>(p, b, e, k, beta, shift, s0, heap);
          }
        } else {
          int64_t cur = first_bad.load();
          while (bad < cur && !first_bad.compare_exchange_weak(cur, bad)) {
          }
          return;
        }
        std::lock_guard<std::mutex> lock(mu);
        all.insert(all.end(), heap.begin(), heap.end());
      });
    });
  } else {
    // k = 0 still validates the scores.
    AT_DISPATCH_FLOATING_TYPES(st, "fastbald_stochastic_check", [&] {
      const int64_t bad = first_nonfinite(x.const_data_ptr<scalar_t>(), 0, N);
      if (bad >= 0) first_bad = bad;
    });
  }
  const int64_t bad = first_bad.load();
  if (bad < N) {
    TORCH_CHECK_VALUE(false, "fastbald::stochastic_topk: scores must be finite; pool item ", bad,
                      " is ", static_cast<double>(x[bad].item<double>()));
  }
  std::partial_sort(all.begin(), all.begin() + k, all.end(), better);
  at::Tensor idx = at::empty({k}, scores.options().dtype(at::kLong));
  at::Tensor keys = at::empty({k}, scores.options().dtype(at::kDouble));
  int64_t* pi = idx.mutable_data_ptr<int64_t>();
  double* pk = keys.mutable_data_ptr<double>();
  for (int64_t j = 0; j < k; ++j) {
    pi[j] = all[static_cast<size_t>(j)].idx;
    pk[j] = all[static_cast<size_t>(j)].key;
  }
  return {idx, keys};
}

}  // namespace
}  // namespace stochastic
}  // namespace fastbald

TORCH_LIBRARY_FRAGMENT(fastbald, m) {
  // scores: [N] float32/float64 on the CPU. mode 0: scores are log-weights; 1: weights
  // max(score, 0)^beta / e^(beta shift); 2: weights exp(beta * (score - shift)) (shift: the largest
  // log max(score, 0) resp. score, so that no log-weight is +inf). Returns (indices [k] int64, keys [k] float64):
  // the k items of largest Gumbel key (log-weight + Gumbel(seed, item)), best first. A key of -inf
  // is an item of weight 0. Error naming the first non-finite score.
  m.def(
      "stochastic_topk(Tensor scores, int k, int mode, float beta, int seed, float shift=0.0) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastbald, CPU, m) {
  m.impl("stochastic_topk", &fastbald::stochastic::stochastic_topk_cpu);
}

extern "C" {
PyMODINIT_FUNC PyInit__stochastic_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_stochastic_cpu", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
