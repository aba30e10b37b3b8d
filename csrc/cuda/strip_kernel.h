// Strip kernel of fastbald::pool_scores: mid and large C (a multiple of 4, up to 40 * 256 =
// 10,240), contiguous NTC input (float, half, bfloat16; logits or log_probs). Design and
// instruction counts: NOTES.md section 2.5.
//
// One pass over the input, no tile on chip. A group of G lanes scores one pool item at a time
// (G <= 32: several groups per block, independent, no barrier; kMode 2: G = the block, for
// C > 1024), streaming its T rows through registers: lane l of the group owns the NV 4-class
// vectors l, l + G, ... of every row (NV compile time, so a row and the lane's per-class
// accumulators live in registers), loaded with one 16-byte (float) / 8-byte (half, bf16) load per
// vector while the previous row is computed (the next row is prefetched into registers: the
// loads of row t + 1 are in flight during row t's arithmetic). Per row:
//   1. the row max (NaN-propagating) and argmax (ties: lowest class; a NaN row votes as the CPU
//      op), a group reduction (xor shuffles; kBlock: then across warps in shared memory);
//   2. d2 = max(z log2 e - m log2 e, exp_floor log2 e) (one FFMA, one FMNMX), e = 2^d2 (ex2), the
//      group sum s = sum e (the lane's part s_l kept): log2 s, 1/s;
//   3. the online per-class accumulators, with p = e / s and lp2 = d2 - log2 s:
//        S_c = sum_t p,  V_c = sum_t (p - p0_c)^2,
//      and the lane's mean-KL terms, summed over its classes in the exponent's units:
//        U += sum_c p (lp2 - K_c) = (1/s) (sum_c e (d2 - Kd_c) - (log2 s - ls0) s_l),
//      where p0_c is p of the item's first sample, ls0 its log2 s and Kd_c = max(d2, ls0 - 8) its
//      d2, i.e. K_c = Kd_c - ls0 = its lp2 floored at -8 bits (per-class shifts kept in shared
//      memory, lane-private; the floor: kShiftFloor). With pbar_c = S_c / T, over the group:
//        mean-KL (bits) = U - sum_c S_c (log2 pbar_c - K_c)   = sum_t sum_c p (lp2 - log2 pbar_c)
//        T var_c        = V_c - T (pbar_c - p0_c)^2           = sum_t (p - pbar_c)^2
//        sum_t sum_c p lp2 = U + sum_c K_c S_c                (the expected entropy, negated)
//      exactly; in floating point the shifted sums cancel only in proportion to the spread of
//      the samples around the first one (identical samples: U = 0 exactly where lp2 >= -8), the
//      floor keeps a first sample that disagrees by ~100 bits from scaling the mean-KL error by
//      |lp2|, and by Samuelson's inequality (pbar - p0)^2 <= (T - 1) var, so the variance keeps a
//      relative error of at most ~T ulp. One ex2 per logit; no per-class U, no per-row entropy.
//      S_c and U are two-level sums (flush_sums: partials of kFlush = 64 rows added into outer
//      sums), so their rounding does not grow like T (identical samples stay within 1e-6 of BALD
//      at T = 2000).
// Votes: the lane owning the row's argmax class adds 1 to its counter in shared memory
// (lane-private, reset per item). Per item, in float: the 7 outputs from the accumulators, one
// group reduction, written by lane 0 of the group.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../scores_math.h"
#include "device_compat.h"
#include "kernels.h"  // mark_bad_warp
#include "plan.h"

namespace fastbald {
namespace cuda {

// StripIsBf16 (which 2-byte storage types are bfloat16): plan.h.

namespace strip {

// Raw bits of 4 consecutive elements: 4 words (float) or 2 words (half, bf16).
template <int W>
struct Raw {
  uint32_t w[W];
};

FB_DEV float as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
FB_DEV uint32_t as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

template <class S>
FB_DEV void load4(const S* p, Raw<sizeof(S)>& r) {
  if constexpr (sizeof(S) == 4) {
    dev::load16(p, r.w);
  } else {
    dev::load8(p, r.w);
  }
}

// -inf in every element (the vectors of a lane past the end of the row).
template <class S>
FB_DEV void set_neg_inf(Raw<sizeof(S)>& r) {
  if constexpr (sizeof(S) == 4) {
    FB_UNROLL
    for (int i = 0; i < 4; ++i) r.w[i] = 0xff800000u;
  } else if constexpr (StripIsBf16<S>::value) {
    r.w[0] = r.w[1] = 0xff80ff80u;
  } else {
    r.w[0] = r.w[1] = 0xfc00fc00u;  // half
  }
}

template <class S>
FB_DEV void to_float4(const Raw<sizeof(S)>& r, float* z) {
  if constexpr (sizeof(S) == 4) {
    FB_UNROLL
    for (int i = 0; i < 4; ++i) z[i] = as_float(r.w[i]);
  } else if constexpr (StripIsBf16<S>::value) {
    FB_UNROLL
    for (int i = 0; i < 2; ++i) {
      z[2 * i] = as_float(r.w[i] << 16);
      z[2 * i + 1] = as_float(r.w[i] & 0xffff0000u);
    }
  } else {
    S h[4];
    std::memcpy(h, r.w, 8);
    FB_UNROLL
    for (int i = 0; i < 4; ++i) z[i] = static_cast<float>(h[i]);
  }
}

// Keeps values in registers as computed (no rematerialisation of the conversion from the raw
// loads in later uses; the host build does nothing).
template <int K>
FB_DEV void pin(float (&z)[K]) {
#if defined(__CUDA_ARCH__)
  FB_UNROLL
  for (int j = 0; j < K; ++j) asm volatile("" : "+f"(z[j]));
#else
  (void)z;
#endif
}

FB_DEV void pin_int(int& v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#else
  (void)v;
#endif
}

template <class P>
FB_DEV void pin_ptr(const P*& p) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+l"(p));
#else
  (void)p;
#endif
}

FB_DEV void pin_fptr(float*& p) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+l"(p));
#else
  (void)p;
#endif
}

FB_DEV void ld_f4(const float* p, float* v) {
#if defined(__CUDA_ARCH__)
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) __builtin_trap();
  for (int i = 0; i < 4; ++i) v[i] = p[i];
#endif
}
FB_DEV void st_f4(float* p, const float* v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) __builtin_trap();
  for (int i = 0; i < 4; ++i) p[i] = v[i];
#endif
}

}  // namespace strip

template <class S, int NV, int kMode>
struct StripKernel {
  // kMode 0: G <= 16 lanes per item (several groups per warp); 1: a warp per item (G = 32, the
  // max / argmax by REDUX); 2: the whole block per item (G = B, 64 to 256).
  static constexpr bool kBlock = kMode == 2;
  static constexpr int K = 4 * NV;  // classes per lane
  // Thread stride of the lane-private shared arrays (compile time: immediate offsets).
  static constexpr int kStride = kStripStride;
  using R = strip::Raw<static_cast<int>(sizeof(S))>;

  // Reduction context: G lanes per group (kBlock: the whole block, shared-memory partials in two
  // alternating slots, so one barrier per reduction suffices).
  struct Red {
    int G, lane, warp, nw;
    uint32_t* buf;  // kBlock: [2][32 warps][8 words]
    int par;
  };

  // Folds NW 32-bit values over the group with merge(mine, other) (commutative: every lane of the
  // group ends with the same values). All lanes of the warp (kBlock: of the block) must call it.
  template <int NW, class Merge>
  FB_DEV static void fold(uint32_t (&v)[NW], Red& r, Merge&& merge) {
    const int Gw = r.G < 32 ? r.G : 32;
    for (int o = 1; o < Gw; o <<= 1) {
      uint32_t u[NW];
      FB_UNROLL
      for (int i = 0; i < NW; ++i) u[i] = dev::shfl_xor(v[i], o);
      merge(v, u);
    }
    if constexpr (kBlock) fold_warps(v, r, merge);
  }

  // kBlock: the warps' partials through shared memory: lane i reads warp i % nw's, then a
  // butterfly over aligned blocks of nw lanes (each holds every partial once; nw a power of 2).
  // Every thread of the block must call it.
  template <int NW, class Merge>
  FB_DEV static void fold_warps(uint32_t (&v)[NW], Red& r, Merge&& merge) {
    {
      uint32_t* b = r.buf + r.par * 256;
      r.par ^= 1;
      if (r.lane == 0) {
        FB_UNROLL
        for (int i = 0; i < NW; ++i) b[r.warp * 8 + i] = v[i];
      }
      dev::sync();
      const int w = r.lane & (r.nw - 1);
      FB_UNROLL
      for (int i = 0; i < NW; ++i) v[i] = b[w * 8 + i];
      static_assert(kStripStride / 32 <= 8, "at most 8 warps per block");
      FB_UNROLL
      for (int o = 1; o < 8; o <<= 1) {  // unrolled; a level past the block's warps is skipped
        if (o < r.nw) {
          uint32_t u[NW];
          FB_UNROLL
          for (int i = 0; i < NW; ++i) u[i] = dev::shfl_xor(v[i], o);
          merge(v, u);
        }
      }
    }
  }

  // (max, lowest class) over the warp with two REDUX: the max of an ordered integer image of the
  // floats (NaN above everything: a NaN max stays NaN), then the lowest class of the lanes whose
  // max equals it (none for a NaN max: the NaN vote redoes it). All 32 lanes must call it.
  FB_DEV static void warp_maxarg(uint32_t (&v)[2]) {
    const float m = strip::as_float(v[0]);
    const uint32_t u = v[0];
    const uint32_t key = m != m ? 0xffffffffu : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
    const uint32_t kmax = dev::warp_max_u32(key);
    const uint32_t um = (kmax & 0x80000000u) ? (kmax & 0x7fffffffu) : ~kmax;
    const float mm = strip::as_float(um);
    v[1] = dev::warp_min_u32(m == mm ? v[1] : 0xffffffffu);
    v[0] = um;
  }

  // Max over the warp with one REDUX (the ordered integer image of warp_maxarg; NaN above all).
  FB_DEV static uint32_t warp_max(uint32_t u) {
    const float m = strip::as_float(u);
    const uint32_t key = m != m ? 0xffffffffu : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
    const uint32_t kmax = dev::warp_max_u32(key);
    return (kmax & 0x80000000u) ? (kmax & 0x7fffffffu) : ~kmax;
  }

  // kMode 2: the lowest class of this lane's row values equal to the row max M (ml: the lane's own
  // max), reduced over the warp; 0xffffffff if none. Only a warp holding a maximal class enters
  // owner_argmax (usually one of the block's warps). Every lane must call it.
  FB_DEV static uint32_t row_argmax(const float (&z)[K], float ml, float M, int l, int lg) {
    const bool hit = ml == M;  // the lane's own max is the row's: it holds a maximal class
    uint32_t c = 0xffffffffu;
    if (dev::ballot(hit) != 0u) c = owner_argmax(z, M, l, lg);  // warp-uniform
    return c;
  }
  FB_DEV static uint32_t owner_argmax(const float (&z)[K], float M, int l, int lg) {
    uint32_t c = 0xffffffffu;
    FB_UNROLL
    for (int j = K - 1; j >= 0; --j) {
      if (z[j] == M) c = static_cast<uint32_t>(4 * (l + ((j >> 2) << lg)) + (j & 3));
    }
    return dev::warp_min_u32(c);
  }

  // (max, lowest class) merge; the max propagates NaN (the argmax of a NaN row is redone).
  FB_DEV static void merge_maxarg(uint32_t (&v)[2], const uint32_t (&u)[2]) {
    const float m = strip::as_float(v[0]), mo = strip::as_float(u[0]);
    const int a = static_cast<int>(v[1]), ao = static_cast<int>(u[1]);
    if (mo > m || (mo == m && ao < a)) v[1] = u[1];
    v[0] = strip::as_bits(math::max_nan(m, mo));
  }

  // The vote of a row of the warp (kBlock: block) with a NaN (rare; every lane of the warp / block
  // calls it): the group's first NaN class f, then the argmax of the classes before it (the
  // CPU's rule: the argmax is frozen at the first NaN; class 0 if that is class 0). Sets arg for
  // a group whose max m is NaN.
  FB_DEV static void nan_vote(const float (&z)[K], float m, int& arg, int l, int lg, int C, Red& red) {
    uint32_t f[1] = {static_cast<uint32_t>(C)};
    FB_UNROLL
    for (int j = K - 1; j >= 0; --j) {
      if (z[j] != z[j]) f[0] = static_cast<uint32_t>(4 * (l + ((j >> 2) << lg)) + (j & 3));
    }
    fold(f, red, [](uint32_t(&a)[1], const uint32_t(&b)[1]) { a[0] = b[0] < a[0] ? b[0] : a[0]; });
    float pm = -INFINITY;
    int pa = C;
    FB_UNROLL
    for (int j = 0; j < K; ++j) {
      const int c = 4 * (l + ((j >> 2) << lg)) + (j & 3);
      if (c < static_cast<int>(f[0]) && (pa == C || z[j] > pm)) {
        pm = z[j];
        pa = c;
      }
    }
    uint32_t w[2] = {strip::as_bits(pm), static_cast<uint32_t>(pa)};
    fold(w, red, merge_maxarg);
    if (m != m) arg = static_cast<int>(w[1]) < C ? static_cast<int>(w[1]) : 0;
  }

  // The row's vote, by the lane that owns the class (its lane-private counter).
  FB_DEV static void vote(int arg, int l, int lg, int G, int* cnt) {
    const int va = arg >> 2;
    if ((va & (G - 1)) == l) cnt[(((va >> lg) << 2) + (arg & 3)) * kStride] += 1;
  }

  // Floor of the mean-KL shift K (bits). Unclamped, a class that the first sample gives a tiny
  // probability (lp2 ~ -40 .. -125 when it confidently disagrees with the others) but the others
  // give p ~ 1 makes every term p (lp2 - K) ~ |K| p, and U cancels against S (log2 pbar - K) with an
  // error ~ |K| sqrt(T) ulp (4e-5 .. 1e-4 nats of BALD at T = 100). With the floor the terms stay
  // within ~8 p + p |lp2| (bounded: p |lp2| <= 0.53), identical samples still cancel exactly when
  // lp2 >= -8, and a class whose p is below 2^-8 contributes at most ~p |lp2| ulp.
  static constexpr float kShiftFloor = -8.0f;

  // The item's per-class shifts from its first sample, in the exponent's units: Kd = max(d2,
  // log2 s + kShiftFloor) (so that K = Kd - ls0 is its lp2 floored at kShiftFloor bits) and
  // p0 = e / s (lane-private), and ls0 = its log2 s. p0 needs no floor: by Samuelson's inequality
  // the variance's shifted sum keeps a relative error of at most ~T ulp whatever p0.
  FB_DEV static void set_refs(const float (&z)[K], const float (&e)[K], float ls2, float inv, float* refK,
                              float* refP) {
    FB_UNROLL
    for (int k = 0; k < NV; ++k) {
      float kd[4], p[4];
      FB_UNROLL
      for (int i = 0; i < 4; ++i) {
        kd[i] = std::fmax(z[4 * k + i], ls2 + kShiftFloor);
        p[i] = e[4 * k + i] * inv;
      }
      strip::st_f4(refK + k * kStride * 4, kd);
      strip::st_f4(refP + k * kStride * 4, p);
    }
  }

  // Rows per block of the two-level sums (flush_sums).
  static constexpr int kFlush = 64;

  // Two-level sums over the samples: every kFlush rows the row loop's partial sums S_c (per
  // class) and U (the lane's mean-KL sum) are added into outer sums (S: lane-private shared
  // memory refS, stored at the item's first flush, added later; U: the register Uo) and restart
  // from 0, so their rounding grows with kFlush + T / kFlush instead of T (identical samples at
  // T = 1000: a single float S_c of 1000 equal p put BALD 6.1e-6 off). first: the item's first
  // flush (refS holds an earlier item's sums or poison).
  FB_DEV static void flush_sums(float (&Sa)[K], float& Ut, float& Uo, float* refS, bool first) {
    FB_UNROLL
    for (int k = 0; k < NV; ++k) {
      float o[4];
      if (first) {
        FB_UNROLL
        for (int i = 0; i < 4; ++i) o[i] = Sa[4 * k + i];
      } else {
        strip::ld_f4(refS + k * kStride * 4, o);
        FB_UNROLL
        for (int i = 0; i < 4; ++i) o[i] += Sa[4 * k + i];
      }
      strip::st_f4(refS + k * kStride * 4, o);
      FB_UNROLL
      for (int i = 0; i < 4; ++i) Sa[4 * k + i] = 0.0f;
    }
    Uo += Ut;
    Ut = 0.0f;
  }

  // The item's S_c: the outer sums plus the last block's partials (T > kFlush only).
  FB_DEV static void unflush_sums(float (&Sa)[K], const float* refS) {
    FB_UNROLL
    for (int k = 0; k < NV; ++k) {
      float o[4];
      strip::ld_f4(refS + k * kStride * 4, o);
      FB_UNROLL
      for (int i = 0; i < 4; ++i) Sa[4 * k + i] += o[i];
    }
  }

  // The lane's vectors of a row: rowl = the row + 4 l, vector k at rowl + k * 4G; the first nvl
  // of the lane's NV vectors lie in the row (the others keep their -inf).
  FB_DEV static void load_row(const S* rowl, R (&pf)[NV], const int (&off)[NV], int nvl) {
    strip::pin_ptr(rowl);
    FB_UNROLL
    for (int k = 0; k < NV; ++k) {
      if (k < nvl) strip::load4<S>(rowl + off[k], pf[k]);
    }
  }

  FB_DEV static void run(const Params& P, unsigned char* smem) {
    using namespace math;
    const int tid = dev::tid(), B = dev::bdim();
    const int lg = P.it_glog2;
    const int G = 1 << lg;  // kBlock: G == B
    int l = tid & (G - 1);
    strip::pin_int(l);  // kept in a register (not recomputed from the block index in the row loop)
    const int g = tid >> lg;
    const int ngb = B >> lg;  // groups per block
    Red red{G, tid & 31, tid >> 5, B >> 5, reinterpret_cast<uint32_t*>(smem + P.st_off_red), 0};
    const int T = static_cast<int>(P.T), C = static_cast<int>(P.C), nvec = C >> 2;
    const int64_t N = P.N, TC = P.T * P.C;
    const float inv_T = static_cast<float>(P.inv_T);
    // Lane-private shared memory: the shifts K (lp2), p0 and the outer S of vector k at [k][tid][4] (16-byte
    // vectors, consecutive threads contiguous), the vote counters of class slot j at [j][tid].
    float* refK = reinterpret_cast<float*>(smem + P.st_off_ref) + tid * 4;
    float* refP = refK + NV * kStride * 4;
    float* refS = refP + NV * kStride * 4;  // the outer sums S_c (flush_sums)
    strip::pin_fptr(refK);
    strip::pin_fptr(refP);
    int* cnt = reinterpret_cast<int*>(smem + P.st_off_cnt) + tid;
    FB_UNROLL
    for (int j = 0; j < K; ++j) cnt[j * kStride] = 0;
    const S* x = static_cast<const S*>(P.x);
    const int64_t step = P.grid * ngb;
    R pf[NV];
    FB_UNROLL
    for (int k = 0; k < NV; ++k) strip::set_neg_inf<S>(pf[k]);
    int64_t n0 = dev::bid() * ngb;
    // The lane's vector offsets in a row (elements), kept in registers (not recomputed per row).
    int off[NV];
    FB_UNROLL
    for (int k = 0; k < NV; ++k) {
      off[k] = (k << lg) * 4;
      strip::pin_int(off[k]);
    }
    const int nvl = nvec > l ? (nvec - l + G - 1) >> lg : 0;
    const S* xl = x + 4 * l;
    if (n0 < N) load_row(xl + (n0 + g < N ? n0 + g : N - 1) * TC, pf, off, nvl);
    for (; n0 < N; n0 += step) {  // uniform over the block
      const bool active = n0 + g < N;
      const int64_t n = active ? n0 + g : N - 1;  // an idle group re-scores the last item, unwritten
      const S* item = xl + n * TC;
      const int64_t nn = n0 + step + g < N ? n0 + step + g : N - 1;
      // After the last item: the last item again (a harmless reload; the loads stay unconditional).
      const S* next_item = xl + nn * TC;
      strip::pin_ptr(next_item);  // computed here, not in the row loop (where only its select needs it)
      float Sa[K], Va[K];
      FB_UNROLL
      for (int j = 0; j < K; ++j) Sa[j] = Va[j] = 0.0f;
      // The lane's mean-KL sum (bits; Uo: its outer sum, flush_sums), log2 s of the first sample.
      float Ut = 0.0f, Uo = 0.0f, ls0 = 0.0f;
      const S* cur = item;
      bool bad = false;
      for (int t = 0; t < T; ++t) {
        float z[K];
        FB_UNROLL
        for (int k = 0; k < NV; ++k) strip::to_float4<S>(pf[k], z + 4 * k);
        strip::pin(z);
        // Prefetch: the next row, or the first row of the group's next item.
        const S* nxt = t + 1 < T ? cur + C : next_item;
        cur = nxt;
        load_row(nxt, pf, off, nvl);

        // 1. max and argmax (slot j of the lane is class 4 (l + (j / 4) G) + j % 4: ascending in j).
        // Every statistic is computed whatever the metrics mask (one straight row loop; outputs
        // not asked for are NaN).
        float m = z[0];
        int arg = 0;
        uint32_t cand = 0;  // kMode 2: the warp's lowest maximal class, reduced with the row sums
        if constexpr (kBlock) {
          FB_UNROLL
          for (int j = 1; j < K; ++j) m = max_nan(m, z[j]);
          const float ml = m;
          uint32_t v[1] = {warp_max(strip::as_bits(m))};
          fold_warps(v, red, [](uint32_t(&a)[1], const uint32_t(&b)[1]) {
            a[0] = strip::as_bits(max_nan(strip::as_float(a[0]), strip::as_float(b[0])));
          });
          m = strip::as_float(v[0]);
          cand = row_argmax(z, ml, m, l, lg);
        } else {
          int jl = 0;
          FB_UNROLL
          for (int j = 1; j < K; ++j) {
            jl = z[j] > m ? j : jl;
            m = max_nan(m, z[j]);
          }
          uint32_t v[2] = {strip::as_bits(m), static_cast<uint32_t>(4 * (l + ((jl >> 2) << lg)) + (jl & 3))};
          if constexpr (kMode >= 1) {
            warp_maxarg(v);  // two REDUX instead of 5 shuffle levels
            if constexpr (kBlock) fold_warps(v, red, merge_maxarg);
          } else {
            fold(v, red, merge_maxarg);
          }
          m = strip::as_float(v[0]);
          arg = static_cast<int>(v[1]);
        }
        bool any_nan;
        if constexpr (kBlock) {
          any_nan = m != m;  // block-uniform
        } else {
          any_nan = dev::ballot(m != m) != 0u;  // warp-uniform
        }
        if (any_nan) nan_vote(z, m, arg, l, lg, C, red);
        if constexpr (!kBlock) vote(arg, l, lg, G, cnt);
        bad = bad || row_nonfinite(m);  // m is the same on every lane of the group

        // 2. exps, the row sum (the lane's part kept: sl).
        const float m2 = m * Base2<float>::log2e;
        float s = 0.0f, e[K];
        FB_UNROLL
        for (int j = 0; j < K; ++j) {
          const float d2 = std::fmax(std::fma(z[j], Base2<float>::log2e, -m2), Base2<float>::exp2_floor);
          e[j] = fast_exp2(d2);
          s += e[j];
          z[j] = d2;
        }
        const float sl = s;
        {
          uint32_t v[2] = {strip::as_bits(s), cand};
          if constexpr (kBlock) {
            FB_UNROLL
            for (int o = 1; o < 32; o <<= 1) {
              v[0] = strip::as_bits(strip::as_float(v[0]) + strip::as_float(dev::shfl_xor(v[0], o)));
            }
            // The sum and the warps' candidate classes across the warps (one barrier).
            fold_warps(v, red, [](uint32_t(&a)[2], const uint32_t(&b)[2]) {
              a[0] = strip::as_bits(strip::as_float(a[0]) + strip::as_float(b[0]));
              a[1] = b[1] < a[1] ? b[1] : a[1];
            });
            if (m == m) arg = static_cast<int>(v[1]);  // a NaN row's vote: nan_vote above
            vote(arg, l, lg, G, cnt);
          } else {
            uint32_t w[1] = {v[0]};
            fold(w, red, [](uint32_t(&a)[1], const uint32_t(&b)[1]) {
              a[0] = strip::as_bits(strip::as_float(a[0]) + strip::as_float(b[0]));
            });
            v[0] = w[0];
          }
          s = strip::as_float(v[0]);
        }
        const float inv = fast_rcp(s), ls2 = fast_log2(s);

        // 3. per-class accumulators (the first sample sets the shifts), with p = e / s:
        // S_c += p, V_c += (p - p0_c)^2, and the lane's part of the row's mean-KL sum
        // sum_c p (lp2 - K_c) = (1/s) (sum_c e (d2 - Kd_c) - (log2 s - ls0) sl) (bits; sl = the
        // lane's sum of e): no per-class U, one FADD and one FFMA per class.
        if (t == 0) {
          set_refs(z, e, ls2, inv, refK, refP);
          ls0 = ls2;
        }
        float u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        FB_UNROLL
        for (int k = 0; k < NV; ++k) {
          float kr[4], pr[4];
          strip::ld_f4(refK + k * kStride * 4, kr);
          strip::ld_f4(refP + k * kStride * 4, pr);
          FB_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int j = 4 * k + i;
            u[i] = std::fma(e[j], z[j] - kr[i], u[i]);
            Sa[j] = std::fma(e[j], inv, Sa[j]);
            const float dv = std::fma(e[j], inv, -pr[i]);
            Va[j] = std::fma(dv, dv, Va[j]);
          }
        }
        Ut = std::fma(std::fma(ls0 - ls2, sl, (u[0] + u[1]) + (u[2] + u[3])), inv, Ut);
        if (((t + 1) & (kFlush - 1)) == 0 && t + 1 < T) flush_sums(Sa, Ut, Uo, refS, t + 1 == kFlush);
      }
      if (T > kFlush) unflush_sums(Sa, refS);
      Ut += Uo;

      // Per item, in float.
      // kl = U - sum_c S_c (log2 pbar_c - K_c), hn = U + sum_c K_c S_c (= sum_t sum_c p lp2), with
      // K_c = Kd_c - ls0.
      float ent = 0.0f, kl = Ut, hn = Ut, sd = 0.0f, top1 = 0.0f, top2 = 0.0f;
      {
        FB_UNROLL
        for (int k = 0; k < NV; ++k) {
          if (l + (k << lg) >= nvec) continue;
          float kr[4], pr[4];
          strip::ld_f4(refK + k * kStride * 4, kr);
          strip::ld_f4(refP + k * kStride * 4, pr);
          FB_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int j = 4 * k + i;
            const float pb = Sa[j] * inv_T;
            const float lpb = log2_pbar(pb);
            ent += neg_plogp2(pb, lpb);
            top2_update_nb(pb, top1, top2);
            const float Kc = kr[i] - ls0;
            kl -= Sa[j] * (lpb - Kc);
            hn = std::fma(Kc, Sa[j], hn);
            const float dp = pb - pr[i];
            sd += fast_sqrt(std::fmax(Va[j] * inv_T - dp * dp, 0.0f));
          }
        }
      }
      uint32_t modal = 0;
      {
        FB_UNROLL
        for (int j = 0; j < K; ++j) {
          const uint32_t c = static_cast<uint32_t>(cnt[j * kStride]);
          modal = c > modal ? c : modal;
          cnt[j * kStride] = 0;
        }
      }
      uint32_t v[7] = {strip::as_bits(ent), strip::as_bits(kl), strip::as_bits(sd), strip::as_bits(top1),
                       strip::as_bits(top2), modal, strip::as_bits(hn)};
      fold(v, red, [](uint32_t(&a)[7], const uint32_t(&b)[7]) {
        FB_UNROLL
        for (int i = 0; i < 3; ++i) a[i] = strip::as_bits(strip::as_float(a[i]) + strip::as_float(b[i]));
        a[6] = strip::as_bits(strip::as_float(a[6]) + strip::as_float(b[6]));
        float t1 = strip::as_float(a[3]), t2 = strip::as_float(a[4]);
        top2_update_nb(strip::as_float(b[3]), t1, t2);
        top2_update_nb(strip::as_float(b[4]), t1, t2);
        a[3] = strip::as_bits(t1);
        a[4] = strip::as_bits(t2);
        a[5] = b[5] > a[5] ? b[5] : a[5];
      });
      if (P.check) {
        if constexpr (kBlock) {
          if (red.warp == 0) mark_bad_warp(P, bad && tid == 0, n);
        } else {
          mark_bad_warp(P, bad && active && l == 0, n);
        }
      }
      if (active && l == 0) {
        ent = strip::as_float(v[0]);
        kl = strip::as_float(v[1]);
        sd = strip::as_float(v[2]);
        top1 = strip::as_float(v[3]);
        top2 = strip::as_float(v[4]);
        const float klv = kl * Base2<float>::ln2 * inv_T;
        const float hv = -strip::as_float(v[6]) * Base2<float>::ln2 * inv_T;
        const float o[kNumMetrics] = {ent,
                                      hv > 0.0f ? hv : 0.0f,
                                      klv > 0.0f ? klv : 0.0f,
                                      1.0f - static_cast<float>(v[5]) * inv_T,
                                      sd * static_cast<float>(P.inv_C),
                                      top1 - top2,
                                      1.0f - top1};
        float* out = static_cast<float*>(P.out);
        constexpr float nan = std::numeric_limits<float>::quiet_NaN();
        FB_UNROLL
        for (int k = 0; k < kNumMetrics; ++k) {
          out[k * N + n] = ((P.metrics >> k) & 1) && (!bad || k == kVariationRatio) ? o[k] : nan;
        }
      }
    }
  }
};

template <class S, int NV, int kMode>
FB_DEV void strip_body(const Params& P, unsigned char* smem) {
  StripKernel<S, NV, kMode>::run(P, smem);
}

// strip_body for the runtime configuration (the host emulator; the CUDA launch has its own
// switch over FB_STRIP_CONFIGS). float64 input never takes this path.
template <class S>
FB_DEV void strip_dispatch(const Params& P, unsigned char* smem) {
  if constexpr (sizeof(S) != 8) {
#define FB_STRIP_CASE(nv, mode)             \
  if (P.st_nv == nv && P.st_mode == mode) { \
    strip_body<S, nv, mode>(P, smem);       \
    return;                                 \
  }
    FB_STRIP_CONFIGS(FB_STRIP_CASE)
#undef FB_STRIP_CASE
  }
}

}  // namespace cuda
}  // namespace fastbald
