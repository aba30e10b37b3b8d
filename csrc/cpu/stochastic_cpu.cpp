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
// With AVX-512 (chosen at run time) that filter runs on 16 items per step (splitmix64 by vpmullq,
// vplzcntq, the table by a permute); the items that pass take the same scalar step (visit()).
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
#include <type_traits>
#include <vector>

#include "simd_dispatch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 flags _mm512_undefined_ps() (`__m512 __Y = __Y;` in its own avx512fintrin.h) as
// (maybe-)uninitialized once inlined: a known false positive (as in epig_cpu.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FB_SR_X86 1
#else
#define FB_SR_X86 0
#endif

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
__attribute__((always_inline)) inline int64_t first_nonfinite(const scalar_t* p, int64_t b, int64_t e) {
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
      // covers the rounding of both terms, and a flushed to 0 (FTZ: the sign of t would be lost)
      t -= 1e-9 * (std::fabs(shift) + std::fabs(a)) + std::numeric_limits<double>::min();
    } else {
      t = lmin - 1e-9 * std::fabs(lmin);
    }
    if (std::isnan(t)) t = -kInf;  // never skip on an undefined bound
    // No subnormal threshold: with flushed denormals (DAZ, torch.set_flush_denormal) a compare reads
    // one as 0, and x = 0 > -1e-45 fails. t in (-min, min) goes down to -min or 0 (conservative).
    constexpr double kMin = std::numeric_limits<scalar_t>::min();
    if (!(std::fabs(t) >= kMin)) t = std::signbit(t) ? -kMin : 0.0;
    scalar_t ts = static_cast<scalar_t>(t);
    if (static_cast<double>(ts) > t) ts = std::nextafter(ts, -std::numeric_limits<scalar_t>::infinity());
    thr[c] = ts;
  }
}

inline uint64_t noise_bits(uint64_t s0, int64_t i) {
  return mix64(s0 + static_cast<uint64_t>(i + 1) * kGamma) >> 11;
}

// Modes 0-2 over one chunk: a running top-k (heap of the k best keys, thr from its worst). visit()
// is the whole per-item step once the heap is full; the scalar loop (scan_rest) and the AVX-512
// one only skip the items that fail x > thr[clz(m)], and visit() tests that again (the vector loop
// tests 16 items against the thresholds of the block's start): the same heap updates either way.
template <typename scalar_t, int kMode>
struct TopScan {
  int64_t k;
  double beta, shift;
  std::vector<Entry>& heap;
  scalar_t thr[64];
  int64_t version = 0;  // bumped by each change of thr

  TopScan(int64_t k_, double beta_, double shift_, std::vector<Entry>& h) : k(k_), beta(beta_), shift(shift_), heap(h) {}

  // Fills the heap with the first k items from begin (exact keys); returns the next item.
  int64_t fill(const scalar_t* s, int64_t begin, int64_t end, uint64_t s0) {
    heap.clear();
    heap.reserve(static_cast<size_t>(k));
    int64_t i = begin;
    for (; i < end && static_cast<int64_t>(heap.size()) < k; ++i) {
      const uint64_t m = noise_bits(s0, i);
      const double v = (static_cast<double>(static_cast<int64_t>(m)) + 0.5) * 0x1p-53;
      heap.push_back(
          {log_weight<kMode>(static_cast<double>(s[i]), beta, shift) - std::log(-std::log1p(-v)), i});
      std::push_heap(heap.begin(), heap.end(), better);
    }
    if (static_cast<int64_t>(heap.size()) == k) {
      thresholds<scalar_t, kMode>(heap.front().key, beta, shift, thr);
      ++version;
    }
    return i;
  }

  // Item i (score x, noise bits m) against the full heap. Not inlined: its double arithmetic must
  // round the same way in every caller (no FMA contraction in the AVX-512 loop).
  __attribute__((noinline)) void visit(int64_t i, scalar_t x, uint64_t m) {
    if (!(x > thr[__builtin_clzll(m | 1)])) return;  // cannot beat the heap's worst key
    // m < 2^53: a signed conversion is exact (and one instruction, unlike uint64 -> double).
    const double v = (static_cast<double>(static_cast<int64_t>(m)) + 0.5) * 0x1p-53;  // in (0, 1)
    const Entry e{log_weight<kMode>(static_cast<double>(x), beta, shift) - std::log(-std::log1p(-v)),
                  i};
    if (better(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), better);
      thresholds<scalar_t, kMode>(heap.front().key, beta, shift, thr);
      ++version;
    }
  }
};

template <typename scalar_t, int kMode>
void scan_rest(const scalar_t* s, int64_t i, int64_t end, uint64_t s0, TopScan<scalar_t, kMode>& ts) {
  for (; i < end; ++i) {
    const scalar_t x = s[i];
    const uint64_t m = noise_bits(s0, i);
    if (!(x > ts.thr[__builtin_clzll(m | 1)])) continue;  // cannot beat the heap's worst key
    ts.visit(i, x, m);
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
// Each pass has a scalar loop, an AVX-512 one (16 items per step: order keys, buckets, the
// splitmix64 noise class and the threshold by one permute, the candidates' buckets by compares or a
// bitmap gather) and an AVX2 one (8 per step); chosen at run time, Kernels::kind(). The vector loops
// only filter, and every item that passes goes through the same scalar step, so all give the same
// candidates, counts and keys (tests force each).
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

// Pass 2 over one chunk: lo-heap of the k largest lower-bound keys, and the candidates. visit() is
// the whole per-item step; the loops (scalar below, AVX-512 further down) only skip the items that
// fail the integer filter u < uthr[clz(m)], and visit() applies that same filter again (the vector
// loop tests 16 items against the thresholds of the block's start): both loops make the same
// sequence of heap updates, hence the same candidates.
struct RankScan {
  const Buckets& bk;
  int64_t k;
  double beta, shift;
  std::vector<Entry> heap;
  std::vector<Cand> cands;
  // An item can reach tau only if its bucket's rank_lo < R_c (clz class c); rank_lo decreases with
  // the bucket, so that is bucket >= b_c, i.e. order_key(x) >= uthr[c]: one integer compare.
  // Always < 2^32 (or 2^40: no item); 0 while the heap is not full (every item).
  uint64_t uthr[64];
  double tau;
  int64_t version = 0;  // bumped by each refresh

  RankScan(const Buckets& b, int64_t k_, double beta_, double shift_)
      : bk(b), k(k_), beta(beta_), shift(shift_), tau(-std::numeric_limits<double>::infinity()) {
    heap.reserve(static_cast<size_t>(k));
    std::fill(uthr, uthr + 64, uint64_t{0});
  }

  void refresh() {
    constexpr double kInf = std::numeric_limits<double>::infinity();
    const double* rlo = bk.rank_lo.data();
    tau = heap.front().key;
    // Classes 11..63 only (m < 2^53). The bound r grows with c, so the answer (a bucket) does not
    // grow: search below the previous class's answer, and once it is bucket 0 so is every later
    // one. (Were r not monotone after rounding, these answers could only be lower buckets, i.e.
    // looser thresholds: still conservative.)
    int64_t prev = bk.nb;
    for (int c = 11; c < 64; ++c) {
      int64_t lo = 0;
      if (prev > 0) {
        const double lb = (c == 63 ? -54.0 : 10.0 - c) - 1e-3;
        // needs l_hi = -beta (log rank_lo - shift) > T = tau + lb ln2
        double r = std::exp(shift - (tau + lb * kLn2) / beta);
        r = std::isnan(r) ? kInf : r * (1.0 + 1e-9) + 1e-9;
        // smallest bucket in [0, prev] with rank_lo < r (rank_lo is non-increasing in the bucket)
        int64_t hi = prev;
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (rlo[mid] < r) hi = mid; else lo = mid + 1;
        }
      }
      uthr[c] = lo >= bk.nb ? (uint64_t{1} << 40) : static_cast<uint64_t>(bk.umin) + (static_cast<uint64_t>(lo) << bk.sh);
      prev = lo;
    }
    ++version;
  }

  // Item i with order key u and noise bits m (the 53 random bits of v). Not inlined: its double
  // arithmetic must round the same way in every caller (no FMA contraction in the AVX-512 loop).
  __attribute__((noinline)) void visit(int64_t i, uint64_t u, uint64_t m) {
    if (u < uthr[__builtin_clzll(m | 1)]) return;  // cannot reach tau
    const double* rlo = bk.rank_lo.data();
    const int64_t* cnt = bk.count.data();
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
};

template <typename scalar_t>
void rank_scan(const scalar_t* s, int64_t begin, int64_t end, uint64_t s0, RankScan& rs) {
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t u = order_key(static_cast<float>(s[i]));
    const uint64_t m = noise_bits(s0, i);
    if (u < rs.uthr[__builtin_clzll(m | 1)]) continue;  // cannot reach tau
    rs.visit(i, u, m);
  }
}

// Pass 3 state: the candidates' distinct values ("groups", sorted by bucket then value, then one
// sentinel equal to the last), where each bucket's groups start (gfirst, -1: none) and how many
// (gnum), a bitmap of the buckets with groups. The sentinel differs from every value that is larger
// than all groups of its bucket (the next bucket's values differ from it; the last bucket's first
// value after its groups is larger than the last group).
template <typename scalar_t>
struct Groups {
  std::vector<scalar_t> gval;
  std::vector<int64_t> gbucket;
  std::vector<int32_t> gfirst, gnum;
  std::vector<uint32_t> has;
};

// Item with value v in bucket b (a bucket with groups): it is greater than the groups
// [f, f + pos) of its bucket (difference array d) and equal to group f + pos if that has value v.
// Branch-free lower bound over the bucket's groups.
template <typename scalar_t>
inline void rank_count(const Groups<scalar_t>& gr, scalar_t v, size_t b, int64_t* d, int64_t* q) {
  const int32_t f = gr.gfirst[b];
  const scalar_t* first = gr.gval.data() + f;
  const scalar_t* base = first;
  int64_t n = gr.gnum[b];
  while (n > 1) {
    const int64_t half = n / 2;
    base = base[half] < v ? base + half : base;
    n -= half;
  }
  const int64_t pos = (base - first) + (*base < v);
  ++d[f];
  --d[f + pos];
  q[f + pos] += first[pos] == v;  // gval has a sentinel: first[gnum] != v
}

template <typename scalar_t>
void rank_pass(const scalar_t* s, int64_t begin, int64_t end, const Buckets& bk, const Groups<scalar_t>& gr,
               int64_t* d, int64_t* q) {
  const uint32_t* has = gr.has.data();
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t v = s[i];
    const size_t b = static_cast<size_t>(bk.of(v));
    if (!((has[b >> 5] >> (b & 31)) & 1)) continue;
    rank_count(gr, v, b, d, q);
  }
}

// Pass 1 over [begin, end): histogram into h (4 interleaved sub-histograms of nb counts: consecutive
// items in one bucket do not wait on each other's increment; uint32: a chunk has < 2^32 items per
// sub-histogram); returns the number of items equal to hi.
template <typename scalar_t>
int64_t hist_pass(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk, scalar_t hi, uint32_t* h) {
  const size_t nb = static_cast<size_t>(bk.nb);
  int64_t nm = 0;
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
  return nm;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 versions of the three passes' per-item work (16 items per step; the tail of a chunk,
// fewer than 16 items, goes through the scalar loops above). Integer and compare work only: every
// double that reaches a key is computed by the shared scalar code (visit(), the final keys).
// ---------------------------------------------------------------------------------------------
#if FB_SR_X86
#define FB_SR_AVX512 __attribute__((target("avx512f,avx512dq,avx512cd,avx512bw,avx512vl")))

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// order_key(float(p[j])) for j < 16.
template <typename scalar_t>
FB_SR_AVX512 inline __m512i order_keys16(const scalar_t* p) {
  __m512 f;
  if constexpr (std::is_same_v<scalar_t, float>) {
    f = _mm512_loadu_ps(p);
  } else {
    const __m256 a = _mm512_cvtpd_ps(_mm512_loadu_pd(p));  // rounds to nearest, as static_cast
    const __m256 b = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
    f = _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
  }
  const __m512i bits = _mm512_castps_si512(_mm512_add_ps(f, _mm512_setzero_ps()));  // -0 -> +0
  // negative: ~bits; else bits | sign bit
  return _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(INT32_MIN)));
}

// Bit j: p[j] == x, j < 16.
template <typename scalar_t>
FB_SR_AVX512 inline uint32_t equal16(const scalar_t* p, scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(x), _CMP_EQ_OQ);
  } else {
    const __m512d xv = _mm512_set1_pd(x);
    return static_cast<uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p), xv, _CMP_EQ_OQ)) |
           (static_cast<uint32_t>(_mm512_cmp_pd_mask(_mm512_loadu_pd(p + 8), xv, _CMP_EQ_OQ)) << 8);
  }
}

// min, max and finiteness of p[0, n) (as minmax_serial).
template <typename scalar_t>
FB_SR_AVX512 bool minmax_avx512(const scalar_t* p, int64_t n, double& lo, double& hi) {
  constexpr int W = 64 / sizeof(scalar_t);
  if (n < 4 * W) return minmax_serial(p, n, lo, hi);
  bool ok = true;
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m512 l[4], h[4];
    __mmask16 fin = 0xFFFF;
    const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
    for (int j = 0; j < 4; ++j) l[j] = h[j] = _mm512_loadu_ps(p + j * W);
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_loadu_ps(p + i + j * W);
        l[j] = _mm512_min_ps(l[j], v);
        h[j] = _mm512_max_ps(h[j], v);
        fin &= _mm512_cmp_ps_mask(_mm512_abs_ps(v), big, _CMP_LE_OQ);
      }
    }
    ok = fin == 0xFFFF;
    double l2 = 0, h2 = 0;
    const bool ok2 = i == n || minmax_serial(p + i, n - i, l2, h2);
    const __m512 lv = _mm512_min_ps(_mm512_min_ps(l[0], l[1]), _mm512_min_ps(l[2], l[3]));
    const __m512 hv = _mm512_max_ps(_mm512_max_ps(h[0], h[1]), _mm512_max_ps(h[2], h[3]));
    lo = static_cast<double>(_mm512_reduce_min_ps(lv));
    hi = static_cast<double>(_mm512_reduce_max_ps(hv));
    if (i < n) {
      ok = ok && ok2;
      lo = std::min(lo, l2);
      hi = std::max(hi, h2);
    }
  } else {
    __m512d l[4], h[4];
    __mmask8 fin = 0xFF;
    const __m512d big = _mm512_set1_pd(std::numeric_limits<double>::max());
    for (int j = 0; j < 4; ++j) l[j] = h[j] = _mm512_loadu_pd(p + j * W);
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      for (int j = 0; j < 4; ++j) {
        const __m512d v = _mm512_loadu_pd(p + i + j * W);
        l[j] = _mm512_min_pd(l[j], v);
        h[j] = _mm512_max_pd(h[j], v);
        fin &= _mm512_cmp_pd_mask(_mm512_abs_pd(v), big, _CMP_LE_OQ);
      }
    }
    ok = fin == 0xFF;
    double l2 = 0, h2 = 0;
    const bool ok2 = i == n || minmax_serial(p + i, n - i, l2, h2);
    const __m512d lv = _mm512_min_pd(_mm512_min_pd(l[0], l[1]), _mm512_min_pd(l[2], l[3]));
    const __m512d hv = _mm512_max_pd(_mm512_max_pd(h[0], h[1]), _mm512_max_pd(h[2], h[3]));
    lo = _mm512_reduce_min_pd(lv);
    hi = _mm512_reduce_max_pd(hv);
    if (i < n) {
      ok = ok && ok2;
      lo = std::min(lo, l2);
      hi = std::max(hi, h2);
    }
  }
  return ok;
}

template <typename scalar_t>
FB_SR_AVX512 int64_t hist_pass_avx512(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk, scalar_t hi,
                                      uint32_t* h) {
  const size_t nb = static_cast<size_t>(bk.nb);
  const __m512i vmin = _mm512_set1_epi32(static_cast<int>(bk.umin));
  const __m128i vsh = _mm_cvtsi32_si128(bk.sh);
  alignas(64) uint32_t buf[16];
  int64_t nm = 0;
  for (; i + 16 <= e; i += 16) {
    _mm512_store_si512(buf, _mm512_srl_epi32(_mm512_sub_epi32(order_keys16(s + i), vmin), vsh));
    nm += __builtin_popcount(equal16(s + i, hi));
    for (int j = 0; j < 16; j += 4) {
      ++h[buf[j]];
      ++h[nb + buf[j + 1]];
      ++h[2 * nb + buf[j + 2]];
      ++h[3 * nb + buf[j + 3]];
    }
  }
  return nm + hist_pass(s, i, e, bk, hi, h);
}

// mix64 on 8 lanes, then clz of the top 53 bits (| 1), as 8 uint64.
FB_SR_AVX512 inline __m512i noise_class8(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBull)));
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
  return _mm512_lzcnt_epi64(_mm512_or_si512(_mm512_srli_epi64(z, 11), _mm512_set1_epi64(1)));
}

// The scan's filter on 16 items at a time: class c = clz in [11, 63]; the thresholds of classes
// 11..41 sit in two registers (one permute), an item of class >= 42 (probability 2^-31) always
// goes to visit(), which tests it exactly.
template <typename scalar_t>
FB_SR_AVX512 void rank_scan_avx512(const scalar_t* s, int64_t begin, int64_t end, uint64_t s0, RankScan& rs) {
  alignas(64) uint32_t t32[32];
  __m512i tlo, thi;
  int64_t seen;
#define FB_SR_LOAD_THRESHOLDS()                                                                     \
  do {                                                                                              \
    for (int j = 0; j < 32; ++j) t32[j] = static_cast<uint32_t>(std::min<uint64_t>(rs.uthr[11 + j], 0xFFFFFFFFu)); \
    tlo = _mm512_load_si512(t32);                                                                   \
    thi = _mm512_load_si512(t32 + 16);                                                              \
    seen = rs.version;                                                                              \
  } while (0)
  FB_SR_LOAD_THRESHOLDS();
  int64_t i = begin;
  // z of items i .. i + 7 and i + 8 .. i + 15 (wrapping, as noise_bits).
  const __m512i lane = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
  const __m512i gam = _mm512_set1_epi64(static_cast<int64_t>(kGamma));
  __m512i zlo = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(s0 + static_cast<uint64_t>(i) * kGamma)),
                                 _mm512_mullo_epi64(lane, gam));
  __m512i zhi = _mm512_add_epi64(zlo, _mm512_set1_epi64(static_cast<int64_t>(8 * kGamma)));
  const __m512i step = _mm512_set1_epi64(static_cast<int64_t>(16 * kGamma));
  const __m512i c11 = _mm512_set1_epi32(11), c42 = _mm512_set1_epi32(42);
  for (; i + 16 <= end; i += 16) {
    const __m512i u = order_keys16(s + i);
    const __m256i clo = _mm512_cvtepi64_epi32(noise_class8(zlo));
    const __m256i chi = _mm512_cvtepi64_epi32(noise_class8(zhi));
    zlo = _mm512_add_epi64(zlo, step);
    zhi = _mm512_add_epi64(zhi, step);
    const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(clo), chi, 1);
    const __m512i thr = _mm512_permutex2var_epi32(tlo, _mm512_sub_epi32(_mm512_min_epu32(c, c42), c11), thi);
    uint32_t mask = _mm512_cmpge_epu32_mask(u, thr) | _mm512_cmpge_epu32_mask(c, c42);
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      const int64_t ij = i + j;
      rs.visit(ij, order_key(static_cast<float>(s[ij])), noise_bits(s0, ij));
    }
    if (seen != rs.version) FB_SR_LOAD_THRESHOLDS();
  }
#undef FB_SR_LOAD_THRESHOLDS
  rank_scan(s, i, end, s0, rs);
}

// Modes 0-2: the filter x > thr[c] on 16 items at a time. float: the thresholds of classes 11..41
// in two registers (one permute), an item of class >= 42 (2^-31 of the items) always goes to
// visit(); double: classes 11..25 (one permute per 8 items), class >= 26 (2^-15) always to visit().
template <typename scalar_t, int kMode>
FB_SR_AVX512 void scan_rest_avx512(const scalar_t* s, int64_t i, int64_t end, uint64_t s0,
                                   TopScan<scalar_t, kMode>& ts) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  constexpr int kTop = kFloat ? 42 : 26;  // classes 11 .. kTop - 1 by table
  alignas(64) scalar_t tab[kFloat ? 32 : 16];
  __m512i lo_i, hi_i;  // the table's two registers (as integer vectors)
  int64_t seen;
#define FB_SR_LOAD_TABLE()                                                                          \
  do {                                                                                              \
    for (int j = 0; j < (kFloat ? 32 : 16); ++j) tab[j] = ts.thr[11 + j];                           \
    lo_i = _mm512_load_si512(tab);                                                                  \
    hi_i = _mm512_load_si512(reinterpret_cast<const char*>(tab) + 64);                              \
    seen = ts.version;                                                                              \
  } while (0)
  FB_SR_LOAD_TABLE();
  const __m512i lane = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
  const __m512i gam = _mm512_set1_epi64(static_cast<int64_t>(kGamma));
  __m512i zlo = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(s0 + static_cast<uint64_t>(i) * kGamma)),
                                 _mm512_mullo_epi64(lane, gam));
  __m512i zhi = _mm512_add_epi64(zlo, _mm512_set1_epi64(static_cast<int64_t>(8 * kGamma)));
  const __m512i step = _mm512_set1_epi64(static_cast<int64_t>(16 * kGamma));
  for (; i + 16 <= end; i += 16) {
    const __m512i clo = noise_class8(zlo), chi = noise_class8(zhi);
    zlo = _mm512_add_epi64(zlo, step);
    zhi = _mm512_add_epi64(zhi, step);
    uint32_t mask;
    if constexpr (kFloat) {
      const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(clo)),
                                           _mm512_cvtepi64_epi32(chi), 1);
      const __m512i top = _mm512_set1_epi32(kTop);
      const __m512i idx = _mm512_sub_epi32(_mm512_min_epu32(c, top), _mm512_set1_epi32(11));
      const __m512 th = _mm512_permutex2var_ps(_mm512_castsi512_ps(lo_i), idx, _mm512_castsi512_ps(hi_i));
      mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), th, _CMP_GT_OQ) | _mm512_cmpge_epu32_mask(c, top);
    } else {
      const __m512i top = _mm512_set1_epi64(kTop), c11 = _mm512_set1_epi64(11);
      const __m512d tl = _mm512_castsi512_pd(lo_i), th_ = _mm512_castsi512_pd(hi_i);
      const __m512d t0 = _mm512_permutex2var_pd(tl, _mm512_sub_epi64(_mm512_min_epu64(clo, top), c11), th_);
      const __m512d t1 = _mm512_permutex2var_pd(tl, _mm512_sub_epi64(_mm512_min_epu64(chi, top), c11), th_);
      const uint32_t m0 = _mm512_cmp_pd_mask(_mm512_loadu_pd(s + i), t0, _CMP_GT_OQ) | _mm512_cmpge_epu64_mask(clo, top);
      const uint32_t m1 = _mm512_cmp_pd_mask(_mm512_loadu_pd(s + i + 8), t1, _CMP_GT_OQ) | _mm512_cmpge_epu64_mask(chi, top);
      mask = m0 | (m1 << 8);
    }
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      const int64_t ij = i + j;
      ts.visit(ij, s[ij], noise_bits(s0, ij));
    }
    if (seen != ts.version) FB_SR_LOAD_TABLE();
  }
#undef FB_SR_LOAD_TABLE
  scan_rest(s, i, end, s0, ts);
}

template <typename scalar_t>
FB_SR_AVX512 int64_t first_nonfinite_avx512(const scalar_t* p, int64_t b, int64_t e) {
  return first_nonfinite(p, b, e);  // inlined: vectorised for AVX-512
}

// The rank pass on 16 items at a time. Which lanes lie in a candidates' bucket: compared with each
// of them when there are at most 16 (the usual case: ~10 for k = 10 of 1M), else their bit of the
// bucket bitmap by a gather. The items that pass are buffered (index and bucket) and counted by
// the scalar rank_count.
template <typename scalar_t, int kList>
FB_SR_AVX512 void rank_pass_avx512_t(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk,
                                     const Groups<scalar_t>& gr, const int32_t* blist, int64_t* d, int64_t* q) {
  const __m512i vmin = _mm512_set1_epi32(static_cast<int>(bk.umin));
  const __m128i vsh = _mm_cvtsi32_si128(bk.sh);
  const __m512i c31 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
  const int* has = reinterpret_cast<const int*>(gr.has.data());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  constexpr int kBuf = 256;
  alignas(64) int32_t bufi[kBuf + 16];
  alignas(64) int32_t bufb[kBuf + 16];
  int nbuf = 0;
  int64_t i0 = i;
  for (; i + 16 <= e; i += 16) {
    const __m512i b = _mm512_srl_epi32(_mm512_sub_epi32(order_keys16(s + i), vmin), vsh);
    __mmask16 mask = 0;
    if constexpr (kList > 0) {
      for (int t = 0; t < kList; ++t) mask |= _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(blist[t]));
    } else {
      const __m512i w = _mm512_i32gather_epi32(_mm512_srli_epi32(b, 5), has, 4);
      mask = _mm512_test_epi32_mask(_mm512_srlv_epi32(w, _mm512_and_si512(b, c31)), one);
    }
    // No branch on the mask (~1 block in 4 has a lane in a candidates' bucket, at random): compress
    // in registers (a compress to memory is slow on some CPUs), store 16 lanes, advance by the count.
    const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(i - i0)));
    _mm512_storeu_si512(bufi + nbuf, _mm512_maskz_compress_epi32(mask, idx));
    _mm512_storeu_si512(bufb + nbuf, _mm512_maskz_compress_epi32(mask, b));
    nbuf += __builtin_popcount(mask);
    if (nbuf >= kBuf || i - i0 >= (int64_t{1} << 30)) {  // (indices relative to i0 fit an int32)
      for (int j = 0; j < nbuf; ++j) rank_count(gr, s[i0 + bufi[j]], static_cast<size_t>(bufb[j]), d, q);
      nbuf = 0;
      i0 = i + 16;
    }
  }
  for (int j = 0; j < nbuf; ++j) rank_count(gr, s[i0 + bufi[j]], static_cast<size_t>(bufb[j]), d, q);
  rank_pass(s, i, e, bk, gr, d, q);
}

// The candidates' distinct buckets (gbucket is sorted) into blist[16], padded by repeats; returns
// their number, 17 if more than 16.
inline int bucket_list(const std::vector<int64_t>& gbucket, int32_t* blist) {
  int n = 0;
  for (const int64_t b : gbucket) {
    if (n > 0 && blist[n - 1] == b) continue;
    if (n == 16) return 17;
    blist[n++] = static_cast<int32_t>(b);
  }
  for (int t = n; t < 16; ++t) blist[t] = blist[0];
  return n;
}

template <typename scalar_t>
FB_SR_AVX512 void rank_pass_avx512(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk,
                                   const Groups<scalar_t>& gr, int64_t* d, int64_t* q) {
  int32_t blist[16];
  const int n = bucket_list(gr.gbucket, blist);
  if (n <= 4) {
    rank_pass_avx512_t<scalar_t, 4>(s, i, e, bk, gr, blist, d, q);
  } else if (n <= 8) {
    rank_pass_avx512_t<scalar_t, 8>(s, i, e, bk, gr, blist, d, q);
  } else if (n <= 12) {
    rank_pass_avx512_t<scalar_t, 12>(s, i, e, bk, gr, blist, d, q);
  } else if (n <= 16) {
    rank_pass_avx512_t<scalar_t, 16>(s, i, e, bk, gr, blist, d, q);
  } else {
    rank_pass_avx512_t<scalar_t, 0>(s, i, e, bk, gr, blist, d, q);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 versions of softrank's passes (8 items per step), for CPUs without AVX-512. AVX2 has no
// 64-bit vector multiply or leading-zero count: splitmix64's products from three 32-bit ones, the
// class from the exponent of (m | 1) as a double (exact below 2^52; class 11 above). The thresholds
// of classes 11..25 by two permutes; class >= 26 (2^-15 of the items) always goes to visit().
// Power and softmax keep their scalar loops here (1.4-1.5x torch.topk).
// ---------------------------------------------------------------------------------------------
#define FB_SR_AVX2 __attribute__((target("avx2")))

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

// Positions of the set bits of an 8-bit mask, in order (for a compress by permute).
struct CompressLut {
  uint8_t idx[256][8];
  constexpr CompressLut() : idx() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int j = 0; j < 8; ++j) {
        if (m & (1 << j)) idx[m][n++] = static_cast<uint8_t>(j);
      }
    }
  }
};
constexpr CompressLut kCompressLut{};

template <typename scalar_t>
FB_SR_AVX2 inline __m256i order_keys8(const scalar_t* p) {
  __m256 f;
  if constexpr (std::is_same_v<scalar_t, float>) {
    f = _mm256_loadu_ps(p);
  } else {
    f = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
  }
  const __m256i bits = _mm256_castps_si256(_mm256_add_ps(f, _mm256_setzero_ps()));  // -0 -> +0
  return _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), _mm256_set1_epi32(INT32_MIN)));
}

template <typename scalar_t>
FB_SR_AVX2 inline uint32_t equal8(const scalar_t* p, scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), _mm256_set1_ps(x), _CMP_EQ_OQ)));
  } else {
    const __m256d xv = _mm256_set1_pd(x);
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(p), xv, _CMP_EQ_OQ))) |
           (static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(p + 4), xv, _CMP_EQ_OQ))) << 4);
  }
}

// min, max and finiteness of p[0, n) (as minmax_serial).
template <typename scalar_t>
FB_SR_AVX2 bool minmax_avx2(const scalar_t* p, int64_t n, double& lo, double& hi) {
  constexpr int W = 32 / sizeof(scalar_t);
  if (n < 4 * W) return minmax_serial(p, n, lo, hi);
  int64_t i = 0;
  bool ok;
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m256 l[4], h[4], fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int j = 0; j < 4; ++j) l[j] = h[j] = _mm256_loadu_ps(p + j * W);
    for (; i + 4 * W <= n; i += 4 * W) {
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_loadu_ps(p + i + j * W);
        l[j] = _mm256_min_ps(l[j], v);
        h[j] = _mm256_max_ps(h[j], v);
        fin = _mm256_and_ps(fin, _mm256_cmp_ps(_mm256_and_ps(v, absm), big, _CMP_LE_OQ));
      }
    }
    ok = _mm256_movemask_ps(fin) == 0xFF;
    alignas(32) float lb[8], hb[8];
    _mm256_store_ps(lb, _mm256_min_ps(_mm256_min_ps(l[0], l[1]), _mm256_min_ps(l[2], l[3])));
    _mm256_store_ps(hb, _mm256_max_ps(_mm256_max_ps(h[0], h[1]), _mm256_max_ps(h[2], h[3])));
    float lm = lb[0], hm = hb[0];
    for (int j = 1; j < 8; ++j) {
      lm = std::min(lm, lb[j]);
      hm = std::max(hm, hb[j]);
    }
    lo = lm;
    hi = hm;
  } else {
    __m256d l[4], h[4], fin = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    const __m256d big = _mm256_set1_pd(std::numeric_limits<double>::max());
    const __m256d absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    for (int j = 0; j < 4; ++j) l[j] = h[j] = _mm256_loadu_pd(p + j * W);
    for (; i + 4 * W <= n; i += 4 * W) {
      for (int j = 0; j < 4; ++j) {
        const __m256d v = _mm256_loadu_pd(p + i + j * W);
        l[j] = _mm256_min_pd(l[j], v);
        h[j] = _mm256_max_pd(h[j], v);
        fin = _mm256_and_pd(fin, _mm256_cmp_pd(_mm256_and_pd(v, absm), big, _CMP_LE_OQ));
      }
    }
    ok = _mm256_movemask_pd(fin) == 0xF;
    alignas(32) double lb[4], hb[4];
    _mm256_store_pd(lb, _mm256_min_pd(_mm256_min_pd(l[0], l[1]), _mm256_min_pd(l[2], l[3])));
    _mm256_store_pd(hb, _mm256_max_pd(_mm256_max_pd(h[0], h[1]), _mm256_max_pd(h[2], h[3])));
    lo = std::min(std::min(lb[0], lb[1]), std::min(lb[2], lb[3]));
    hi = std::max(std::max(hb[0], hb[1]), std::max(hb[2], hb[3]));
  }
  if (i < n) {
    double l2 = 0, h2 = 0;
    ok = minmax_serial(p + i, n - i, l2, h2) && ok;
    lo = std::min(lo, l2);
    hi = std::max(hi, h2);
  }
  return ok;
}

template <typename scalar_t>
FB_SR_AVX2 int64_t hist_pass_avx2(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk, scalar_t hi,
                                  uint32_t* h) {
  const size_t nb = static_cast<size_t>(bk.nb);
  const __m256i vmin = _mm256_set1_epi32(static_cast<int>(bk.umin));
  const __m128i vsh = _mm_cvtsi32_si128(bk.sh);
  alignas(32) uint32_t buf[8];
  int64_t nm = 0;
  for (; i + 8 <= e; i += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_srl_epi32(_mm256_sub_epi32(order_keys8(s + i), vmin), vsh));
    nm += __builtin_popcount(equal8(s + i, hi));
    for (int j = 0; j < 8; j += 4) {
      ++h[buf[j]];
      ++h[nb + buf[j + 1]];
      ++h[2 * nb + buf[j + 2]];
      ++h[3 * nb + buf[j + 3]];
    }
  }
  return nm + hist_pass(s, i, e, bk, hi, h);
}

// a * c mod 2^64 on 4 lanes, c = (chi << 32) + clo given as broadcast 64-bit lanes.
FB_SR_AVX2 inline __m256i mul64_avx2(__m256i a, __m256i clo, __m256i chi) {
  const __m256i lo = _mm256_mul_epu32(a, clo);
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), clo), _mm256_mul_epu32(a, chi));
  return _mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32));
}

// mix64 on 4 lanes, then clz of the top 53 bits (| 1), as 4 uint64.
FB_SR_AVX2 inline __m256i noise_class4(__m256i z) {
  const __m256i m1lo = _mm256_set1_epi64x(static_cast<int64_t>(0xBF58476D1CE4E5B9ull & 0xFFFFFFFFull));
  const __m256i m1hi = _mm256_set1_epi64x(static_cast<int64_t>(0xBF58476D1CE4E5B9ull >> 32));
  const __m256i m2lo = _mm256_set1_epi64x(static_cast<int64_t>(0x94D049BB133111EBull & 0xFFFFFFFFull));
  const __m256i m2hi = _mm256_set1_epi64x(static_cast<int64_t>(0x94D049BB133111EBull >> 32));
  z = mul64_avx2(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), m1lo, m1hi);
  z = mul64_avx2(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), m2lo, m2hi);
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
  const __m256i m = _mm256_or_si256(_mm256_srli_epi64(z, 11), _mm256_set1_epi64x(1));  // < 2^53
  // m < 2^52: 2^52 + m exactly as a double; its exponent field e gives clz = 1086 - e.
  const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(m, _mm256_set1_epi64x(0x4330000000000000ll))),
                                  _mm256_set1_pd(0x1p52));
  const __m256i c = _mm256_sub_epi64(_mm256_set1_epi64x(1086), _mm256_srli_epi64(_mm256_castpd_si256(d), 52));
  const __m256i big = _mm256_cmpgt_epi64(m, _mm256_set1_epi64x((int64_t{1} << 52) - 1));  // bit 52 set: 11
  return _mm256_blendv_epi8(c, _mm256_set1_epi64x(11), big);
}

template <typename scalar_t>
FB_SR_AVX2 void rank_scan_avx2(const scalar_t* s, int64_t begin, int64_t end, uint64_t s0, RankScan& rs) {
  alignas(32) uint32_t t32[16];
  __m256i t0, t1;
  int64_t seen;
#define FB_SR_LOAD_THRESHOLDS2()                                                                    \
  do {                                                                                              \
    for (int j = 0; j < 16; ++j) t32[j] = static_cast<uint32_t>(std::min<uint64_t>(rs.uthr[11 + j], 0xFFFFFFFFu)); \
    t0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t32));                                  \
    t1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t32 + 8));                              \
    seen = rs.version;                                                                              \
  } while (0)
  FB_SR_LOAD_THRESHOLDS2();
  int64_t i = begin;
  auto z_of = [&](int64_t j) { return static_cast<int64_t>(s0 + static_cast<uint64_t>(j + 1) * kGamma); };
  __m256i za = _mm256_set_epi64x(z_of(i + 3), z_of(i + 2), z_of(i + 1), z_of(i));
  __m256i zb = _mm256_set_epi64x(z_of(i + 7), z_of(i + 6), z_of(i + 5), z_of(i + 4));
  const __m256i step = _mm256_set1_epi64x(static_cast<int64_t>(8 * kGamma));
  const __m256i even = _mm256_set_epi32(6, 4, 2, 0, 6, 4, 2, 0);
  const __m256i c11 = _mm256_set1_epi32(11), c26 = _mm256_set1_epi32(26), c25 = _mm256_set1_epi32(25),
                c7 = _mm256_set1_epi32(7);
  for (; i + 8 <= end; i += 8) {
    const __m256i u = order_keys8(s + i);
    const __m256i ca = _mm256_permutevar8x32_epi32(noise_class4(za), even);
    const __m256i cb = _mm256_permutevar8x32_epi32(noise_class4(zb), even);
    za = _mm256_add_epi64(za, step);
    zb = _mm256_add_epi64(zb, step);
    const __m256i c = _mm256_permute2x128_si256(ca, cb, 0x20);  // classes of items i .. i + 7
    const __m256i idx = _mm256_sub_epi32(_mm256_min_epu32(c, c26), c11);  // 0 .. 15
    const __m256i thr = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(t0, idx), _mm256_permutevar8x32_epi32(t1, idx),
                                           _mm256_cmpgt_epi32(idx, c7));
    const __m256i pass = _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(u, thr), u),  // u >= thr
                                         _mm256_cmpgt_epi32(c, c25));
    uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(pass)));
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      const int64_t ij = i + j;
      rs.visit(ij, order_key(static_cast<float>(s[ij])), noise_bits(s0, ij));
    }
    if (seen != rs.version) FB_SR_LOAD_THRESHOLDS2();
  }
#undef FB_SR_LOAD_THRESHOLDS2
  rank_scan(s, i, end, s0, rs);
}

template <typename scalar_t, int kList>
FB_SR_AVX2 void rank_pass_avx2_t(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk,
                                 const Groups<scalar_t>& gr, const int32_t* blist, int64_t* d, int64_t* q) {
  const __m256i vmin = _mm256_set1_epi32(static_cast<int>(bk.umin));
  const __m128i vsh = _mm_cvtsi32_si128(bk.sh);
  const __m256i c31 = _mm256_set1_epi32(31), one = _mm256_set1_epi32(1);
  const int* has = reinterpret_cast<const int*>(gr.has.data());
  const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  constexpr int kBuf = 256;
  alignas(32) int32_t bufi[kBuf + 8];
  alignas(32) int32_t bufb[kBuf + 8];
  int nbuf = 0;
  int64_t i0 = i;
  for (; i + 8 <= e; i += 8) {
    const __m256i b = _mm256_srl_epi32(_mm256_sub_epi32(order_keys8(s + i), vmin), vsh);
    __m256i hit;
    if constexpr (kList > 0) {
      hit = _mm256_cmpeq_epi32(b, _mm256_set1_epi32(blist[0]));
      for (int t = 1; t < kList; ++t) hit = _mm256_or_si256(hit, _mm256_cmpeq_epi32(b, _mm256_set1_epi32(blist[t])));
    } else {
      const __m256i w = _mm256_i32gather_epi32(has, _mm256_srli_epi32(b, 5), 4);
      hit = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_and_si256(b, c31)), one), one);
    }
    const uint32_t mask = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(hit)));
    // No branch on the mask: compress by a permute from a table, store 8 lanes, advance by the count.
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompressLut.idx[mask])));
    const __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(i - i0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bufi + nbuf), _mm256_permutevar8x32_epi32(idx, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bufb + nbuf), _mm256_permutevar8x32_epi32(b, perm));
    nbuf += __builtin_popcount(mask);
    if (nbuf >= kBuf || i - i0 >= (int64_t{1} << 30)) {  // (indices relative to i0 fit an int32)
      for (int j = 0; j < nbuf; ++j) rank_count(gr, s[i0 + bufi[j]], static_cast<size_t>(bufb[j]), d, q);
      nbuf = 0;
      i0 = i + 8;
    }
  }
  for (int j = 0; j < nbuf; ++j) rank_count(gr, s[i0 + bufi[j]], static_cast<size_t>(bufb[j]), d, q);
  rank_pass(s, i, e, bk, gr, d, q);
}

template <typename scalar_t>
FB_SR_AVX2 void rank_pass_avx2(const scalar_t* s, int64_t i, int64_t e, const Buckets& bk,
                               const Groups<scalar_t>& gr, int64_t* d, int64_t* q) {
  int32_t blist[16];
  const int n = bucket_list(gr.gbucket, blist);
  if (n <= 4) {
    rank_pass_avx2_t<scalar_t, 4>(s, i, e, bk, gr, blist, d, q);
  } else if (n <= 8) {
    rank_pass_avx2_t<scalar_t, 8>(s, i, e, bk, gr, blist, d, q);
  } else if (n <= 16) {
    rank_pass_avx2_t<scalar_t, 16>(s, i, e, bk, gr, blist, d, q);
  } else {
    rank_pass_avx2_t<scalar_t, 0>(s, i, e, bk, gr, blist, d, q);
  }
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif

// The loops a call runs (Kernels::kind()): scalar, AVX-512 or AVX2 (softrank only; power and
// softmax run their scalar loops then); Kernels::forced makes the tests compare them.
using Kernels = simd::Dispatch<has_avx512, has_avx2>;
using simd::kAvx2;
using simd::kAvx512;
using simd::kScalar;

template <typename scalar_t>
bool minmax_any(const scalar_t* p, int64_t n, double& lo, double& hi, int kern) {
#if FB_SR_X86
  if (kern == kAvx512) return minmax_avx512(p, n, lo, hi);
  if (kern == kAvx2) return minmax_avx2(p, n, lo, hi);
#endif
  return minmax_serial(p, n, lo, hi);
}

template <typename scalar_t>
std::vector<Entry> softrank_topk(scalar_t lo, scalar_t hi, const scalar_t* s, int64_t N, int64_t k,
                                 double beta, uint64_t s0, int64_t grain, int kern) {
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
    const size_t nb = static_cast<size_t>(bk.nb);
    std::vector<uint32_t> h(4 * nb, 0);
    int64_t nm;
#if FB_SR_X86
    if (kern == kAvx512) {
      nm = hist_pass_avx512(s, b, e, bk, hi, h.data());
    } else if (kern == kAvx2) {
      nm = hist_pass_avx2(s, b, e, bk, hi, h.data());
    } else
#endif
    {
      nm = hist_pass(s, b, e, bk, hi, h.data());
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
    RankScan rs(bk, k, beta, shift);
#if FB_SR_X86
    if (kern == kAvx512) {
      rank_scan_avx512(s, b, e, s0, rs);
    } else if (kern == kAvx2) {
      rank_scan_avx2(s, b, e, s0, rs);
    } else
#endif
    {
      rank_scan(s, b, e, s0, rs);
    }
    std::lock_guard<std::mutex> lock(mu);
    lo_all.insert(lo_all.end(), rs.heap.begin(), rs.heap.end());
    cands.insert(cands.end(), rs.cands.begin(), rs.cands.end());
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
  Groups<scalar_t> gr;
  std::vector<int64_t> cand_group(keep.size());
  for (size_t j = 0; j < keep.size(); ++j) {
    const scalar_t v = s[keep[j].idx];
    const int64_t b = bk.of(v);
    if (gr.gval.empty() || gr.gbucket.back() != b || gr.gval.back() != v) {
      gr.gval.push_back(v);
      gr.gbucket.push_back(b);
    }
    cand_group[j] = static_cast<int64_t>(gr.gval.size()) - 1;
  }
  const int64_t G = static_cast<int64_t>(gr.gval.size());
  gr.gval.push_back(gr.gval.back());  // the sentinel (G >= 1: keep holds >= k >= 1 candidates)
  gr.gfirst.assign(static_cast<size_t>(bk.nb), -1);
  gr.gnum.assign(static_cast<size_t>(bk.nb), 0);
  gr.has.assign(static_cast<size_t>((bk.nb + 31) / 32), 0);  // buckets with candidates
  for (int64_t g = 0; g < G; ++g) {
    const size_t b = static_cast<size_t>(gr.gbucket[static_cast<size_t>(g)]);
    if (gr.gfirst[b] < 0) gr.gfirst[b] = static_cast<int32_t>(g);
    ++gr.gnum[b];
    gr.has[b >> 5] |= uint32_t{1} << (b & 31);
  }
  std::vector<int64_t> diff(static_cast<size_t>(G) + 1, 0), eq(static_cast<size_t>(G) + 1, 0);
  at::parallel_for(0, N, grain, [&](int64_t b0, int64_t e0) {
    std::vector<int64_t> d(static_cast<size_t>(G) + 1, 0), q(static_cast<size_t>(G) + 1, 0);
#if FB_SR_X86
    if (kern == kAvx512) {
      rank_pass_avx512(s, b0, e0, bk, gr, d.data(), q.data());
    } else if (kern == kAvx2) {
      rank_pass_avx2(s, b0, e0, bk, gr, d.data(), q.data());
    } else
#endif
    {
      rank_pass(s, b0, e0, bk, gr, d.data(), q.data());
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t g = 0; g <= G; ++g) diff[static_cast<size_t>(g)] += d[static_cast<size_t>(g)];
    for (int64_t g = 0; g < G; ++g) eq[static_cast<size_t>(g)] += q[static_cast<size_t>(g)];
  });
  std::vector<double> log_rank(static_cast<size_t>(G));
  int64_t run = 0;
  for (int64_t g = 0; g < G; ++g) {
    run += diff[static_cast<size_t>(g)];
    const double greater = bk.rank_lo[static_cast<size_t>(gr.gbucket[static_cast<size_t>(g)])] - 1.0 + static_cast<double>(run);
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

template <typename scalar_t, int kMode>
void scan(const scalar_t* s, int64_t begin, int64_t end, int64_t k, double beta, double shift, uint64_t s0,
          std::vector<Entry>& heap, bool vec) {
  TopScan<scalar_t, kMode> ts(k, beta, shift, heap);
  const int64_t i = ts.fill(s, begin, end, s0);
  if (static_cast<int64_t>(heap.size()) < k) return;
#if FB_SR_X86
  if (vec) {
    scan_rest_avx512(s, i, end, s0, ts);
    return;
  }
#endif
  scan_rest(s, i, end, s0, ts);
}

template <typename scalar_t>
int64_t first_nonfinite_any(const scalar_t* p, int64_t b, int64_t e, bool vec) {
#if FB_SR_X86
  if (vec) return first_nonfinite_avx512(p, b, e);
#endif
  return first_nonfinite(p, b, e);
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
      const int kern = Kernels::kind();
      double lo, hi;
      bool finite = true;
      if (N < 2 * grain) {  // every pass is serial then: so is this one
        finite = minmax_any(p, N, lo, hi, kern);
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
                                      s0, grain, kern);
      }
    });
  } else if (k > 0) {
    const bool vec = Kernels::kind() == kAvx512;
    if (std::isnan(shift)) {  // the largest unscaled log-weight: max s (softmax), log max s (power)
      double m;
      if (N < 2 * std::max<int64_t>(1 << 20, 8 * k)) {  // serial, as the scan below
        AT_DISPATCH_FLOATING_TYPES(st, "fastbald_stochastic_max", [&] {
          double lo;
          minmax_any(x.const_data_ptr<scalar_t>(), N, lo, m, vec ? kAvx512 : kScalar);
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
        const int64_t bad = first_nonfinite_any(p, b, e, vec);
        if (bad < 0) {
          if (mode == 1) {
            scan<scalar_t, 1>(p, b, e, k, beta, shift, s0, heap, vec);
          } else if (mode == 2) {
            scan<scalar_t, 2>(p, b, e, k, beta, shift, s0, heap, vec);
          } else {
            scan<scalar_t, 0>(p, b, e, k, beta, shift, s0, heap, vec);
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
using FbSrKernels = fastbald::stochastic::Kernels;
static PyMethodDef fb_sr_methods[] = {
    {"vectorized", FbSrKernels::py_vectorized, METH_NOARGS,
     "True when fastbald::stochastic_topk runs its AVX-512 loops on this CPU."},
    {"kernel", FbSrKernels::py_kernel, METH_NOARGS,
     "The loops fastbald::stochastic_topk runs: 'avx512', 'avx2' (softrank; power and softmax then "
     "run the scalar loops) or 'scalar'."},
    {"_force_kernel", FbSrKernels::py_force_kernel, METH_O,
     "Force the code path: -1 automatic (FASTBALD_CPU_KERNEL=base|avx2|avx512, else the widest), 0 scalar, "
     "1 AVX-512, 2 AVX2 where available (tests)."},
    {nullptr, nullptr, 0, nullptr}};
PyMODINIT_FUNC PyInit__stochastic_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_stochastic_cpu", nullptr, -1,
                                          fb_sr_methods};
  return PyModule_Create(&module_def);
}
}
