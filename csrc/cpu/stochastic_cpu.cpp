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
#include <ATen/ops/aminmax.h>
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

// min, max and finiteness of p[0, n) in one pass, four independent lanes. ATen's reductions
// (aminmax, max) open a parallel region whatever guard surrounds them, and with 2 threads on a busy
// machine that region waits ~10 ms for a descheduled thread: several times a whole draw.
template <typename scalar_t>
bool minmax_serial(const scalar_t* p, int64_t n, double& lo, double& hi) {
  constexpr scalar_t kMax = std::numeric_limits<scalar_t>::max();
  scalar_t l[4], h[4];
  bool ok[4] = {true, true, true, true};
  for (int j = 0; j < 4; ++j) l[j] = h[j] = p[0];
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const scalar_t v = p[i + j];
      l[j] = v < l[j] ? v : l[j];
      h[j] = v > h[j] ? v : h[j];
      ok[j] &= std::fabs(v) <= kMax;
    }
  }
  for (; i < n; ++i) {
    l[0] = p[i] < l[0] ? p[i] : l[0];
    h[0] = p[i] > h[0] ? p[i] : h[0];
    ok[0] &= std::fabs(p[i]) <= kMax;
  }
  lo = static_cast<double>(std::min(std::min(l[0], l[1]), std::min(l[2], l[3])));
  hi = static_cast<double>(std::max(std::max(h[0], h[1]), std::max(h[2], h[3])));
  return ok[0] && ok[1] && ok[2] && ok[3];
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

// ---------------------------------------------------------------------------------------------
// Mode 3, softrank: log-weight l_i = -beta (log rank_i - log rank_min), rank_i the average rank of
// item i in descending order (ties share their average rank, as scipy's rankdata), without sorting
// the pool. O(N):
//   0. min / max (at::aminmax; also the finiteness check: NaN propagates).
//   1. buckets: the order-preserving 32-bit key of (float) x, offset by the smallest and shifted so
//      that at most 2^14 buckets cover [min, max] (adaptive: a narrow pool gets narrow buckets). A
//      histogram gives, per bucket, rank_lo = 1 + the number of items in higher buckets: every
//      item's average rank lies in [rank_lo, rank_lo + count - 1] (the bucket map is monotone, also
//      for float64 scores rounded to float). Also the largest score's multiplicity (rank_min).
//   2. the Gumbel scan of the other modes with those bounds: the heap keeps the k largest LOWER
//      bound keys (tau = its worst); an item is skipped by one integer compare (its key against the
//      first bucket whose rank_lo can still reach tau, per leading-zero class of its noise, as the
//      other modes' table); an item whose UPPER bound key reaches tau is a candidate. Every item of
//      the true top k is one: k items have true keys >= their lower bounds >= tau, so the k-th
//      true key is >= tau.
//   3. exact average ranks of the candidates only: one pass, the items of the candidates' buckets
//      (a bitmap) binary-searched among the candidates' distinct values, counted by difference
//      arrays.
// The candidates' exact keys (the same double arithmetic as mode 0 on -beta (log r - log r_min),
// so the same draw as mode 0 given those log-weights) then give the top k.
inline uint32_t order_key(float f) {
  f += 0.0f;  // -0.0 -> +0.0: equal scores, equal keys
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// 2^14 buckets: the per-bucket tables stay in L1/L2 (the bounds are looser than with 2^16, but the
// extra candidates cost less than the cache misses of bigger tables).
constexpr int kBucketBits = 14;

struct Buckets {
  uint32_t umin = 0;
  int sh = 0;
  int64_t nb = 1;
  std::vector<double> rank_lo;  // above + 1 per bucket
  std::vector<int64_t> count;
  template <typename scalar_t>
  int64_t of(scalar_t x) const {
    return static_cast<int64_t>((order_key(static_cast<float>(x)) - umin) >> sh);
  }
};

struct Cand {
  int64_t idx;
  double g;  // Gumbel noise -log(E_i)
};

// Pass 2 over [begin, end): lo-heap of the k largest lower-bound keys, and the candidates.
template <typename scalar_t>
void rank_scan(const scalar_t* s, int64_t begin, int64_t end, int64_t k, double beta, double shift,
               uint64_t s0, const Buckets& bk, std::vector<Entry>& heap, std::vector<Cand>& cands) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  heap.clear();
  heap.reserve(static_cast<size_t>(k));
  // An item can reach tau only if its bucket's rank_lo < R_c (clz class c); rank_lo decreases with
  // the bucket, so that is bucket >= b_c, i.e. order_key(x) >= uthr[c]: one integer compare.
  uint64_t uthr[64];
  std::fill(uthr, uthr + 64, uint64_t{0});  // heap not full: every item
  double tau = -kInf;
  const double* rlo = bk.rank_lo.data();
  const int64_t* cnt = bk.count.data();
  auto refresh = [&]() {
    tau = heap.front().key;
    for (int c = 0; c < 64; ++c) {
      const double lb = (c == 63 ? -54.0 : 10.0 - c) - 1e-3;
      // needs l_hi = -beta (log rank_lo - shift) > T = tau + lb ln2
      double r = std::exp(shift - (tau + lb * kLn2) / beta);
      r = std::isnan(r) ? kInf : r * (1.0 + 1e-9) + 1e-9;
      // smallest bucket with rank_lo < r (rank_lo is non-increasing in the bucket)
      int64_t lo = 0, hi = bk.nb;  // answer in [lo, hi]; hi = nb: none
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (rlo[mid] < r) hi = mid; else lo = mid + 1;
      }
      uthr[c] = lo >= bk.nb ? (uint64_t{1} << 40) : static_cast<uint64_t>(bk.umin) + (static_cast<uint64_t>(lo) << bk.sh);
    }
  };
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t u = order_key(static_cast<float>(s[i]));
    const uint64_t m = mix64(s0 + static_cast<uint64_t>(i + 1) * kGamma) >> 11;
    if (u < uthr[__builtin_clzll(m | 1)]) continue;  // cannot reach tau
    const int64_t b = static_cast<int64_t>((u - bk.umin) >> bk.sh);
    const double v = (static_cast<double>(static_cast<int64_t>(m)) + 0.5) * 0x1p-53;
    const double g = -std::log(-std::log1p(-v));
    const double key_hi = -beta * (std::log(rlo[b]) - shift) + g;
    const double key_lo = -beta * (std::log(rlo[b] + static_cast<double>(cnt[b] - 1)) - shift) + g;
    const bool full = static_cast<int64_t>(heap.size()) == k;
    if (!full || key_hi >= tau - 1e-9 * (1.0 + std::fabs(tau))) cands.push_back({i, g});
    const Entry e{key_lo, i};
    if (!full) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), better);
      if (static_cast<int64_t>(heap.size()) == k) refresh();
    } else if (better(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), better);
      refresh();
    }
  }
}

template <typename scalar_t>
std::vector<Entry> softrank_topk(scalar_t lo, scalar_t hi, const scalar_t* s, int64_t N, int64_t k,
                                 double beta, uint64_t s0, int64_t grain) {
  Buckets bk;
  bk.umin = order_key(static_cast<float>(lo));
  const uint32_t range = order_key(static_cast<float>(hi)) - bk.umin;
  while ((range >> bk.sh) >= (1u << kBucketBits)) ++bk.sh;
  bk.nb = static_cast<int64_t>(range >> bk.sh) + 1;
  // Pass 1: histogram (per thread chunk) and the multiplicity of the largest score.
  bk.count.assign(static_cast<size_t>(bk.nb), 0);
  std::atomic<int64_t> n_max{0};
  std::mutex mu;
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    // Four interleaved histograms: consecutive items in one bucket do not wait on each other's
    // increment. uint32: a chunk has < 2^32 items per sub-histogram.
    const size_t nb = static_cast<size_t>(bk.nb);
    std::vector<uint32_t> h(4 * nb, 0);
    int64_t nm = 0;
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      ++h[static_cast<size_t>(bk.of(s[i]))];
      ++h[nb + static_cast<size_t>(bk.of(s[i + 1]))];
      ++h[2 * nb + static_cast<size_t>(bk.of(s[i + 2]))];
      ++h[3 * nb + static_cast<size_t>(bk.of(s[i + 3]))];
      nm += (s[i] == hi) + (s[i + 1] == hi) + (s[i + 2] == hi) + (s[i + 3] == hi);
    }
    for (; i < e; ++i) {
      ++h[static_cast<size_t>(bk.of(s[i]))];
      nm += s[i] == hi;
    }
    n_max += nm;
    std::lock_guard<std::mutex> lock(mu);
    for (size_t j = 0; j < nb; ++j) bk.count[j] += int64_t{h[j]} + h[nb + j] + h[2 * nb + j] + h[3 * nb + j];
  });
  bk.rank_lo.resize(static_cast<size_t>(bk.nb));
  int64_t above = 0;
  for (int64_t j = bk.nb - 1; j >= 0; --j) {
    bk.rank_lo[static_cast<size_t>(j)] = static_cast<double>(above + 1);
    above += bk.count[static_cast<size_t>(j)];
  }
  const double shift = std::log((1.0 + static_cast<double>(n_max.load())) / 2.0);  // log rank_min
  // Pass 2: bounds scan.
  std::vector<Entry> lo_all;
  std::vector<Cand> cands;
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    std::vector<Entry> heap;
    std::vector<Cand> c;
    rank_scan<scalar_t>(s, b, e, k, beta, shift, s0, bk, heap, c);
    std::lock_guard<std::mutex> lock(mu);
    lo_all.insert(lo_all.end(), heap.begin(), heap.end());
    cands.insert(cands.end(), c.begin(), c.end());
  });
  std::partial_sort(lo_all.begin(), lo_all.begin() + k, lo_all.end(), better);
  const double tau = lo_all[static_cast<size_t>(k - 1)].key;
  // Keep the candidates whose upper bound reaches the global tau (recomputed as in the scan).
  std::vector<Cand> keep;
  for (const Cand& c : cands) {
    const double rl = bk.rank_lo[static_cast<size_t>(bk.of(s[c.idx]))];
    if (-beta * (std::log(rl) - shift) + c.g >= tau - 1e-9 * (1.0 + std::fabs(tau))) keep.push_back(c);
  }
  // Pass 3: exact ranks. Groups = distinct (bucket, value) of the candidates, sorted.
  std::sort(keep.begin(), keep.end(), [&](const Cand& a, const Cand& b) {
    const int64_t ba = bk.of(s[a.idx]), bb = bk.of(s[b.idx]);
    return ba != bb ? ba < bb : s[a.idx] < s[b.idx];
  });
  std::vector<scalar_t> gval;
  std::vector<int64_t> gbucket, cand_group(keep.size());
  for (size_t j = 0; j < keep.size(); ++j) {
    const scalar_t v = s[keep[j].idx];
    const int64_t b = bk.of(v);
    if (gval.empty() || gbucket.back() != b || gval.back() != v) {
      gval.push_back(v);
      gbucket.push_back(b);
    }
    cand_group[j] = static_cast<int64_t>(gval.size()) - 1;
  }
  const int64_t G = static_cast<int64_t>(gval.size());
  std::vector<int32_t> gfirst(static_cast<size_t>(bk.nb), -1), gnum(static_cast<size_t>(bk.nb), 0);
  for (int64_t g = 0; g < G; ++g) {
    const size_t b = static_cast<size_t>(gbucket[static_cast<size_t>(g)]);
    if (gfirst[b] < 0) gfirst[b] = static_cast<int32_t>(g);
    ++gnum[b];
  }
  std::vector<uint64_t> has(static_cast<size_t>((bk.nb + 63) / 64), 0);  // buckets with candidates
  for (int64_t g = 0; g < G; ++g) {
    const uint64_t b = static_cast<uint64_t>(gbucket[static_cast<size_t>(g)]);
    has[b >> 6] |= uint64_t{1} << (b & 63);
  }
  std::vector<int64_t> diff(static_cast<size_t>(G) + 1, 0), eq(static_cast<size_t>(G), 0);
  at::parallel_for(0, N, grain, [&](int64_t b0, int64_t e0) {
    std::vector<int64_t> d(static_cast<size_t>(G) + 1, 0), q(static_cast<size_t>(G), 0);
    for (int64_t i = b0; i < e0; ++i) {
      const scalar_t v = s[i];
      const size_t b = static_cast<size_t>(bk.of(v));
      if (!((has[b >> 6] >> (b & 63)) & 1)) continue;
      const int32_t f = gfirst[b];
      const scalar_t* first = gval.data() + f;
      const int64_t pos = std::lower_bound(first, first + gnum[b], v) - first;
      // item i is greater than the groups [f, f + pos) of its bucket
      ++d[static_cast<size_t>(f)];
      --d[static_cast<size_t>(f + pos)];
      if (pos < gnum[b] && first[pos] == v) ++q[static_cast<size_t>(f + pos)];
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t g = 0; g <= G; ++g) diff[static_cast<size_t>(g)] += d[static_cast<size_t>(g)];
    for (int64_t g = 0; g < G; ++g) eq[static_cast<size_t>(g)] += q[static_cast<size_t>(g)];
  });
  std::vector<double> log_rank(static_cast<size_t>(G));
  int64_t run = 0;
  for (int64_t g = 0; g < G; ++g) {
    run += diff[static_cast<size_t>(g)];
    const double greater = bk.rank_lo[static_cast<size_t>(gbucket[static_cast<size_t>(g)])] - 1.0 + static_cast<double>(run);
    log_rank[static_cast<size_t>(g)] = std::log(greater + (static_cast<double>(eq[static_cast<size_t>(g)]) + 1.0) / 2.0);
  }
  std::vector<Entry> out;
  out.reserve(keep.size());
  for (size_t j = 0; j < keep.size(); ++j) {
    const double l = -beta * (log_rank[static_cast<size_t>(cand_group[j])] - shift);
    out.push_back({l + keep[j].g, keep[j].idx});
  }
  TORCH_CHECK(static_cast<int64_t>(out.size()) >= k, "fastbald::stochastic_topk (softrank): ",
              out.size(), " candidates for k = ", k, " (internal error)");
  return out;
}

std::tuple<at::Tensor, at::Tensor> stochastic_topk_cpu(const at::Tensor& scores, int64_t k,
                                                       int64_t mode, double beta, int64_t seed,
                                                       double shift_) {
  double shift = shift_;
  TORCH_CHECK_VALUE(scores.dim() == 1, "fastbald::stochastic_topk: scores must be [N], got shape ",
                    scores.sizes());
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble,
                   "fastbald::stochastic_topk: scores must be float32 or float64, got ", st);
  const int64_t N = scores.size(0);
  TORCH_CHECK_VALUE(k >= 0 && k <= N, "fastbald::stochastic_topk: k must be in [0, N=", N,
                    "], got ", k);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 3,
                    "fastbald::stochastic_topk: mode must be 0 (log-weights), 1 (power), 2 "
                    "(softmax) or 3 (softrank), got ",
                    mode);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0,
                    "fastbald::stochastic_topk: beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(shift) || std::isnan(shift),
                    "fastbald::stochastic_topk: shift must be finite (or NaN: computed here), got ", shift);
  const at::Tensor x = scores.contiguous();
  const uint64_t s0 = mix64(static_cast<uint64_t>(seed));
  std::vector<Entry> all;
  std::mutex mu;
  std::atomic<int64_t> first_bad{N};
  if (k > 0 && mode == 3) {
    AT_DISPATCH_FLOATING_TYPES(st, "fastbald_softrank_topk", [&] {
      const scalar_t* p = x.const_data_ptr<scalar_t>();
      // min and max are finite iff every score is (a NaN fails minmax_serial's check and propagates
      // through aminmax): the exact search for the first bad item only when they are not.
      const int64_t grain = std::max<int64_t>(1 << 20, 8 * k);
      double lo, hi;
      bool finite = true;
      if (N < 2 * grain) {  // every pass is serial then: so is this one
        finite = minmax_serial(p, N, lo, hi);
      } else {
        const auto mm = at::aminmax(x);
        lo = std::get<0>(mm).item<double>();
        hi = std::get<1>(mm).item<double>();
      }
      const int64_t bad = finite && std::isfinite(lo) && std::isfinite(hi) ? -1 : first_nonfinite(p, 0, N);
      if (bad >= 0) {
        first_bad = bad;
      } else {
        all = softrank_topk<scalar_t>(static_cast<scalar_t>(lo), static_cast<scalar_t>(hi), p, N, k, beta,
                                      s0, grain);
      }
    });
  } else if (k > 0) {
    if (std::isnan(shift)) {  // the largest unscaled log-weight: max s (softmax), log max s (power)
      double m;
      if (N < 2 * std::max<int64_t>(1 << 20, 8 * k)) {  // serial, as the scan below
        AT_DISPATCH_FLOATING_TYPES(st, "fastbald_stochastic_max", [&] {
          double lo;
          minmax_serial(x.const_data_ptr<scalar_t>(), N, lo, m);
        });
      } else {
        m = x.max().item<double>();
      }
      shift = !std::isfinite(m) ? 0.0 : mode == 1 ? (m > 0.0 ? std::log(m) : 0.0) : mode == 2 ? m : 0.0;
    }
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
  // log max(score, 0) resp. score, so that no log-weight is +inf; NaN: computed by the kernel); 3: weights (average rank in
  // descending order / the best item's)^-beta (ties share their average rank; shift unused). Returns (indices [k] int64, keys [k] float64):
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
