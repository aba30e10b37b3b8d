// CPU kernel of fastbald::pool_scores.
//
// This file is compiled three times: into fastbald._cpu_avx512 (CPU_CAPABILITY=AVX512, so
// at::vec::Vectorized<float> is 16 lanes of one zmm register), fastbald._cpu_avx2 (-mavx2 -mfma,
// CPU_CAPABILITY=AVX2: 8 lanes) and fastbald._cpu_base (no ISA flags: portable to any x86-64).
// Python loads exactly one of them, chosen from the CPU's capability at run time; all register the
// same TORCH_LIBRARY_IMPL(fastbald, CPU).
//
// Work decomposition: at::parallel_for over pool items; one item at a time per thread. The SIMD
// lanes hold L consecutive MC samples (rows) of the item, so every per-row reduction over C is a
// lane-wise vector op with no horizontal shuffles, and the row math is the one of
// csrc/scores_math.h with V = Vectorized<A> (the CUDA kernels run the same functions with
// V = float, one row per thread). Each logit is read from memory once and exponentiated once; the
// item's probabilities and log-probabilities stay in a per-thread scratch (L1/L2) for the second,
// mean-KL pass. Only when T*C is too large for that scratch is the row recomputed (one more exp).
// No temporary grows with N; the only allocation of size N is the output.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../report_bad_item.h"
#include "../scores_math.h"

#ifndef FB_CPU_MODULE
#error "define FB_CPU_MODULE (the Python module name: _cpu_avx2 or _cpu_base)"
#endif
#define FB_CAT2(a, b) a##b
#define FB_CAT(a, b) FB_CAT2(a, b)
#define FB_STR2(a) #a
#define FB_STR(a) FB_STR2(a)

namespace fastbald {
namespace math {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define FB_X86_SIMD 1  // AVX2+FMA intrinsics available (the AVX-512 build has them too)
#endif

// SIMD value type: lanes are MC samples of one pool item.
#if defined(FB_X86_SIMD)
// The float registers of the x86 builds, as traits by width in bits: the exp and log below are
// written once and instantiated for __m256 (AVX2) and __m512 (AVX-512), with the same arithmetic
// in the same order (identical results).
template <int W>
struct X86;

template <>
struct X86<256> {
  using R = __m256;
  using I = __m256i;
  static __m256 set1(float v) { return _mm256_set1_ps(v); }
  static I set1i(int v) { return _mm256_set1_epi32(v); }
  static __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }
  static __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
  static __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
  static __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
  // p * 2^n for integral n (held as a float) when the result is a normal float: n added to the
  // exponent bits (t = n + 1.5 * 2^23 carries n in its low mantissa bits).
  static __m256 scale2n(__m256 p, __m256 /*n*/, __m256 t) {
    const I scale = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
  }
  static I bits(__m256 x) { return _mm256_castps_si256(x); }
  static __m256 from_bits(I x) { return _mm256_castsi256_ps(x); }
  static I srli23(I x) { return _mm256_srli_epi32(x, 23); }
  static I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static I ori(I a, I b) { return _mm256_or_si256(a, b); }
  static __m256 to_float(I x) { return _mm256_cvtepi32_ps(x); }
  // where x > thr: (a * ka, b + kb); elsewhere (a, b)
  static void where_gt(__m256 x, __m256 thr, __m256& a, __m256 ka, __m256& b, __m256 kb) {
    const __m256 m = _mm256_cmp_ps(x, thr, _CMP_GT_OQ);
    a = _mm256_blendv_ps(a, _mm256_mul_ps(a, ka), m);
    b = _mm256_add_ps(b, _mm256_and_ps(m, kb));
  }
};

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct X86<512> {
  using R = __m512;
  using I = __m512i;
  static __m512 set1(float v) { return _mm512_set1_ps(v); }
  static I set1i(int v) { return _mm512_set1_epi32(v); }
  static __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
  static __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  static __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
  static __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
  // p * 2^n in one instruction (exact for a normal result): the value the AVX2 bit trick gives.
  static __m512 scale2n(__m512 p, __m512 n, __m512 /*t*/) { return _mm512_scalef_ps(p, n); }
  static I bits(__m512 x) { return _mm512_castps_si512(x); }
  static __m512 from_bits(I x) { return _mm512_castsi512_ps(x); }
  static I srli23(I x) { return _mm512_srli_epi32(x, 23); }
  static I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I andi(I a, I b) { return _mm512_and_si512(a, b); }
  static I ori(I a, I b) { return _mm512_or_si512(a, b); }
  static __m512 to_float(I x) { return _mm512_cvtepi32_ps(x); }
  static void where_gt(__m512 x, __m512 thr, __m512& a, __m512 ka, __m512& b, __m512 kb) {
    const __mmask16 m = _mm512_cmp_ps_mask(x, thr, _CMP_GT_OQ);
    a = _mm512_mask_mul_ps(a, m, a, ka);
    b = _mm512_mask_add_ps(b, m, b, kb);
  }
};
#endif

// exp(x) for x in [-87, 0] (the kernels only pass [exp_floor, 0]): n = round(x / ln2) via the
// 1.5 * 2^23 trick, r = x - n ln2 in ONE fused multiply-add (the product n * ln2f is exact inside the
// FMA; ln2f's own error, 1.9e-9, times |n| <= 126 stays below 2.4e-7 in r), e^r on
// [-ln2/2, ln2/2] as 1 + r + r^2 (c2 + ... + c6 r^4) in six Horner FMAs (coefficients: a
// relative-error minimax fit, approximation error 3e-9), and 2^n added straight into the exponent
// bits. 10 instructions, no range checks (the caller guarantees the range). This kernel is bound by
// vector-ALU throughput, so every instruction here counts. Measured against exp in double over every
// float in [-20, 0]: <= 2 ulp (1.2e-7 relative); down to -87, where e^x < 1.7e-38 times the row's
// largest term, <= 5 ulp.
template <int W>
inline typename X86<W>::R exp_no_range_check(typename X86<W>::R x) {
  using S = X86<W>;
  using R = typename S::R;
  const R magic = S::set1(12582912.0f);
  const R t = S::fmadd(x, S::set1(1.44269504088896341f), magic);
  const R n = S::sub(t, magic);
  const R r = S::fnmadd(n, S::set1(0.693147180559945f), x);
  R p = S::set1(1.3814613369e-3f);
  p = S::fmadd(p, r, S::set1(8.3687099353e-3f));
  p = S::fmadd(p, r, S::set1(4.1668387367e-2f));
  p = S::fmadd(p, r, S::set1(1.6666520689e-1f));
  p = S::fmadd(p, r, S::set1(4.9999993452e-1f));
  p = S::fmadd(p, r, S::set1(1.0f));
  p = S::fmadd(p, r, S::set1(1.0f));
  return S::scale2n(p, n, t);
}

// log(x) for positive normal x (the kernels pass row sums s >= 1 and mean probabilities; a
// subnormal or zero pbar gives a value <= -87, which the caller floors): exponent from the bits,
// mantissa folded to [sqrt(1/2), sqrt(2)), Cephes logf polynomial (about 1 ulp). ~20
// instructions instead of Sleef's general-purpose log.
template <int W>
inline typename X86<W>::R log_positive_normal(typename X86<W>::R x) {
  using S = X86<W>;
  using R = typename S::R;
  const typename S::I xi = S::bits(x);
  R e = S::to_float(S::subi(S::srli23(xi), S::set1i(127)));
  R m = S::from_bits(S::ori(S::andi(xi, S::set1i(0x007fffff)), S::set1i(0x3f800000)));
  S::where_gt(m, S::set1(1.41421356237f), m, S::set1(0.5f), e, S::set1(1.0f));
  const R f = S::sub(m, S::set1(1.0f));
  const R z = S::mul(f, f);
  R y = S::set1(7.0376836292e-2f);
  y = S::fmadd(y, f, S::set1(-1.1514610310e-1f));
  y = S::fmadd(y, f, S::set1(1.1676998740e-1f));
  y = S::fmadd(y, f, S::set1(-1.2420140846e-1f));
  y = S::fmadd(y, f, S::set1(1.4249322787e-1f));
  y = S::fmadd(y, f, S::set1(-1.6668057665e-1f));
  y = S::fmadd(y, f, S::set1(2.0000714765e-1f));
  y = S::fmadd(y, f, S::set1(-2.4999993993e-1f));
  y = S::fmadd(y, f, S::set1(3.3333331174e-1f));
  y = S::mul(S::mul(y, f), z);
  y = S::fmadd(e, S::set1(-2.12194440e-4f), y);
  y = S::fnmadd(z, S::set1(0.5f), y);
  return S::fmadd(e, S::set1(0.693359375f), S::add(f, y));
}
#endif

#if defined(FB_X86_SIMD)
// The x86 max instructions return their SECOND operand when either is NaN: max_x86(lo, x) keeps a
// NaN x (clamp_low), and max_x86(a, b) is a one-instruction max for NaN-free inputs (at::vec's
// NaN-propagating maximum takes three or four).
inline __m256 max_x86(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256d max_x86(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 max_x86(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512d max_x86(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
#endif
#endif

template <class T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using M = V;
  static V exp(const V& x) {
#if defined(FB_X86_SIMD)
    if constexpr (std::is_same_v<T, float>) {
      return V(exp_no_range_check<8 * sizeof(V)>(x));  // __m256 or __m512, by V's register
    }
#endif
    return x.exp();
  }
  // Only for positive arguments (row sums, mean probabilities); input="probs" uses Sleef's log.
  static V log(const V& x) {
#if defined(FB_X86_SIMD)
    if constexpr (std::is_same_v<T, float>) {
      return V(log_positive_normal<8 * sizeof(V)>(x));
    }
#endif
    return x.log();
  }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // max(x, lo) keeping a NaN x; lo is never NaN.
  static V clamp_low(const V& x, const V& lo) {
#if defined(FB_X86_SIMD)
    return V(max_x86(lo, x));
#else
    return at::vec::maximum(x, lo);
#endif
  }
  // max for NaN-free inputs (with a NaN the result is either operand).
  static V max_fast(const V& a, const V& b) {
#if defined(FB_X86_SIMD)
    return V(max_x86(a, b));
#else
    return at::vec::maximum(a, b);
#endif
  }
  static M gt(const V& a, const V& b) { return a > b; }
  static M eq(const V& a, const V& b) { return a == b; }
  static M mask_andnot(const M& a, const M& b) { return a & (b ^ (V(T(0)) == V(T(0)))); }
  static M mask_or(const M& a, const M& b) { return a | b; }
  static V select(const M& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static V splat(double v) { return V(static_cast<T>(v)); }
};

// Two (or more) SIMD registers per value: independent dependency chains for the CPU's
// out-of-order core (the per-row sums are latency-bound with a single register).
template <class T, int K>
struct Ops<at::vec::VectorizedN<T, K>> {
  using V = at::vec::VectorizedN<T, K>;
  using M = V;
  using B = Ops<at::vec::Vectorized<T>>;
  static V exp(const V& x) {
    V r;
    for (int i = 0; i < K; ++i) r[i] = B::exp(x[i]);
    return r;
  }
  static V log(const V& x) {
    V r;
    for (int i = 0; i < K; ++i) r[i] = B::log(x[i]);
    return r;
  }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V clamp_low(const V& x, const V& lo) {
    V r;
    for (int i = 0; i < K; ++i) r[i] = B::clamp_low(x[i], lo[i]);
    return r;
  }
  static V max_fast(const V& a, const V& b) {
    V r;
    for (int i = 0; i < K; ++i) r[i] = B::max_fast(a[i], b[i]);
    return r;
  }
  static M gt(const V& a, const V& b) { return a > b; }
  static M eq(const V& a, const V& b) { return a == b; }
  static M mask_andnot(const M& a, const M& b) { return a & (b ^ (V(T(0)) == V(T(0)))); }
  static M mask_or(const M& a, const M& b) { return a | b; }
  static V select(const M& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static V splat(double v) { return V(static_cast<T>(v)); }
};

}  // namespace math

namespace cpu {
namespace {

using math::Ops;
template <class A>
using Vec = at::vec::Vectorized<A>;

// Largest per-item probability store (elements per array) kept for the mean-KL pass.
constexpr int64_t kStoreLimit = int64_t(1) << 16;

template <class A>
struct Scratch {
  std::vector<A> z, e, p, lp, pacc, vacc, pbar, lpbar, rowm, rowls, rowinv;
  std::vector<int64_t> counts;
  std::vector<int32_t> args;
  Scratch(int64_t T, int64_t C, int64_t L, bool store) {
    const int64_t nb = (T + L - 1) / L;
    z.resize(C * L);
    e.resize(C * L);
    if (store) {
      p.resize(nb * C * L);
      lp.resize(nb * C * L);
    }
    pacc.resize(C * L);
    vacc.resize(C * L);
    pbar.resize(C);
    lpbar.resize(C);
    rowm.resize(nb * L);
    rowls.resize(nb * L);
    rowinv.resize(nb * L);
    counts.assign(C, 0);
    args.resize(T);
  }
};

template <class A>
inline double hsum(const Vec<A>& v) {
  alignas(64) A buf[Vec<A>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vec<A>::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

template <class scalar_t, class A>
struct ItemKernel {
  using V = Vec<A>;
  using O = Ops<V>;
  using I = at::vec::int_same_size_t<A>;
  using VI = Vec<I>;
  static constexpr int64_t L = V::size();
  // Gather straight from the input when it is float32 / float64 (the accumulation type).
  static constexpr bool kGather = std::is_same_v<scalar_t, A>;

  const scalar_t* x;
  int64_t N, T, C, sN, sT, sC;
  int kind;
  int metrics;
  bool check;
  double tol;
  math::Needs needs;
  bool store;
  bool gather_ok;  // in-item offsets fit the gather's index type
  A* out;          // [7, N]

  // Load rows t0 .. t0 + nvalid - 1 of the item at `base` into zb as [C][L] (lanes past the item's
  // last row repeat row t0: always in bounds, and masked out of every sum).
  void fill(const scalar_t* base, int64_t t0, int64_t nvalid, A* zb) const {
    const scalar_t* b0 = base + t0 * sT;
    if constexpr (kGather) {
      if (sT == 1 && nvalid == L) {
        for (int64_t c = 0; c < C; ++c) V::loadu(b0 + c * sC).store(zb + c * L);
        return to_log(zb);
      }
      if (gather_ok) {
        alignas(64) I lane_off[L];
        for (int64_t l = 0; l < L; ++l) lane_off[l] = static_cast<I>(l < nvalid ? l * sT : 0);
        VI idx = VI::loadu(lane_off);
        const VI step(static_cast<I>(sC));
        for (int64_t c = 0; c < C; ++c) {
          at::vec::gather<sizeof(A)>(b0, idx).store(zb + c * L);
          idx = idx + step;
        }
        return to_log(zb);
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* row = b0 + (l < nvalid ? l : 0) * sT;
      for (int64_t c = 0; c < C; ++c) zb[c * L + l] = static_cast<A>(row[c * sC]);
    }
    to_log(zb);
  }

  void to_log(A* zb) const {
    if (kind == math::kProbs) {
      for (int64_t c = 0; c < C; ++c) V::loadu(zb + c * L).log().store(zb + c * L);
    }
  }

  static V valid_mask(int64_t nvalid) {
    return O::gt(V(static_cast<A>(nvalid)), V::arange(A(0), A(1)));
  }

  // Scores item n into out. Returns false (and writes nothing) if the item is bad and check is on.
  bool run(int64_t n, Scratch<A>& s) const {
    const scalar_t* base = x + n * sN;
    const int64_t nb = (T + L - 1) / L;
    A* zb = s.z.data();
    auto load = [zb](int64_t c) { return V::loadu(zb + c * L); };
    A* pacc = s.pacc.data();
    if (needs.pbar) std::fill(s.pacc.begin(), s.pacc.end(), A(0));
    V hacc(A(0));
    int64_t modal = 0;
    bool ok = true;
    int64_t t_done = 0;
    for (int64_t b = 0; b < nb && ok; ++b) {
      const int64_t t0 = b * L;
      const int64_t nvalid = std::min<int64_t>(L, T - t0);
      fill(base, t0, nvalid, zb);
      V m, arg;
      math::row_max_argmax<V>(load, C, m, arg);
      alignas(64) A marr[L];
      alignas(64) A aarr[L];
      m.store(marr);
      arg.store(aarr);
      for (int64_t l = 0; l < nvalid; ++l) {
        if (check && !(marr[l] > -std::numeric_limits<A>::infinity() &&
                       marr[l] < std::numeric_limits<A>::infinity())) {
          ok = false;
          break;
        }
        int64_t a = static_cast<int64_t>(aarr[l]);
        a = std::min<int64_t>(std::max<int64_t>(a, 0), C - 1);
        s.args[t0 + l] = static_cast<int32_t>(a);
        modal = std::max(modal, ++s.counts[a]);
        ++t_done;
      }
      if (!ok || !needs.exps) continue;
      A* eblk = store ? s.p.data() + b * C * L : s.e.data();
      A* dblk = store ? s.lp.data() + b * C * L : zb;
      V sum, xa;
      math::row_exp_sum<V, A>(load, C, m, sum, xa, [eblk, dblk](int64_t c, const V& d, const V& e) {
        d.store(dblk + c * L);
        e.store(eblk + c * L);
      });
      const V log_s = O::log(sum);
      const V inv_s = V(A(1)) / sum;
      const V valid = valid_mask(nvalid);
      if (check && kind == math::kProbs) {
        // sum_c p = s * exp(m) (the row was shifted by m = max log p).
        alignas(64) A tot[L];
        // m = max log p; clamped so exp stays in range (a row with p > e^80 fails anyway).
        (sum * O::exp(at::vec::minimum(m, V(A(80))))).store(tot);
        for (int64_t l = 0; l < nvalid; ++l) {
          if (!(std::abs(static_cast<double>(tot[l]) - 1.0) <= tol)) ok = false;
        }
        if (!ok) continue;
      }
      if (needs.entropy_t) {
        hacc = hacc + O::select(valid, math::row_entropy(log_s, xa, inv_s), V(A(0)));
      }
      if (needs.pbar) {
        // Lanes past the item's last row get p = 0.
        const V inv_s_valid = O::select(valid, inv_s, V(A(0)));
        for (int64_t c = 0; c < C; ++c) {
          const V p = V::loadu(eblk + c * L) * inv_s_valid;
          (V::loadu(pacc + c * L) + p).store(pacc + c * L);
          if (store) {
            p.store(eblk + c * L);
            (V::loadu(dblk + c * L) - log_s).store(dblk + c * L);
          }
        }
        if (!store) {
          m.store(s.rowm.data() + b * L);
          log_s.store(s.rowls.data() + b * L);
          inv_s.store(s.rowinv.data() + b * L);
        }
      }
    }
    // Reset the class counts for the next item.
    for (int64_t t = 0; t < t_done; ++t) s.counts[s.args[t]] = 0;
    if (!ok) return false;

    const double inv_T = 1.0 / static_cast<double>(T);
    auto put = [&](int k, double v) {
      if (metrics & (1 << k)) out[k * N + n] = static_cast<A>(v);
    };
    if (metrics & (1 << math::kVariationRatio)) {
      put(math::kVariationRatio, math::variation_ratio<double>(modal, T));
    }
    if (needs.entropy_t) put(math::kExpectedEntropy, hsum<A>(hacc) * inv_T);
    if (!needs.pbar) return true;

    double entropy = 0, top1 = 0, top2 = 0, ptot = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double pc = hsum<A>(V::loadu(pacc + c * L));
      s.pbar[c] = static_cast<A>(pc);
      ptot += pc;
    }
    // pbar = pacc / sum_c pacc (= pacc / T in exact arithmetic; see the group kernel).
    const double inv_ptot = 1.0 / ptot;
    for (int64_t c = 0; c < C; ++c) {
      const double pb = static_cast<double>(s.pbar[c]) * inv_ptot;
      const double lpb = math::log_pbar<double>(pb);
      s.pbar[c] = static_cast<A>(pb);
      s.lpbar[c] = static_cast<A>(std::max(lpb, static_cast<double>(math::Limits<A>::log_floor)));
      entropy += math::neg_plogp<double>(pb, lpb);
      math::top2_update<double>(pb, top1, top2);
    }
    put(math::kEntropy, entropy);
    put(math::kMargin, top1 - top2);
    put(math::kLeastConfidence, 1.0 - top1);
    if (!needs.second) return true;

    // Second pass: mean-KL and the two-pass variance, from the stored (or recomputed) p, log p.
    // Lanes past the last row hold p = 0: their KL term is 0 and their deviation is masked.
    // Partial sums go to double every kFlush classes.
    constexpr int64_t kFlush = 64;
    double kl_total = 0;
    A* vacc = s.vacc.data();
    std::fill(s.vacc.begin(), s.vacc.end(), A(0));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t t0 = b * L;
      const int64_t nvalid = std::min<int64_t>(L, T - t0);
      const V valid = valid_mask(nvalid);
      const A* pblk;
      const A* lblk;
      if (store) {
        pblk = s.p.data() + b * C * L;
        lblk = s.lp.data() + b * C * L;
      } else {
        fill(base, t0, nvalid, zb);
        const V m = V::loadu(s.rowm.data() + b * L);
        const V ls = V::loadu(s.rowls.data() + b * L);
        const V inv_s = O::select(valid, V::loadu(s.rowinv.data() + b * L), V(A(0)));
        A* eb = s.e.data();
        for (int64_t c = 0; c < C; ++c) {
          // exp only ever sees d in [exp_floor, 0] (see scores_math.h), never d - log s.
          const V d = math::shifted<V, A>(V::loadu(zb + c * L), m);
          (d - ls).store(zb + c * L);
          (O::exp(d) * inv_s).store(eb + c * L);
        }
        pblk = eb;
        lblk = zb;
      }
      for (int64_t c0 = 0; c0 < C; c0 += kFlush) {
        const int64_t c1 = std::min(C, c0 + kFlush);
        V kl(A(0));
        for (int64_t c = c0; c < c1; ++c) {
          const V p = V::loadu(pblk + c * L);
          kl = kl + math::kl_term(p, V::loadu(lblk + c * L), V(s.lpbar[c]));
          V dv = p - V(s.pbar[c]);
          if (nvalid < L) dv = O::select(valid, dv, V(A(0)));
          (V::loadu(vacc + c * L) + dv * dv).store(vacc + c * L);
        }
        kl_total += hsum<A>(kl);
      }
    }
    double std_sum = 0;
    for (int64_t c = 0; c < C; ++c) std_sum += std::sqrt(hsum<A>(V::loadu(vacc + c * L)) * inv_T);
    put(math::kBald, math::clamp0(kl_total * inv_T));
    put(math::kMeanStd, std_sum / static_cast<double>(C));
    return true;
  }
};

#if defined(FB_X86_SIMD)
// In-register 8x8 transpose of eight rows of 8 floats.
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// In-register 16x16 transpose of sixteen rows of 16 floats (unpack, shuffle, two 128-bit-lane
// shuffle stages: 64 shuffles per 256 values, against 96 for four 8x8 transposes).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

// One step of a row's argmax (ties: lowest class): arg = v > m ? cv : arg.
template <class V>
inline void argmax_step(V& arg, const V& m, const V& v, const V& cv) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    arg = V(_mm512_mask_mov_ps(arg, _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ), cv));
    return;
  }
#endif
  using O = math::Ops<V>;
  arg = O::select(O::gt(v, m), cv, arg);
}

// acc + (a == b ? inc : 0): the variation-ratio vote count (a, b small integers held as floats).
template <class V>
inline V add_where_eq(const V& acc, const V& a, const V& b, const V& inc) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return V(_mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), acc, inc));
  }
#endif
  return acc + ((a == b) & inc);
}

// Software prefetch of one cache line. Inline asm on x86-64: GCC deletes a loop whose body is
// only __builtin_prefetch (found in this kernel's disassembly: no prefetch instruction survived).
inline void prefetch_line(const char* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Small items (T * C up to kGroupLimit): the SIMD lanes hold L different pool items and every
// op is lane-wise, so no lane idles whatever T is, and nothing needs a horizontal reduction. The
// L item tiles are transposed into the scratch zt[f][lane] (f = in-tile offset of (t, c)); the
// row math is the same scores_math.h code as the row kernel, on V = Vectorized<A>.
constexpr int64_t kGroupLimit = 2048;

// Per-class values of a group ([C] x V): registers when C is a compile-time constant (CT > 0; the
// class loops unroll fully and the array is scalarised) and two such arrays fit in three quarters
// of the vector register file (AVX-512: 32 zmm; otherwise 16 ymm), the given [C][L] memory
// otherwise (the compiler would only spill them; measured for C = 10: AVX2 in memory 13% faster,
// AVX-512 in registers 5% faster).
#if defined(CPU_CAPABILITY_AVX512)
constexpr size_t kVecRegBytes = 32 * 64;
#else
constexpr size_t kVecRegBytes = 16 * 32;
#endif
template <class V, int CT>
constexpr bool kInRegs = CT > 0 && 4 * 2 * CT * sizeof(V) <= 3 * kVecRegBytes;

// ClassAcc: an accumulator that lives in registers or in memory.
template <class V, class A, int CT>
struct ClassAcc {
  V r[kInRegs<V, CT> ? CT : 1];
  A* mem;
  explicit ClassAcc(A* m) : mem(m) {}
  V get(int64_t c) const {
    if constexpr (kInRegs<V, CT>) return r[c];
    else return V::loadu(mem + c * V::size());
  }
  void set(int64_t c, const V& v) {
    if constexpr (kInRegs<V, CT>) r[c] = v;
    else v.store(mem + c * V::size());
  }
};

// ClassKeep: values always written to memory (read again later), with a register copy if they fit.
template <class V, class A, int CT>
struct ClassKeep {
  V r[kInRegs<V, CT> ? CT : 1];
  A* mem;
  explicit ClassKeep(A* m) : mem(m) {}
  V get(int64_t c) const {
    if constexpr (kInRegs<V, CT>) return r[c];
    else return V::loadu(mem + c * V::size());
  }
  void set(int64_t c, const V& v) {
    v.store(mem + c * V::size());
    if constexpr (kInRegs<V, CT>) r[c] = v;
  }
};

template <class A>
struct GroupScratch {
  std::vector<A> zt, eb, pacc, vacc, args, pbar, lpbar, rinv, rls;
  GroupScratch(int64_t T, int64_t C, int64_t L) {
    zt.resize(T * C * L);
    eb.resize(T * C * L);
    pacc.resize(C * L);
    vacc.resize(C * L);
    args.resize(T * L);
    pbar.resize(C * L);
    lpbar.resize(C * L);
    rinv.resize(T * L);
    rls.resize(T * L);
  }
};

// Lanes of the group kernel: 16 floats either way, as one AVX-512 register or two AVX2 ones (two
// independent chains for the per-row sums, which are latency-bound in a single AVX2 register).
// (Measured: 32 lanes as two AVX-512 registers is slower than one: the doubled scratch leaves L1.)
#if defined(CPU_CAPABILITY_AVX512)
template <class A>
using GroupVec = at::vec::Vectorized<A>;
#else
template <class A>
using GroupVec = at::vec::VectorizedN<A, 2>;
#endif

template <class scalar_t, class A>
struct GroupKernel {
  using V = GroupVec<A>;
  using O = Ops<V>;
  static constexpr int64_t L = V::size();
  static constexpr int64_t L1 = Vec<A>::size();

  const scalar_t* x;
  int64_t N, T, C, sN, sT, sC;
  int kind;
  int metrics;
  bool check;
  double tol;
  math::Needs needs;
  A* out;
  // In-tile strides of zt (elements): dense tiles keep their own layout, others become [T][C].
  int64_t ts, cs;
  bool dense;

  void fill(int64_t n0, int64_t nvalid, A* zt) const {
    const scalar_t* ptr[L];
    for (int64_t l = 0; l < L; ++l) ptr[l] = x + (n0 + (l < nvalid ? l : 0)) * sN;
    const int64_t TC = T * C;
    int64_t f0 = 0;
#if defined(FB_X86_SIMD)
    if constexpr (std::is_same_v<scalar_t, float> && L % 16 == 0) {
      if (dense) {
#if defined(CPU_CAPABILITY_AVX512)
        for (; f0 + 16 <= TC; f0 += 16) {
          for (int64_t h = 0; h < L / 16; ++h) {
            __m512 r[16];
            for (int l = 0; l < 16; ++l) r[l] = _mm512_loadu_ps(ptr[h * 16 + l] + f0);
            transpose16x16(r);
            for (int k = 0; k < 16; ++k) _mm512_storeu_ps(zt + (f0 + k) * L + h * 16, r[k]);
          }
        }
#endif
        for (; f0 + 8 <= TC; f0 += 8) {
          for (int64_t h = 0; h < L / 8; ++h) {
            __m256 r[8];
            for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(ptr[h * 8 + l] + f0);
            transpose8x8(r);
            for (int k = 0; k < 8; ++k) _mm256_storeu_ps(zt + (f0 + k) * L + h * 8, r[k]);
          }
        }
      }
    }
#endif
    if (dense) {
      for (int64_t f = f0; f < TC; ++f) {
        for (int64_t l = 0; l < L; ++l) zt[f * L + l] = static_cast<A>(ptr[l][f]);
      }
    } else {
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t l = 0; l < L; ++l) {
            zt[(t * C + c) * L + l] = static_cast<A>(ptr[l][t * sT + c * sC]);
          }
        }
      }
    }
    if (kind == math::kProbs) {
      for (int64_t f = 0; f < TC; ++f) V::loadu(zt + f * L).log().store(zt + f * L);
    }
  }

  // Software prefetch of the next group's tiles, spread over the current group's rows (part t of
  // T at row t): the transposing fill reads L items in an order the hardware prefetcher does not
  // follow, and the kernel is compute-bound, so the next group's lines must arrive while this group
  // computes. Issuing all of them at once stalls the core on the line-fill buffers (measured: no
  // better than no prefetch); spread out, the DRAM reads overlap the arithmetic (measured: time
  // per logit 0.95 -> 0.75 ns for (T, C) = (20, 10) on one core, data far beyond the caches).
  void prefetch_part(int64_t n0, int64_t k, int64_t K) const {
    if (!dense) return;
    const int64_t n1 = std::min(N, n0 + L);
    if (n0 >= n1) return;
    const int64_t tile = T * C * static_cast<int64_t>(sizeof(scalar_t));
    const char* base = reinterpret_cast<const char*>(x);
    if (sN == T * C) {  // the group's tiles are one contiguous block
      const char* p = base + n0 * tile;
      const int64_t lines = ((n1 - n0) * tile + 63) / 64;
      const int64_t per = (lines + K - 1) / K;
      const int64_t l1 = std::min(lines, (k + 1) * per);
      for (int64_t l = k * per; l < l1; ++l) prefetch_line(p + l * 64);
    } else {
      const int64_t lines = (tile + 63) / 64;  // per item
      const int64_t total = (n1 - n0) * lines;
      const int64_t per = (total + K - 1) / K;
      const int64_t i1 = std::min(total, (k + 1) * per);
      const int64_t item_bytes = sN * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t i = k * per; i < i1; ++i) {
        prefetch_line(base + (n0 + i / lines) * item_bytes + (i % lines) * 64);
      }
    }
  }

  // Scores items n0 .. n0 + nvalid - 1. Returns the lane of the first bad item, or -1.
  // CT > 0 fixes C at compile time and kNTC the in-tile layout [T][C] (the common C = 10 case:
  // fully unrolled class loops, no stride arithmetic, the per-class accumulators and the row's
  // exps in registers); CT = 0 is the general case (accumulators in the scratch).
  template <int CT, bool kNTC>
  int64_t run(int64_t n0, int64_t nvalid, GroupScratch<A>& s) const {
    const int64_t C = CT > 0 ? CT : this->C;
    const int64_t ts = kNTC ? C : this->ts;
    const int64_t cs = kNTC ? 1 : this->cs;
    A* zt = s.zt.data();
    A* eb = s.eb.data();
    fill(n0, nvalid, zt);
    const bool need_vr = (metrics & (1 << math::kVariationRatio)) != 0;
    const V zero(A(0)), one(A(1));
    const V inf(std::numeric_limits<A>::infinity());
    const V ninf(-std::numeric_limits<A>::infinity());
    ClassAcc<V, A, CT> pacc(s.pacc.data());
    if (needs.pbar) {
      for (int64_t c = 0; c < C; ++c) pacc.set(c, zero);
    }
    A* args = s.args.data();  // [T][L]: each row's argmax (as A; exact for C < 2^24)
    V hacc = zero;
    V ok = one == one;  // all ones
    const int64_t cstride = cs * L;
    for (int64_t t = 0; t < T; ++t) {
      prefetch_part(n0 + L, t, T);
      A* zrow = zt + t * ts * L;
      auto load = [zrow, cstride](int64_t c) { return V::loadu(zrow + c * cstride); };
      V m, arg;
      if (needs.exps) {
        // Max and argmax (ties: lowest c) with the plain max instruction: a NaN logit is caught
        // below through xa = sum_c e d, which any NaN reaches (shifted() keeps a NaN d).
        m = load(0);
        arg = zero;
        if (need_vr) {
          for (int64_t c = 1; c < C; ++c) {
            const V v = load(c);
            argmax_step(arg, m, v, V(static_cast<A>(c)));
            m = O::max_fast(m, v);
          }
        } else {
          for (int64_t c = 1; c < C; ++c) m = O::max_fast(m, load(c));
        }
      } else {
        math::row_max_argmax<V>(load, C, m, arg);  // NaN-propagating max: m is NaN for a NaN row
      }
      if (need_vr) arg.store(args + t * L);
      if (check) ok = ok & O::gt(m, ninf) & O::gt(inf, m);
      if (!needs.exps) continue;
      A* erow = eb + t * C * L;
      // d overwrites z in place; e goes to eb (and stays in registers when CT > 0).
      ClassKeep<V, A, CT> e(erow);
      V sum, xa;
      math::row_exp_sum<V, A>(load, C, m, sum, xa, [zrow, cstride, &e](int64_t c, const V& d, const V& ec) {
        d.store(zrow + c * cstride);
        e.set(c, ec);
      });
      const V log_s = O::log(sum);
      const V inv_s = one / sum;
      if (check) ok = ok & O::eq(xa, xa);
      if (check && kind == math::kProbs) {
        const V dev = (sum * O::exp(at::vec::minimum(m, V(A(80)))) - one).abs();
        ok = ok & (dev <= V(static_cast<A>(tol)));
      }
      if (needs.entropy_t) hacc = hacc + math::row_entropy(log_s, xa, inv_s);
      if (needs.pbar) {
        for (int64_t c = 0; c < C; ++c) pacc.set(c, at::vec::fmadd(e.get(c), inv_s, pacc.get(c)));
        inv_s.store(s.rinv.data() + t * L);
        log_s.store(s.rls.data() + t * L);
      }
    }
    if (check) {
      alignas(64) A okarr[L];
      ok.store(okarr);
      for (int64_t l = 0; l < nvalid; ++l) {
        if (okarr[l] == A(0)) return l;
      }
    }
    const A inv_T = A(1) / static_cast<A>(T);
    auto put = [&](int k, const V& v) {
      if (metrics & (1 << k)) v.store(out + k * N + n0, static_cast<int>(nvalid));
    };
    if (need_vr) {
      // Votes counted per class over the stored argmaxes: the count of the modal class.
      // Four classes at a time: four independent count chains (classes >= C never match).
      V modal = zero;
      for (int64_t c = 0; c < C; c += 4) {
        const V c0(static_cast<A>(c)), c1(static_cast<A>(c + 1)), c2(static_cast<A>(c + 2)),
            c3(static_cast<A>(c + 3));
        V k0 = zero, k1 = zero, k2 = zero, k3 = zero;
        for (int64_t t = 0; t < T; ++t) {
          const V a = V::loadu(args + t * L);
          k0 = add_where_eq(k0, a, c0, one);
          k1 = add_where_eq(k1, a, c1, one);
          k2 = add_where_eq(k2, a, c2, one);
          k3 = add_where_eq(k3, a, c3, one);
        }
        modal = O::max(O::max(modal, O::max(k0, k1)), O::max(k2, k3));
      }
      put(math::kVariationRatio, (V(static_cast<A>(T)) - modal) / V(static_cast<A>(T)));
    }
    if (needs.entropy_t) put(math::kExpectedEntropy, hacc * V(inv_T));
    if (!needs.pbar) return -1;
    A* pbar = s.pbar.data();
    A* lpbar = s.lpbar.data();
    V ent = zero, top1 = zero, top2 = zero;
    const V floor(math::Limits<A>::log_floor);
    // pbar = pacc / sum_c pacc: the same as pacc / T in exact arithmetic, but sum_c pbar = 1 to
    // rounding, so the mean-KL has no first-order error from the rounding of the sum over t.
    V ptot = zero;
    for (int64_t c = 0; c < C; ++c) ptot = ptot + pacc.get(c);
    const V inv_ptot = one / ptot;
    for (int64_t c = 0; c < C; ++c) {
      const V pb = pacc.get(c) * inv_ptot;
      const V lpb = O::max(O::log(pb), floor);
      pb.store(pbar + c * L);
      lpb.store(lpbar + c * L);
      ent = ent - pb * lpb;  // pb = 0 -> 0 * floor = 0
      top2 = O::max(top2, at::vec::minimum(top1, pb));
      top1 = O::max(top1, pb);
    }
    put(math::kEntropy, ent);
    put(math::kMargin, top1 - top2);
    put(math::kLeastConfidence, one - top1);
    if (!needs.second) return -1;
    // Second pass over the item tiles (L1/L2-resident): mean-KL with log p = d - log s, so
    // sum_c p (log p - log pbar) = sum_c p (d - log pbar) - log s * sum_c p, and the two-pass
    // variance of p.
    ClassAcc<V, A, CT> vacc(s.vacc.data());
    for (int64_t c = 0; c < C; ++c) vacc.set(c, zero);
    V kl = zero;
    for (int64_t t = 0; t < T; ++t) {
      const A* zrow = zt + t * ts * L;
      const A* erow = eb + t * C * L;
      const V inv_s = V::loadu(s.rinv.data() + t * L);
      V klrow = zero, prow = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V p = V::loadu(erow + c * L) * inv_s;
        klrow = klrow + math::kl_term(p, V::loadu(zrow + c * cstride), V::loadu(lpbar + c * L));
        prow = prow + p;
        const V dv = p - V::loadu(pbar + c * L);
        vacc.set(c, at::vec::fmadd(dv, dv, vacc.get(c)));
      }
      kl = kl + (klrow - V::loadu(s.rls.data() + t * L) * prow);
    }
    V std_sum = zero;
    for (int64_t c = 0; c < C; ++c) std_sum = std_sum + (vacc.get(c) * V(inv_T)).sqrt();
    put(math::kBald, O::max(kl * V(inv_T), zero));
    put(math::kMeanStd, std_sum * V(A(1) / static_cast<A>(C)));
    return -1;
  }
};

at::Tensor pool_scores_cpu(const at::Tensor& x, int64_t input_kind, int64_t metrics,
                           bool check_finite, double prob_tol) {
  check_pool_scores_args(x, input_kind, metrics, prob_tol);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "fastbald::pool_scores (CPU kernel): x is on ", x.device());
  const int64_t N = x.size(0), T = x.size(1), C = x.size(2);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({math::kNumMetrics, N}, x.options().dtype(acc_type));
  out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbald_pool_scores_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t L = Vec<A>::size();
    const int64_t nb = (T + L - 1) / L;
    const bool store = nb * C * L <= kStoreLimit;
    using I = at::vec::int_same_size_t<A>;
    const bool gather_ok = (L - 1) * x.stride(1) + (C - 1) * x.stride(2) <=
                           static_cast<int64_t>(std::numeric_limits<I>::max());
    ItemKernel<scalar_t, A> k{x.const_data_ptr<scalar_t>(),
                              N,
                              T,
                              C,
                              x.stride(0),
                              x.stride(1),
                              x.stride(2),
                              static_cast<int>(input_kind),
                              static_cast<int>(metrics),
                              check_finite,
                              prob_tol,
                              math::Needs(static_cast<int>(metrics), static_cast<int>(input_kind)),
                              store,
                              gather_ok,
                              out.data_ptr<A>()};
    std::atomic<int64_t> first_bad{N};
    auto note_bad = [&first_bad](int64_t n) {
      int64_t cur = first_bad.load();
      while (n < cur && !first_bad.compare_exchange_weak(cur, n)) {
      }
    };
    if (T * C <= kGroupLimit && !std::getenv("FASTBALD_FORCE_ROW_KERNEL")) {
      const bool ntc = x.stride(2) == 1 && x.stride(1) == C;
      const bool nct = x.stride(1) == 1 && x.stride(2) == T;
      GroupKernel<scalar_t, A> g{k.x, N, T, C, k.sN, k.sT, k.sC, k.kind, k.metrics, check_finite,
                                 prob_tol, k.needs, k.out, ntc ? C : (nct ? 1 : C),
                                 ntc ? 1 : (nct ? T : 1), ntc || nct};
      // Grain in items: a multiple of L, about 32K elements per task.
      constexpr int64_t G = GroupKernel<scalar_t, A>::L;
      const int64_t grain = std::max<int64_t>(G, (32768 / (T * C)) / G * G);
      at::parallel_for(0, (N + G - 1) / G, std::max<int64_t>(1, grain / G), [&](int64_t gb, int64_t ge) {
        GroupScratch<A> s(T, C, G);
        for (int64_t gi = gb; gi < ge; ++gi) {
          const int64_t n0 = gi * G;
          if (n0 > first_bad.load(std::memory_order_relaxed)) break;
          const int64_t nv = std::min<int64_t>(G, N - n0);
          int64_t lane;
          if (ntc && C == 10) {
            lane = g.template run<10, true>(n0, nv, s);
          } else if (ntc && C == 2) {
            lane = g.template run<2, true>(n0, nv, s);
          } else if (ntc) {
            lane = g.template run<0, true>(n0, nv, s);
          } else {
            lane = g.template run<0, false>(n0, nv, s);
          }
          if (lane >= 0) {
            note_bad(n0 + lane);
            break;
          }
        }
      });
    } else {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T * C));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      Scratch<A> s(T, C, L, store);
      for (int64_t n = begin; n < end; ++n) {
        if (n > first_bad.load(std::memory_order_relaxed)) break;
        if (!k.run(n, s)) {
          note_bad(n);
          break;
        }
      }
    });
    }
    const int64_t bad = first_bad.load();
    if (bad < N) {
      report_bad_item<scalar_t>(k.x + bad * k.sN, bad, T, C, k.sT, k.sC, k.kind, prob_tol);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fastbald

TORCH_LIBRARY_IMPL(fastbald, CPU, m) {
  m.impl("pool_scores", &fastbald::cpu::pool_scores_cpu);
}

extern "C" {
PyMODINIT_FUNC FB_CAT(PyInit_, FB_CPU_MODULE)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FB_STR(FB_CPU_MODULE), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
