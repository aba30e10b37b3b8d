// Per-row math of BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019), shared by the CPU kernel
// and written so a CUDA kernel can include it (FB_HD: __host__ __device__ under nvcc).
//
// Notation. Pool item x has K MC samples (models) p_k(c | x), c < C. The chosen points S have a
// table of configurations r (one assignment of classes to every chosen point) with
//   P[r, k] = prod_{i in S} p_k(y_i^r | x_i)          (likelihood of the configuration under model k)
//   q_r     = (1/K) sum_k P[r, k]                       (its probability under the K-mixture)
//   w[r, k] = P[r, k] / sum_k' P[r, k']                 (posterior over the models, a row summing to 1)
// The joint entropy of S plus a candidate x splits into a part that does not depend on x and a
// weighted sum of mixture-row entropies (pbar[r, c] = (1/K) sum_k P[r, k] p_k(c|x) = q_r m_r(c)):
//   exact   : H(Y_S, y_x) = -sum_r q_r log q_r + sum_r q_r H(m_r),   m_r(c) = sum_k w[r,k] p_k(c|x)
//   sampled : H(Y_S, y_x) ~ (1/M) sum_r [ -log q_r + H(m_r) ]        (r ~ the K-mixture, M draws)
// which equals batchbald_redux's -sum pbar log pbar (exact) and its importance-weighted
// sum -pbar/q log pbar / M (sampled) term by term, since sum_c m_r(c) = 1. The rows stay normalised,
// so nothing underflows however many points are chosen. 0 log 0 = 0 throughout.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fastbald {
namespace batchbald {

// x log x with 0 log 0 = 0 (and x <= 0 -> 0: masked classes).
template <class T>
FB_HD T xlogx(T x) {
  return x > T(0) ? x * static_cast<T>(::log(static_cast<double>(x))) : T(0);
}

// x log x in T (float or double) with 0 below the smallest normal T (0 log 0 = 0; there x log x is
// below 1e-36): the per-row term of a candidate's evaluation, as the CPU's vectorised vxlogx<T>.
FB_HD float xlogx_normal(float x) { return x >= 1.17549435e-38f ? x * ::logf(x) : 0.0f; }
FB_HD double xlogx_normal(double x) { return x >= 2.2250738585072014e-308 ? x * ::log(x) : 0.0; }

// Entropy of the mixture row m(c) = sum_k w[k] p_k(c), with p_k(c) = p[k * sK + c * sC].
// The scalar reference of what the CPU kernel computes vectorised (across candidates).
template <class T, class P>
FB_HD double mixture_entropy(const T* w, const P* p, int64_t K, int64_t C, int64_t sK, int64_t sC) {
  double h = 0;
  for (int64_t c = 0; c < C; ++c) {
    double m = 0;
    for (int64_t k = 0; k < K; ++k) m += static_cast<double>(w[k]) * static_cast<double>(p[k * sK + c * sC]);
    h -= xlogx(m);
  }
  return h;
}

// Exact-table extension by one chosen point: row w (length K, sums to 1) and class c of the new
// point give the row w' (w'[k] proportional to w[k] p_k(c)) and the factor s with q' = q * s.
// Returns s; when s == 0 (a class no model predicts) w' is left uniform (its q' is 0: never used).
template <class P>
FB_HD double extend_row(const double* w, const P* p_c, int64_t sK, int64_t K, double* w_out) {
  double s = 0;
  for (int64_t k = 0; k < K; ++k) {
    w_out[k] = w[k] * static_cast<double>(p_c[k * sK]);
    s += w_out[k];
  }
  if (s > 0) {
    // Divide (not multiply by 1/s): a subnormal s (a class at log-prob ~[-745, -709] in every
    // sample) has 1/s = inf, which would turn the row, and every later gain, into inf/NaN.
    for (int64_t k = 0; k < K; ++k) w_out[k] /= s;
  } else {
    for (int64_t k = 0; k < K; ++k) w_out[k] = 1.0 / static_cast<double>(K);
  }
  return s;
}

// Sampled-table extension of one configuration row by class c of a new point with probabilities
// p[k * C + c'] (row-major [K, C]): w[k] <- w[k] p_k(c) / s in place, returns log s, where
// s = sum_k w[k] p_k(c) > 0 (c was drawn from p_{k_r} with w[k_r] > 0) is the factor of q_r.
FB_HD double append_row(double* w, const double* p, int64_t K, int64_t C, int64_t c) {
  double s = 0;
  for (int64_t k = 0; k < K; ++k) s += w[k] * p[k * C + c];
  const double inv = 1.0 / s;
  for (int64_t k = 0; k < K; ++k) w[k] *= p[k * C + c] * inv;
  return ::log(s);
}

// Counter-based uniform in [0, 1): splitmix64 of (seed, step, row). The sampled configurations
// depend only on the seed, the chosen point's position in the batch and the row: not on threads.
FB_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

FB_HD double uniform01(uint64_t seed, uint64_t step, uint64_t row) {
  const uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ row);
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

// Inverse-CDF draw of a class from p(c) = p[c * sC] (need not sum exactly to 1): the first c whose
// cumulative sum exceeds u * total; never a class with p = 0.
template <class P>
FB_HD int64_t sample_class(const P* p, int64_t C, int64_t sC, double u) {
  double total = 0;
  for (int64_t c = 0; c < C; ++c) total += static_cast<double>(p[c * sC]);
  const double target = u * total;
  double acc = 0;
  int64_t last = -1;
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(p[c * sC]);
    if (v > 0) {
      last = c;
      acc += v;
      if (acc > target) return c;
    }
  }
  return last;  // rounding: the last class with p > 0
}

}  // namespace batchbald
}  // namespace fastbald
