// SIMD building blocks of the CPU kernel (csrc/cpu/scores_cpu.cpp), in namespace fastbald::math:
// the x86 float registers as traits by width (X86<256>: AVX2, X86<512>: AVX-512), the exp and log
// written once over those traits, and math::Ops (the vector interface csrc/scores_math.h's row math
// is written against) for at::vec::Vectorized<T> (one register) and VectorizedN<T, K> (K of them).
//
// Included only by scores_cpu.cpp, which is compiled once per CPU build: CPU_CAPABILITY_AVX512 /
// CPU_CAPABILITY_AVX2 select the x86 code; the portable build falls back to at::vec's own exp/log.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../scores_math.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define FB_X86_SIMD 1  // AVX2+FMA intrinsics available (the AVX-512 build has them too)
#endif

namespace fastbald {
namespace math {

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
}  // namespace fastbald
