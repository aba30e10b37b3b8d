// The group kernel of the CPU op: small items (T * C <= kGroupLimit), L pool items at a time.
//
// The SIMD lanes hold L different pool items and every op is lane-wise, so no lane idles whatever
// T is, and nothing needs a horizontal reduction. The L item tiles are transposed into the scratch
// zt[f][lane] (f = in-tile offset of (t, c)); the row math is the same csrc/scores_math.h code as
// the item kernel (item_kernel.h), on V = GroupVec<A>. The next group's tiles are prefetched while
// this group computes (prefetch_part).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../scores_math.h"
#include "problem.h"
#include "simd_traits.h"

namespace fastbald {
namespace cpu {
namespace {

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

// Largest item tile (T * C) the group kernel takes; larger items go to the item kernel.
constexpr int64_t kGroupLimit = 2048;

// A running sum over classes; kCompensated: Kahan's (the correction c carries the rounding error
// of every add; no multiplication, so -ffp-contract cannot fuse it away).
template <class V, bool kCompensated>
struct ClassSum {
  V s = V(0), c = V(0);
  void add(const V& x) {
    if constexpr (kCompensated) {
      const V y = x - c;
      const V t = s + y;
      c = (t - s) - y;
      s = t;
    } else {
      s = s + x;
    }
  }
};

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

// Per-class values in registers (when kInRegs) or in the [C][L] memory `mem`. kMirror: every set()
// also writes `mem` (values read again after the class loop, e.g. a row's exps for the second pass),
// the registers then being a copy.
template <class V, class A, int CT, bool kMirror>
struct ClassValues {
  V r[kInRegs<V, CT> ? CT : 1];
  A* mem;
  explicit ClassValues(A* m) : mem(m) {}
  V get(int64_t c) const {
    if constexpr (kInRegs<V, CT>) return r[c];
    else return V::loadu(mem + c * V::size());
  }
  void set(int64_t c, const V& v) {
    if constexpr (kMirror || !kInRegs<V, CT>) v.store(mem + c * V::size());
    if constexpr (kInRegs<V, CT>) r[c] = v;
  }
};
// An accumulator that lives in registers or in memory.
template <class V, class A, int CT>
using ClassAcc = ClassValues<V, A, CT, false>;
// Values always written to memory, with a register copy if they fit.
template <class V, class A, int CT>
using ClassKeep = ClassValues<V, A, CT, true>;

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
struct GroupKernel : Problem<scalar_t, A> {
  using P = Problem<scalar_t, A>;
  using P::x, P::N, P::T, P::C, P::sN, P::sT, P::sC, P::kind, P::metrics, P::check, P::tol,
      P::needs, P::out;
  using V = GroupVec<A>;
  using O = Ops<V>;
  static constexpr int64_t L = V::size();

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

  // check_finite=False only: the rows of the lanes not set in `ok` hold a NaN (or +inf) logit, and
  // the exps path's one-instruction max (max_fast) lets their argmax move past a NaN. Their argmax
  // is taken again from the input by the rule of math::row_max_argmax (ties: lowest class; frozen
  // once the max is NaN), which the item kernel, the VR-only path and the CUDA kernels follow.
  void redo_nan_argmax(int64_t n0, int64_t nvalid, const V& ok, A* args) const {
    alignas(64) A okarr[L];
    ok.store(okarr);
    for (int64_t l = 0; l < nvalid; ++l) {
      if (okarr[l] != A(0)) continue;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* row = x + (n0 + l) * sN + t * sT;
        auto z = [this, row](int64_t c) {
          const A v = static_cast<A>(row[c * sC]);
          return kind == math::kProbs ? std::log(v) : v;
        };
        A m;
        int64_t arg;
        math::row_max_argmax_index<A, int64_t>(z, C, m, arg);
        args[t * L + l] = static_cast<A>(arg);
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
      // Unchecked input: lanes with a NaN (or +inf) logit are marked for redo_nan_argmax.
      if (check || need_vr) ok = ok & O::eq(xa, xa);
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
    } else if (need_vr && needs.exps) {
      redo_nan_argmax(n0, nvalid, ok, args);
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
    // Per-item sums over classes: plain running sums for the compile-time small C (CT > 0),
    // compensated (Kahan) sums in the general case, whose C reaches 2048: a float32 running sum of
    // C terms is off by ~C eps (1.1e-5 in the entropy of a flat row at C = 2048, 1.7e-5 in the
    // BALD of identical samples), a compensated one by ~eps.
    using Sum = ClassSum<V, (CT == 0)>;
    Sum ptot_s;
    for (int64_t c = 0; c < C; ++c) ptot_s.add(pacc.get(c));
    const V inv_ptot = one / ptot_s.s;
    Sum ent_s;
    for (int64_t c = 0; c < C; ++c) {
      const V pb = pacc.get(c) * inv_ptot;
      const V lpb = O::max(O::log(pb), floor);
      pb.store(pbar + c * L);
      lpb.store(lpbar + c * L);
      ent_s.add(zero - pb * lpb);  // pb = 0 -> 0 * floor = 0
      top2 = O::max(top2, at::vec::minimum(top1, pb));
      top1 = O::max(top1, pb);
    }
    ent = ent_s.s;
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
      // Per-row sums (the T * C path): the mean-KL terms compensated in the general case (their
      // sum cancels against log s * sum_c p; identical terms, e.g. a flat row, round the same way
      // every add), the probabilities in blocks of kSumBlock classes (error ~(kSumBlock +
      // C / kSumBlock) eps); one block when C <= kSumBlock.
      Sum klrow;
      V prow = zero;
      for (int64_t c0 = 0; c0 < C; c0 += math::kSumBlock) {
        const int64_t c1 = std::min<int64_t>(C, c0 + math::kSumBlock);
        V pp = zero;
        for (int64_t c = c0; c < c1; ++c) {
          const V p = V::loadu(erow + c * L) * inv_s;
          klrow.add(math::kl_term(p, V::loadu(zrow + c * cstride), V::loadu(lpbar + c * L)));
          pp = pp + p;
          const V dv = p - V::loadu(pbar + c * L);
          vacc.set(c, at::vec::fmadd(dv, dv, vacc.get(c)));
        }
        prow = prow + pp;
      }
      kl = kl + (klrow.s - V::loadu(s.rls.data() + t * L) * prow);
    }
    Sum std_s;
    for (int64_t c = 0; c < C; ++c) std_s.add((vacc.get(c) * V(inv_T)).sqrt());
    const V std_sum = std_s.s;
    put(math::kBald, O::max(kl * V(inv_T), zero));
    put(math::kMeanStd, std_sum * V(A(1) / static_cast<A>(C)));
    return -1;
  }
};

// Scores every item of p with the group kernel (at::parallel_for over groups of L items); needs
// p.T * p.C <= kGroupLimit. A bad item (when p.check) is noted in first_bad and ends its thread's
// range.
template <class scalar_t, class A>
void score_groups(const Problem<scalar_t, A>& p, FirstBad& first_bad) {
  const bool ntc = p.sC == 1 && p.sT == p.C;
  const bool nct = p.sT == 1 && p.sC == p.T;
  const GroupKernel<scalar_t, A> g{p, ntc ? p.C : (nct ? 1 : p.C), ntc ? 1 : (nct ? p.T : 1),
                                   ntc || nct};
  // Grain in items: a multiple of L, about 32K elements per task.
  constexpr int64_t G = GroupKernel<scalar_t, A>::L;
  const int64_t N = p.N, T = p.T, C = p.C;
  const int64_t grain = std::max<int64_t>(G, (32768 / (T * C)) / G * G);
  at::parallel_for(0, (N + G - 1) / G, std::max<int64_t>(1, grain / G), [&](int64_t gb, int64_t ge) {
    GroupScratch<A> s(T, C, G);
    for (int64_t gi = gb; gi < ge; ++gi) {
      const int64_t n0 = gi * G;
      if (first_bad.after(n0)) break;
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
        first_bad.note(n0 + lane);
        break;
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastbald
