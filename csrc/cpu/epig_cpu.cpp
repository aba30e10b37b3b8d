// CPU kernel of fastbald::epig_block, the inner loop of fastbald/epig.py (EPIG, Bickford Smith et
// al., AISTATS 2023). Per task of `items` pool items, in one parallel region:
//
//   1. softmax of each sample's log-probabilities (checked: NaN / +inf / all -inf, and for
//      input='log_probs' a logsumexp of 0 within tol), class means p, and a_t = prob^T / p
//      ([items * C, K]);
//   2. per block of target columns: R = a_t bt^T = P / (p q) ([items * C, cols], stays in cache),
//      by oneDNN's float32 matmul (2x MKL's sgemm on AMD CPUs) or at::mm;
//   3. one pass over R: s_bc += sum_j w_j f(R_{bc, j}), f(r) = r log r - r + 1 (>= 0, f(0) = 1);
//      out_b = sum_c p_bc s_bc.
//
// That replaces the PyTorch path's six elementwise passes (clamp, log, mul, sub, add, GEMV) over
// every block; the product (2 K flops per joint entry) is then most of the time.
//
// Accuracy: every term is >= 0 and f is evaluated without cancellation near r = 1, where most
// ratios lie: with r = m 2^e, m in [1/sqrt2, sqrt2), x = m - 1 (exact):
//   float64: u = x / (2 + x), log m = 2 atanh(u) = 2u + 2u^3 S(u^2) (series to u^23, relative
//            error < 1e-17), and for e = 0: f = x u + 2 m u^3 S(u^2) (as 2u (1 + x) - x = x u);
//   float32: Cephes' logf polynomial, log m = x + y (y = x^2 (x P(x) - 1/2)), and for e = 0:
//            f = y (1 + x) + x^2 (f ~ x^2 / 2: at most one bit lost);
//   e != 0:  f = r (e ln2 + log m - 1) + 1 (f >= 0.04 there: no cancellation).
// r below the dtype's smallest normal number counts as 0 (f = 1), as the PyTorch path's
// clamp_min(tiny). Sums over a row in the working dtype (4 x 16 / 4 x 8 lanes), over classes in
// float64.
//
// Vectorised for AVX-512 (functions with target attributes, chosen at run time, so the library
// loads on any x86-64 CPU); other CPUs run the same formulas in scalar code (float64 math).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_dispatch.h"

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 flags _mm512_undefined_ps() (`__m512 __Y = __Y;` in its own avx512fintrin.h) as
// (maybe-)uninitialized once inlined: a known false positive (setup.py's AVX-512 flags say the same).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define FB_EPIG_X86 1
#else
#define FB_EPIG_X86 0
#endif

namespace fastbald {
namespace epig {
namespace {

constexpr double kSqrt2 = 1.4142135623730951;
constexpr double kLn2Hi = 0.6931471803691238;
constexpr double kLn2Lo = 1.9082149292705877e-10;

// ---------------------------------------------------------------------------------------------
// Scalar code (CPUs without AVX-512), float64 math for both dtypes.
// ---------------------------------------------------------------------------------------------
// S(t) = sum_n t^n / (2n + 3), n = 0..10: 2u^3 S(u^2) = 2 atanh(u) - 2u to < 1e-17 relative for
// |u| <= 3 - 2 sqrt2 (t <= 0.0295).
inline double series_s(double t) {
  double s = 1.0 / 23;
  s = s * t + 1.0 / 21;
  s = s * t + 1.0 / 19;
  s = s * t + 1.0 / 17;
  s = s * t + 1.0 / 15;
  s = s * t + 1.0 / 13;
  s = s * t + 1.0 / 11;
  s = s * t + 1.0 / 9;
  s = s * t + 1.0 / 7;
  s = s * t + 1.0 / 5;
  return s * t + 1.0 / 3;
}

inline double f_scalar(double r, double tiny) {
  if (!(r >= tiny)) return r != r ? r : 1.0;  // 0 <= r < tiny: the limit f(0) = 1; NaN stays NaN
  int e2;
  double m = 2.0 * std::frexp(r, &e2);  // r = m 2^e, m in [1, 2)
  int e = e2 - 1;
  if (m > kSqrt2) {
    m *= 0.5;
    e += 1;
  }
  const double x = m - 1.0;
  const double u = x / (2.0 + x);
  const double t = u * u;
  const double tail = 2.0 * u * t * series_s(t);  // 2u^3 S(u^2)
  if (e == 0) return x * u + m * tail;
  const double lg = (2.0 * u + tail) + static_cast<double>(e) * kLn2Lo + static_cast<double>(e) * kLn2Hi;
  return r * (lg - 1.0) + 1.0;
}

// sums[i] += sum_j w_j f(r_ij), rows i < n_rows of stride ld, columns j < M.
template <typename scalar_t>
void rowsums_scalar(const scalar_t* r, int64_t ld, const scalar_t* w, int64_t n_rows, int64_t M,
                    double* sums) {
  const double tiny = std::numeric_limits<scalar_t>::min();
  for (int64_t i = 0; i < n_rows; ++i) {
    const scalar_t* row = r + i * ld;
    double s = 0.0;
    for (int64_t j = 0; j < M; ++j) s += static_cast<double>(w[j]) * f_scalar(row[j], tiny);
    sums[i] += s;
  }
}

// One pool item ([K][C] at xb): at = ([C][K]) softmax probabilities / class mean (0 where the mean
// is below the smallest normal number), pb = class means. False for a NaN / +inf entry, a sample
// with every class at -inf, or (tol finite) a sample whose logsumexp is off 0 by more than tol.
template <typename scalar_t>
bool prep_item_scalar(const scalar_t* xb, int64_t K, int64_t C, double tol, scalar_t* e, scalar_t* at,
                      scalar_t* pb) {
  constexpr scalar_t kTiny = std::numeric_limits<scalar_t>::min();
  constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();
  for (int64_t c = 0; c < C; ++c) pb[c] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = xb + k * C;
    scalar_t m = -kInf;
    for (int64_t c = 0; c < C; ++c) {
      if (std::isnan(row[c]) || row[c] == kInf) return false;
      m = std::max(m, row[c]);
    }
    if (m == -kInf) return false;
    scalar_t sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (e[k * C + c] = std::exp(row[c] - m));
    if (std::isfinite(tol) && !(std::fabs(static_cast<double>(m) + std::log(static_cast<double>(sum))) <= tol)) {
      return false;
    }
    const scalar_t inv = scalar_t(1) / sum;
    for (int64_t c = 0; c < C; ++c) pb[c] += (e[k * C + c] *= inv);
  }
  for (int64_t c = 0; c < C; ++c) {
    pb[c] /= static_cast<scalar_t>(K);
    const scalar_t ip = pb[c] >= kTiny ? scalar_t(1) / pb[c] : scalar_t(0);
    for (int64_t k = 0; k < K; ++k) at[c * K + k] = e[k * C + c] * ip;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------
#if FB_EPIG_X86
#define FB_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

// r = m 2^e with m in [1/sqrt2, sqrt2); x = m - 1 (exact), log m = x + y (Cephes logf).
struct LogPs {
  __m512 e, m, x, y;
};
FB_AVX512 inline LogPs log_parts_ps(__m512 r) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = _mm512_getexp_ps(r);                                         // floor(log2 r)
  __m512 m = _mm512_getmant_ps(r, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(static_cast<float>(kSqrt2)), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, one);
  const __m512 x = _mm512_sub_ps(m, one);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return {e, m, x, y};
}

// log r (r > 0 normal) from its parts: e ln2 + x + y, ln2 split as Cephes does.
FB_AVX512 inline __m512 log_from_parts_ps(const LogPs& l) {
  __m512 lg = _mm512_fmadd_ps(l.e, _mm512_set1_ps(-2.12194440e-4f), l.y);
  lg = _mm512_add_ps(lg, l.x);
  return _mm512_fmadd_ps(l.e, _mm512_set1_ps(0.693359375f), lg);
}

// f(r) for 16 float32 ratios.
FB_AVX512 inline __m512 f_ps(__m512 r) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 small = _mm512_cmp_ps_mask(r, _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
  const LogPs l = log_parts_ps(r);
  // e = 0 (r = m = 1 + x): f = (1 + x)(x + y) - x = y (1 + x) + x^2.
  const __m512 f_near = _mm512_fmadd_ps(l.y, l.m, _mm512_mul_ps(l.x, l.x));
  const __m512 f_gen = _mm512_fmadd_ps(r, _mm512_sub_ps(log_from_parts_ps(l), one), one);
  const __mmask16 near = _mm512_cmp_ps_mask(l.e, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(small, _mm512_mask_blend_ps(near, f_gen, f_near), one);
}

// f(r) for 8 float64 ratios.
FB_AVX512 inline __m512d f_pd(__m512d r) {
  const __m512d one = _mm512_set1_pd(1.0);
  const __mmask8 small = _mm512_cmp_pd_mask(r, _mm512_set1_pd(DBL_MIN), _CMP_LT_OQ);
  __m512d e = _mm512_getexp_pd(r);
  __m512d m = _mm512_getmant_pd(r, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(kSqrt2), _CMP_GT_OQ);
  m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
  e = _mm512_mask_add_pd(e, big, e, one);
  const __m512d x = _mm512_sub_pd(m, one);
  const __m512d u = _mm512_div_pd(x, _mm512_add_pd(x, _mm512_set1_pd(2.0)));
  const __m512d t = _mm512_mul_pd(u, u);
  __m512d s = _mm512_set1_pd(1.0 / 23);
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 21));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 19));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 17));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 15));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 13));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 11));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 9));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 7));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 5));
  s = _mm512_fmadd_pd(s, t, _mm512_set1_pd(1.0 / 3));
  const __m512d u2 = _mm512_add_pd(u, u);
  const __m512d tail = _mm512_mul_pd(_mm512_mul_pd(u2, t), s);  // 2u^3 S(u^2)
  const __m512d f_near = _mm512_fmadd_pd(m, tail, _mm512_mul_pd(x, u));
  __m512d lg = _mm512_add_pd(u2, tail);
  lg = _mm512_fmadd_pd(e, _mm512_set1_pd(kLn2Lo), lg);
  lg = _mm512_fmadd_pd(e, _mm512_set1_pd(kLn2Hi), lg);
  const __m512d f_gen = _mm512_fmadd_pd(r, _mm512_sub_pd(lg, one), one);
  const __mmask8 near = _mm512_cmp_pd_mask(e, _mm512_setzero_pd(), _CMP_EQ_OQ);
  return _mm512_mask_blend_pd(small, _mm512_mask_blend_pd(near, f_gen, f_near), one);
}

// sum_j w_j f(row_j): four accumulators; the tail padded with r = 1 (f = 0) and w = 0.
FB_AVX512 inline double row_ps(const float* row, const float* w, int64_t M) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 64 <= M; j += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), f_ps(_mm512_loadu_ps(row + j)), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), f_ps(_mm512_loadu_ps(row + j + 16)), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 32), f_ps(_mm512_loadu_ps(row + j + 32)), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 48), f_ps(_mm512_loadu_ps(row + j + 48)), a3);
  }
  for (; j < M; j += 16) {
    const int64_t n = M - j < 16 ? M - j : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 rv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), k, row + j);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + j), f_ps(rv), a0);
  }
  return static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
}

FB_AVX512 inline double row_pd(const double* row, const double* w, int64_t M) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= M; j += 32) {
    a0 = _mm512_fmadd_pd(_mm512_loadu_pd(w + j), f_pd(_mm512_loadu_pd(row + j)), a0);
    a1 = _mm512_fmadd_pd(_mm512_loadu_pd(w + j + 8), f_pd(_mm512_loadu_pd(row + j + 8)), a1);
    a2 = _mm512_fmadd_pd(_mm512_loadu_pd(w + j + 16), f_pd(_mm512_loadu_pd(row + j + 16)), a2);
    a3 = _mm512_fmadd_pd(_mm512_loadu_pd(w + j + 24), f_pd(_mm512_loadu_pd(row + j + 24)), a3);
  }
  for (; j < M; j += 8) {
    const int64_t n = M - j < 8 ? M - j : 8;
    const __mmask8 k = static_cast<__mmask8>((1u << n) - 1u);
    const __m512d rv = _mm512_mask_loadu_pd(_mm512_set1_pd(1.0), k, row + j);
    a0 = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(k, w + j), f_pd(rv), a0);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
}

template <typename scalar_t>
FB_AVX512 void rowsums_avx512(const scalar_t* r, int64_t ld, const scalar_t* w, int64_t n_rows,
                              int64_t M, double* sums) {
  for (int64_t i = 0; i < n_rows; ++i) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      sums[i] += row_ps(r + i * ld, w, M);
    } else {
      sums[i] += row_pd(r + i * ld, w, M);
    }
  }
}

// exp(x) for 16 float32 x <= 0 (-inf gives 0): x = n ln2 + t, |t| <= ln2 / 2, exp(t) by its Taylor
// polynomial to t^7 (relative error < 1e-8), scaled by 2^n (scalef: gradual underflow to 0).
FB_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  t = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), t);
  __m512 y = _mm512_set1_ps(1.0f / 5040);
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f / 720));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f / 120));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// prep_item_scalar for float32, vectorised over the K samples: T = x[b]^T ([C][Kp], Kp = K rounded
// up to 16), s: [Kp] scratch.
FB_AVX512 bool prep_item_ps(const float* xb, int64_t K, int64_t C, int64_t Kp, double tol, float* T,
                            float* s, float* at, float* pb) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) T[c * Kp + k] = xb[k * C + c];
  }
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const bool check_lse = std::isfinite(tol);
  const __m512 tolv = _mm512_set1_ps(static_cast<float>(check_lse ? tol : 0.0));
  __mmask16 bad = 0;
  for (int64_t k = 0; k < Kp; k += 16) {
    const __mmask16 km = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 m = ninf;
    for (int64_t c = 0; c < C; ++c) {
      const __m512 v = _mm512_maskz_loadu_ps(km, T + c * Kp + k);
      bad |= _mm512_mask_cmp_ps_mask(km, v, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);  // NaN or +inf
      m = _mm512_max_ps(m, v);
    }
    bad |= _mm512_mask_cmp_ps_mask(km, m, ninf, _CMP_EQ_OQ);  // every class at -inf
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, T + c * Kp + k), m));
      _mm512_storeu_ps(T + c * Kp + k, _mm512_maskz_mov_ps(km, e));
      sum = _mm512_add_ps(sum, e);
    }
    sum = _mm512_mask_blend_ps(km, _mm512_set1_ps(1.0f), sum);  // sum >= 1: log is defined
    if (check_lse) {  // |m + log(sum)| <= tol
      const __m512 lse = _mm512_add_ps(m, log_from_parts_ps(log_parts_ps(sum)));
      bad |= _mm512_mask_cmp_ps_mask(km, _mm512_abs_ps(lse), tolv, _CMP_NLE_UQ);
    }
    _mm512_storeu_ps(s + k, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
  }
  if (bad) return false;
  const float inv_k = 1.0f / static_cast<float>(K);
  for (int64_t c = 0; c < C; ++c) {
    float* row = T + c * Kp;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 16) {
      const __m512 pr = _mm512_mul_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(s + k));  // pads: 0
      _mm512_storeu_ps(row + k, pr);
      acc = _mm512_add_ps(acc, pr);
    }
    const float pc = _mm512_reduce_add_ps(acc) * inv_k;
    pb[c] = pc;
    const __m512 ip = _mm512_set1_ps(pc >= FLT_MIN ? 1.0f / pc : 0.0f);
    float* dst = at + c * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(dst + k, _mm512_mul_ps(_mm512_loadu_ps(row + k), ip));
    if (k < K) {
      const __mmask16 km = static_cast<__mmask16>((1u << (K - k)) - 1u);
      _mm512_mask_storeu_ps(dst + k, km, _mm512_mul_ps(_mm512_loadu_ps(row + k), ip));
    }
  }
  return true;
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return ok;
}
#else
bool has_avx512() { return false; }
#endif

// AVX-512 or scalar code (Kernels::kind()); Kernels::forced makes the tests compare the two.
using Kernels = simd::Dispatch<has_avx512>;

template <typename scalar_t>
bool prep_item(const scalar_t* xb, int64_t K, int64_t C, double tol, bool vec, scalar_t* buf, scalar_t* at,
               scalar_t* pb) {
#if FB_EPIG_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (vec) {
      const int64_t Kp = (K + 15) / 16 * 16;
      return prep_item_ps(xb, K, C, Kp, tol, buf, buf + C * Kp, at, pb);
    }
  }
#endif
  return prep_item_scalar<scalar_t>(xb, K, C, tol, buf, at, pb);
}

template <typename scalar_t>
void rowsums(const scalar_t* r, int64_t ld, const scalar_t* w, int64_t n_rows, int64_t M, bool vec,
             double* sums) {
#if FB_EPIG_X86
  if (vec) {
    rowsums_avx512<scalar_t>(r, ld, w, n_rows, M, sums);
    return;
  }
#endif
  rowsums_scalar<scalar_t>(r, ld, w, n_rows, M, sums);
}

// oneDNN's float32 matmul (torch.ops.mkldnn._linear_pointwise: a @ bt^T) through the dispatcher,
// as fastbald/mc.py uses it: 1.7-2x MKL's sgemm at these shapes on AMD CPUs. nullptr where torch
// was built without it.
const c10::OperatorHandle* onednn_linear() {
  static const c10::OperatorHandle* h = []() -> const c10::OperatorHandle* {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return op ? new c10::OperatorHandle(*op) : nullptr;
  }();
  return h;
}

at::Tensor linear_onednn(const c10::OperatorHandle& h, const at::Tensor& a, const at::Tensor& bt) {
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(a);
  stack.emplace_back(bt);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  h.callBoxed(&stack);
  return stack[0].toTensor();
}

std::tuple<at::Tensor, at::Tensor> epig_block_cpu(const at::Tensor& x_, const at::Tensor& bt_,
                                                  const at::Tensor& w_, int64_t items, int64_t cols,
                                                  double tol, int64_t gemm) {
  TORCH_CHECK_VALUE(x_.dim() == 3 && bt_.dim() == 2 && w_.dim() == 1,
                    "fastbald::epig_block: need x [B, K, C], bt [M, K], w [M]; got shapes ", x_.sizes(),
                    ", ", bt_.sizes(), ", ", w_.sizes());
  const int64_t B = x_.size(0), K = x_.size(1), C = x_.size(2), M = bt_.size(0);
  TORCH_CHECK_VALUE(bt_.size(1) == K && w_.size(0) == M && K >= 1 && C >= 1 && M >= 1,
                    "fastbald::epig_block: need K, C, M >= 1, bt [M, K=", K, "] and w [M]; got ",
                    bt_.sizes(), " and ", w_.sizes());
  const auto st = x_.scalar_type();
  TORCH_CHECK_TYPE((st == at::kFloat || st == at::kDouble) && bt_.scalar_type() == st && w_.scalar_type() == st,
                   "fastbald::epig_block: x, bt and w must all be float32 or all float64, got ",
                   x_.scalar_type(), ", ", bt_.scalar_type(), ", ", w_.scalar_type());
  TORCH_CHECK_VALUE(items >= 1 && cols >= 1, "fastbald::epig_block: items and cols must be >= 1, got ",
                    items, ", ", cols);
  TORCH_CHECK(x_.device().is_cpu() && bt_.device().is_cpu() && w_.device().is_cpu(),
              "fastbald::epig_block: CPU tensors only");
  const at::Tensor x = x_.contiguous(), bt = bt_.contiguous(), w = w_.contiguous();
  const at::Tensor b_km = bt.t();  // [K, M] view for at::mm
  cols = std::min(cols, M);
  at::Tensor out = at::empty({B}, x.options());
  std::atomic<int64_t> first_bad{B};
  const bool vec = Kernels::kind() == simd::kAvx512;
  const c10::OperatorHandle* dnn = (gemm == 1 && st == at::kFloat) ? onednn_linear() : nullptr;
  const int64_t n_tasks = (B + items - 1) / items;
  // At least two tasks, so that a pool of one task also runs inside an (active) parallel region
  // when there are several threads: at::parallel_for runs a single task inline, outside any, and
  // MKL / oneDNN then thread that task's product themselves, whose float64 sums then differ in
  // the last ulp between 1 and 2 threads. Inside the region they run sequentially, as for every
  // task of a larger pool, so each item's result does not depend on the thread count. The extra
  // task is empty (one idle thread for a pool of at most `items` items).
  const int64_t range = std::max<int64_t>(n_tasks, 2);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, range, 1, [&](int64_t t0, int64_t t1) {
      t1 = std::min(t1, n_tasks);
      if (t0 >= t1) return;  // the empty task
      const int64_t Kp = (K + 15) / 16 * 16;
      std::vector<scalar_t> buf(static_cast<size_t>(std::max(C * Kp + Kp, K * C)));
      std::vector<double> sums(static_cast<size_t>(items * C));
      at::Tensor a_t = at::empty({items * C, K}, x.options());
      at::Tensor p = at::empty({items, C}, x.options());
      at::Tensor r = dnn ? at::Tensor() : at::empty({items * C, cols}, x.options());
      scalar_t* pa = a_t.mutable_data_ptr<scalar_t>();
      scalar_t* pp = p.mutable_data_ptr<scalar_t>();
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b0 = task * items, n = std::min(items, B - b0);
        if (b0 >= first_bad.load(std::memory_order_relaxed)) return;
        for (int64_t i = 0; i < n; ++i) {
          if (!prep_item<scalar_t>(px + (b0 + i) * K * C, K, C, tol, vec, buf.data(), pa + i * C * K, pp + i * C)) {
            int64_t cur = first_bad.load();
            while (b0 + i < cur && !first_bad.compare_exchange_weak(cur, b0 + i)) {
            }
            return;
          }
        }
        const at::Tensor a_blk = a_t.narrow(0, 0, n * C);
        std::fill(sums.begin(), sums.begin() + n * C, 0.0);
        for (int64_t j0 = 0; j0 < M; j0 += cols) {
          const int64_t cb = std::min(cols, M - j0);
          at::Tensor rb;
          if (dnn) {
            rb = linear_onednn(*dnn, a_blk, bt.narrow(0, j0, cb));
          } else {
            rb = r.narrow(0, 0, n * C).narrow(1, 0, cb);
            at::mm_out(rb, a_blk, b_km.narrow(1, j0, cb));
          }
          rowsums<scalar_t>(rb.const_data_ptr<scalar_t>(), rb.stride(0), pw + j0, n * C, cb, vec, sums.data());
        }
        for (int64_t i = 0; i < n; ++i) {
          double acc = 0.0;
          for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(pp[i * C + c]) * sums[i * C + c];
          po[b0 + i] = static_cast<scalar_t>(acc);
        }
      }
    });
  };
  if (st == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
  const int64_t bad = first_bad.load();
  at::Tensor bad_t = at::full({1}, bad < B ? bad : -1, x.options().dtype(at::kLong));
  return {out, bad_t};
}

}  // namespace
}  // namespace epig
}  // namespace fastbald

TORCH_LIBRARY_FRAGMENT(fastbald, m) {
  // EPIG sums of a block of pool items (fastbald/epig.py). x: [B, K, C] log-probs / logits; bt:
  // [M, K] target probabilities / (K q), rows (t, c'); w: [M] = q_t(c') / N_t (all float32 or all
  // float64, CPU). items: pool items per task; cols: target columns per product; tol: each
  // sample's logsumexp must be 0 within tol (inf: no check, logits); gemm: 1 = oneDNN (float32),
  // 0 = at::mm. Returns (out [B] = sum_c p_c sum_j w_j f(R_cj), R = P / (p q),
  // f(r) = r log r - r + 1; bad [1] int64: the first item with a NaN / +inf entry, a sample with
  // every class at -inf or a logsumexp off by more than tol, else -1; out is undefined from there).
  m.def("epig_block(Tensor x, Tensor bt, Tensor w, int items, int cols, float tol, int gemm) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastbald, CPU, m) {
  m.impl("epig_block", &fastbald::epig::epig_block_cpu);
}

extern "C" {
using FbEpigKernels = fastbald::epig::Kernels;
static PyMethodDef fb_epig_methods[] = {
    {"vectorized", FbEpigKernels::py_vectorized, METH_NOARGS,
     "True when fastbald::epig_block runs its AVX-512 code on this CPU."},
    {"_force_kernel", FbEpigKernels::py_force_kernel, METH_O,
     "Force the code path: -1 automatic (FASTBALD_CPU_KERNEL=base|avx2: scalar, else the widest), 0 scalar, "
     "1 AVX-512 where available (tests)."},
    {nullptr, nullptr, 0, nullptr}};
PyMODINIT_FUNC PyInit__epig_cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_epig_cpu", nullptr, -1,
                                          fb_epig_methods};
  return PyModule_Create(&module_def);
}
}
