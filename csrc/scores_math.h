// Inline per-row and per-item math of the pool scores, shared by the CPU and the CUDA kernels.
//
// Everything here is templated on a value type V: a scalar (float, double: the CUDA kernels and
// the scalar CPU tail) or a SIMD vector (at::vec::Vectorized<float|double>: the CPU kernel, whose
// lanes hold several MC samples (rows) of one pool item). The operations V needs are gathered in
// Ops<V>; this header specialises it for float and double, csrc/cpu adds the SIMD one. So the CPU
// tests run exactly the arithmetic, in the same order, that a CUDA thread runs on one row.
//
// Definitions (nats; 0 log 0 = 0; a -inf logit is a masked class):
//   row t of an item: z_t[c], c < C.  m_t = max_c z_t[c],  d_tc = z_tc - m_t,  e_tc = exp(d_tc),
//   s_t = sum_c e_tc,  log p_tc = d_tc - log s_t,  p_tc = e_tc / s_t,
//   H_t = log s_t - (sum_c e_tc d_tc) / s_t                (entropy of sample t, no cancellation:
//                                                            both terms are O(log C))
//   pbar_c = (1/T) sum_t p_tc
//   entropy          = -sum_c pbar_c log pbar_c
//   expected_entropy = (1/T) sum_t H_t
//   bald             = (1/T) sum_t sum_c p_tc (log p_tc - log pbar_c)   (mean-KL form), clamped >= 0
//   variation_ratio  = 1 - (count of the modal argmax_c z_tc over t) / T   (argmax ties: lowest c)
//   mean_std         = (1/C) sum_c sqrt((1/T) sum_t (p_tc - pbar_c)^2)     (two-pass variance)
//   margin           = pbar_(1) - pbar_(2);   least_confidence = 1 - pbar_(1)
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fastbald {
namespace math {

// Metric order of the op's [7, N] output and bits of its `metrics` mask.
enum Metric : int {
  kEntropy = 0,
  kExpectedEntropy = 1,
  kBald = 2,
  kVariationRatio = 3,
  kMeanStd = 4,
  kMargin = 5,
  kLeastConfidence = 6,
  kNumMetrics = 7,
};

enum InputKind : int { kLogits = 0, kLogProbs = 1, kProbs = 2 };

// What a metrics mask needs computed.
struct Needs {
  bool exps;      // softmax of every row
  bool pbar;      // the mean prediction
  bool entropy_t; // per-row entropies
  bool second;    // the second pass over the stored probabilities (bald, mean_std)
  FB_HD explicit Needs(int metrics, int input_kind) {
    const bool need_pbar = (metrics & ((1 << kEntropy) | (1 << kBald) | (1 << kMeanStd) |
                                       (1 << kMargin) | (1 << kLeastConfidence))) != 0;
    pbar = need_pbar;
    entropy_t = (metrics & (1 << kExpectedEntropy)) != 0;
    second = (metrics & ((1 << kBald) | (1 << kMeanStd))) != 0;
    exps = need_pbar || entropy_t || input_kind == kProbs;
  }
};

// ---------------------------------------------------------------------------------------------
// Value-type operations.
template <class V>
struct Ops;

template <>
struct Ops<float> {
  using M = bool;
  static FB_HD float exp(float x) { return ::expf(x); }
  static FB_HD float log(float x) { return ::logf(x); }
  // IEEE 754-2019 maximum: propagates NaN from either side.
  static FB_HD float max(float a, float b) { return (a > b || a != a) ? a : b; }
  // max(x, lo) for a never-NaN lo that keeps a NaN x (NaN inputs then reach the sums).
  static FB_HD float clamp_low(float x, float lo) { return max(x, lo); }
  static FB_HD M gt(float a, float b) { return a > b; }
  static FB_HD M eq(float a, float b) { return a == b; }
  static FB_HD M mask_andnot(M a, M b) { return a && !b; }
  static FB_HD M mask_or(M a, M b) { return a || b; }
  static FB_HD float select(M m, float a, float b) { return m ? a : b; }
  static FB_HD float splat(double v) { return static_cast<float>(v); }
};

template <>
struct Ops<double> {
  using M = bool;
  static FB_HD double exp(double x) { return ::exp(x); }
  static FB_HD double log(double x) { return ::log(x); }
  static FB_HD double max(double a, double b) { return (a > b || a != a) ? a : b; }
  // max(x, lo) for a never-NaN lo that keeps a NaN x (NaN inputs then reach the sums).
  static FB_HD double clamp_low(double x, double lo) { return max(x, lo); }
  static FB_HD M gt(double a, double b) { return a > b; }
  static FB_HD M eq(double a, double b) { return a == b; }
  static FB_HD M mask_andnot(M a, M b) { return a && !b; }
  static FB_HD M mask_or(M a, M b) { return a || b; }
  static FB_HD double select(M m, double a, double b) { return m ? a : b; }
  static FB_HD double splat(double v) { return v; }
};

// ---------------------------------------------------------------------------------------------
// Per-row math. `z(c)` loads class c of the row (already converted to the accumulation type;
// for input="probs" it returns log p).

// Pass 1, max only (NaN-propagating).
template <class V, class Load>
FB_HD V row_max(const Load& z, int64_t C) {
  using O = Ops<V>;
  V m = z(0);
  for (int64_t c = 1; c < C; ++c) m = O::max(m, z(c));
  return m;
}

// Variation-ratio vote of class c, given its shifted logit d = z - m: 1 for the first class
// (lowest c) with d == 0, i.e. the argmax with ties to the lowest index. `taken` starts false.
template <class V>
FB_HD V first_argmax_vote(const V& d, typename Ops<V>::M& taken) {
  using O = Ops<V>;
  const typename Ops<V>::M hit = O::mask_andnot(O::eq(d, O::splat(0.0)), taken);
  taken = O::mask_or(taken, hit);
  return O::select(hit, O::splat(1.0), O::splat(0.0));
}

// Pass 1: row max (NaN-propagating: a NaN anywhere makes m NaN) and argmax (ties: lowest c).
template <class V, class Load>
FB_HD void row_max_argmax(const Load& z, int64_t C, V& m, V& arg) {
  using O = Ops<V>;
  m = z(0);
  arg = O::splat(0.0);
  for (int64_t c = 1; c < C; ++c) {
    const V v = z(c);
    arg = O::select(O::gt(v, m), O::splat(static_cast<double>(c)), arg);
    m = O::max(m, v);
  }
}

// Scalar row_max_argmax with an integer index (the CUDA kernels: a thread, or a lane of a group, per
// row): the same NaN-propagating max and the same argmax (ties: lowest c; frozen once m is NaN),
// without the float-typed index the SIMD form needs.
template <class A, class I, class Load>
FB_HD void row_max_argmax_index(const Load& z, I C, A& m, I& arg) {
  m = z(0);
  arg = 0;
  for (I c = 1; c < C; ++c) {
    const A v = z(c);
    arg = v > m ? c : arg;
    m = Ops<A>::max(m, v);
  }
}

// Masked classes (-inf logits) without branches: the shifted logit d = z - m is clamped at
// exp_floor (-87 in float, -708 in double), the smallest argument whose exp is still a normal
// number. A masked class (or one more than 87 nats below the row's best) then gets
// p <= exp(-87) / s < 1.7e-38 instead of exactly 0: every output changes by less than 1e-35, and
// no 0 * (-inf) = NaN can arise. The exp itself never sees an argument outside [exp_floor, 0],
// so the CPU uses a short polynomial exp with no range checks.
// log pbar is floored at log_floor, so p * (log p - log pbar) stays finite.
template <class A>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float exp_floor = -87.0f;
  static constexpr float log_floor = -200.0f;
};
template <>
struct Limits<double> {
  static constexpr double exp_floor = -708.0;
  static constexpr double log_floor = -1600.0;
};

template <class V, class A>
FB_HD V shifted(const V& z, const V& m) {
  using O = Ops<V>;
  return O::clamp_low(z - m, O::splat(Limits<A>::exp_floor));
}

// Pass 2: shifted logits d, their exps e (sink(c, d, e) may store them), the row sum s and
// a = sum_c e d. Each logit is exponentiated exactly once. The sums are blocked by kSumBlock
// classes, so their rounding error grows like kSumBlock + C / kSumBlock rather than C.
constexpr int64_t kSumBlock = 64;

template <class V, class A, class Load, class Sink>
FB_HD void row_exp_sum(const Load& z, int64_t C, const V& m, V& s, V& a, Sink&& sink) {
  using O = Ops<V>;
  s = O::splat(0.0);
  a = O::splat(0.0);
  for (int64_t c0 = 0; c0 < C; c0 += kSumBlock) {
    const int64_t c1 = C < c0 + kSumBlock ? C : c0 + kSumBlock;
    V sb = O::splat(0.0);
    V ab = O::splat(0.0);
    for (int64_t c = c0; c < c1; ++c) {
      const V d = shifted<V, A>(z(c), m);
      const V e = O::exp(d);
      sb = sb + e;
      ab = ab + e * d;
      sink(c, d, e);
    }
    s = s + sb;
    a = a + ab;
  }
}

// Entropy of a row from its softmax sums, clamped at 0 (rounding can give -1 ulp).
template <class V>
FB_HD V row_entropy(const V& log_s, const V& a, const V& inv_s) {
  using O = Ops<V>;
  return O::max(log_s - a * inv_s, O::splat(0.0));
}

// One term of the mean-KL, p (log p - log pbar); logp from shifted() (finite), logpbar from
// log_pbar() (finite).
template <class V>
FB_HD V kl_term(const V& p, const V& logp, const V& logpbar) {
  return p * (logp - logpbar);
}

template <class A>
FB_HD A log_pbar(A pbar) {
  return pbar > A(0) ? Ops<A>::log(pbar) : Limits<A>::log_floor;
}

// ---------------------------------------------------------------------------------------------
// Per-item finalisation (scalar, accumulation type A).

// -pbar log pbar with 0 log 0 = 0.
template <class A>
FB_HD A neg_plogp(A pbar, A logpbar) {
  return pbar > A(0) ? -pbar * logpbar : A(0);
}

// Running top-2 of the mean prediction (all values >= 0, so 0 is a safe start).
template <class A>
FB_HD void top2_update(A v, A& top1, A& top2) {
  if (v > top1) {
    top2 = top1;
    top1 = v;
  } else if (v > top2) {
    top2 = v;
  }
}

template <class A>
FB_HD A clamp0(A v) {
  return v > A(0) ? v : A(0);
}

template <class A>
FB_HD A variation_ratio(int64_t modal_count, int64_t T) {
  return A(1) - static_cast<A>(modal_count) / static_cast<A>(T);
}

// The same with 1 / T precomputed (the CUDA kernels avoid a double division per item: within 1 ulp
// of variation_ratio in double, identical after rounding to float).
template <class A>
FB_HD A variation_ratio_inv(int64_t modal_count, A inv_T) {
  return A(1) - static_cast<A>(modal_count) * inv_T;
}

// ---------------------------------------------------------------------------------------------
// Base-2 form of the per-row math for rows held in registers with a compile-time class count C
// (the CUDA item kernel, csrc/cuda/item_kernel.h; any scalar caller can use it). Same definitions
// as above, with the exponentials and logarithms taken in base 2: a shifted logit d (nats, clamped
// at exp_floor) becomes d2 = d * log2(e) and e = 2^d2, so the exp is one ex2 on the device; the
// log-probabilities are kept as lp2 = d2 - log2 s (bits) and the KL sum is converted to nats once
// per item. The subtraction z - m is done before scaling (as shifted()), so large logits lose no
// accuracy. Accuracy (float, the CUDA approximations ex2/lg2/rcp/sqrt.approx.ftz): within 1e-5
// nats of float64 on the emulator's case table.
template <class A>
struct Base2;
template <>
struct Base2<float> {
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2 = 0.693147180559945309f;
  // log_floor in bits: log2 pbar is floored here (a class masked in every sample has pbar = 0).
  static constexpr float log2_floor = Limits<float>::log_floor * 1.44269504088896341f;
  // exp_floor in bits (2^-125.5 is still a normal float).
  static constexpr float exp2_floor = Limits<float>::exp_floor * 1.44269504088896341f;
};

// One-instruction primitives on the device (MUFU ex2 / lg2 / rcp / sqrt, flush-to-zero, ~2 ulp;
// max.NaN), the libm equivalents on the host, with the device's flush of subnormal results and
// arguments to zero.
FB_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = std::exp2(x);
  return y < 1.17549435e-38f ? 0.0f : y;  // ftz
#endif
}
FB_HD float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::log2(x < 1.17549435e-38f && x > 0.0f ? 0.0f : x);  // ftz
#endif
}
FB_HD float fast_rcp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}
FB_HD float fast_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::sqrt(x);
#endif
}
// max(a, b), NaN if either is NaN (one instruction on sm_80+; Ops<float>::max keeps a NaN of either
// side too, but costs a compare and a select).
FB_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || b != b) ? a + b : (a > b ? a : b);
#endif
}

// Pass 1a: the row max (NaN-propagating) and, with kArg, the argmax (ties: lowest c; frozen once
// the max is NaN), as row_max_argmax_index.
template <int C, bool kArg>
FB_HD float row_max_arg_n(const float (&z)[C], int& arg) {
  float m = z[0];
  arg = 0;
  for (int c = 1; c < C; ++c) {
    if constexpr (kArg) arg = z[c] > m ? c : arg;
    m = max_nan(m, z[c]);
  }
  return m;
}

// Pass 1b: z[c] is replaced by d2_c = max(z_c log2(e) - m2, exp_floor log2(e)) with m2 = m log2(e)
// (shifted(), in bits: one FFMA and one fmax per logit), e[c] = 2^d2_c; s = sum_c e_c and, with
// kA, a2 = sum_c e_c d2_c (the row entropy in bits is log2 s - a2 / s). z_c log2(e) is exact inside
// the FFMA; the rounding of m2 shifts every d2_c of the row by the same delta (|delta| <= |m| 2^-24
// log2(e)), which cancels in p = e / s, in log2 p = d2 - log2 s and in the entropy, so large logits
// lose no accuracy. The clamp is fmax, which drops a NaN: a row whose max is not finite must be
// handled by the caller (row_nonfinite).
template <int C, bool kA>
FB_HD void row_exp2_n(float (&z)[C], float m, float (&e)[C], float& s, float& a2) {
  const float m2 = m * Base2<float>::log2e;
  s = 0.0f;
  a2 = 0.0f;
  for (int c = 0; c < C; ++c) {
    const float d2 = std::fmax(std::fma(z[c], Base2<float>::log2e, -m2), Base2<float>::exp2_floor);
    e[c] = fast_exp2(d2);
    s += e[c];
    if constexpr (kA) a2 += e[c] * d2;
    z[c] = d2;
  }
}

// A row max that is NaN, +inf or -inf (all classes masked): the row is invalid (the finite check's
// condition); its sums are made NaN so that, with check_finite=False, its item's outputs are NaN
// as on the CPU.
FB_HD bool row_nonfinite(float m) { return !(std::fabs(m) < INFINITY); }

// Entropy of a row in nats from its base-2 sums (row_entropy's clamp at 0).
FB_HD float row_entropy2(float log2_s, float a2, float inv_s) {
  const float h = (log2_s - a2 * inv_s) * Base2<float>::ln2;
  return h > 0.0f ? h : 0.0f;
}

// log2 pbar floored at log2_floor (log_pbar in bits; pbar = 0 or a flushed subnormal give the
// floor).
FB_HD float log2_pbar(float pbar) { return std::fmax(fast_log2(pbar), Base2<float>::log2_floor); }

// -pbar log pbar in nats from log2 pbar, 0 log 0 = 0 (neg_plogp).
FB_HD float neg_plogp2(float pbar, float lpb2) { return pbar > 0.0f ? -pbar * lpb2 * Base2<float>::ln2 : 0.0f; }

// Branch-free top2_update for values >= 0 (the same multiset semantics).
FB_HD void top2_update_nb(float v, float& top1, float& top2) {
  top2 = std::fmax(top2, std::fmin(top1, v));
  top1 = std::fmax(top1, v);
}

}  // namespace math
}  // namespace fastbald
