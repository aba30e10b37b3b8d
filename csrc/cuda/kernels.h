// Kernel bodies of fastbald::pool_scores on CUDA (see NOTES.md). Written against the primitives of
// device_compat.h, so the same source is compiled by nvcc (scores_cuda.cu) and, for the CPU tests,
// by g++ with the std::thread emulation (emu/emu_main.cpp). All per-row math is the shared
// csrc/scores_math.h with V = A (float for float/half/bf16 input, double for float64 input).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../scores_math.h"
#include "device_compat.h"
#include "plan.h"

namespace fastbald {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Small helpers.

template <class A, class S>
FB_DEV A to_acc(const S& v, int kind) {
  const A a = static_cast<A>(v);
  return kind == math::kProbs ? math::Ops<A>::log(a) : a;
}

template <class A>
FB_DEV A a_inf() {
  return std::numeric_limits<A>::infinity();
}

// Reductions over a group of G consecutive lanes (G a power of 2 <= 32; G == 1: the thread alone,
// no shuffle). Every lane of the group gets the result; all 32 lanes of the warp must call them.
template <class T>
FB_DEV T group_sum(T v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) v = v + dev::shfl_xor(v, o);
  return v;
}
template <class T>
FB_DEV T group_min(T v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) {
    const T u = dev::shfl_xor(v, o);
    v = u < v ? u : v;
  }
  return v;
}
template <class T>
FB_DEV T group_imax(T v, int G) {
  for (int o = G >> 1; o > 0; o >>= 1) {
    const T u = dev::shfl_xor(v, o);
    v = u > v ? u : v;
  }
  return v;
}
// The value of the group's first lane (the NaN-propagating max is not commutative for +0/-0, so
// the group's lanes could otherwise hold different signed zeros).
template <class T>
FB_DEV T group_bcast(T v, int lane, int G) {
  return G > 1 ? dev::shfl(v, lane & ~(G - 1)) : v;
}
template <class T>
FB_DEV T warp_sum(T v) {
  return group_sum(v, 32);
}
template <class T>
FB_DEV T warp_imax(T v) {
  return group_imax(v, 32);
}
// Merge of running top-2 pairs across the warp (values >= 0; multiset semantics as top2_update).
FB_DEV void warp_top2(double& top1, double& top2) {
  for (int o = 16; o > 0; o >>= 1) {
    const double u1 = dev::shfl_xor(top1, o);
    const double u2 = dev::shfl_xor(top2, o);
    math::top2_update<double>(u1, top1, top2);
    math::top2_update<double>(u2, top1, top2);
  }
}

// One row processed by a group of G lanes, lane gl of the group taking classes gl, gl + G, ...
// (`z(i)` loads the lane's i-th class; `sink(c, d, e)` receives the shifted logit and its exp).
// Gives the row max m (the same on every lane of the group), with exps the row sums s and a, and
// with need_arg the argmax (lowest index): row_max_argmax_index per lane, then the group's
// (max, lowest index) merge. A NaN row votes as on the CPU (math::row_max_argmax: the argmax is
// frozen at the first NaN): the argmax of the classes before its first NaN, -1 (class 0) if that
// is class 0; found in a second pass taken only when a row of the warp has a NaN max. A lane with
// no class (C <= gl, or C = 0 for a group with no row) takes part in the shuffles with m = -inf
// and empty sums. All 32 lanes of the warp must call it.
template <class A, class I, class Load, class Sink>
FB_DEV void group_row(const Load& z, I C, int gl, int lane, int G, bool exps, bool need_arg, A& m, I& arg, A& s,
                      A& a, Sink&& sink) {
  using O = math::Ops<A>;
  const I Cl = C > gl ? (C - gl + G - 1) / G : 0;
  A ml = -a_inf<A>();
  I first = C;
  if (need_arg) {
    if (Cl > 0) {
      I al;
      math::row_max_argmax_index<A, I>(z, Cl, ml, al);
      first = ml == ml ? gl + G * al : C;  // a NaN row has no argmax
    }
    for (int o = G >> 1; o > 0; o >>= 1) {
      const A mo = dev::shfl_xor(ml, o);
      const I fo = dev::shfl_xor(first, o);
      if (mo > ml || (mo == ml && fo < first)) first = fo;
      ml = O::max(ml, mo);
    }
    first = group_bcast(first, lane, G);  // identical on every lane (NaN rows included)
    if (dev::ballot(ml != ml) != 0) {  // warp-uniform: some row of the warp has a NaN
      // The row's first NaN class f, then the argmax of the classes before it.
      I fl = C;
      for (I i = 0; i < Cl; ++i) {
        const A v = z(i);
        if (v != v) {
          fl = gl + G * i;
          break;
        }
      }
      const I f = group_min(fl, G);
      A pm = -a_inf<A>();
      I pa = C;
      for (I i = 0; i < Cl && gl + G * i < f; ++i) {
        const A v = z(i);
        if (pa == C || v > pm) {
          pm = v;
          pa = gl + G * i;
        }
      }
      for (int o = G >> 1; o > 0; o >>= 1) {
        const A mo = dev::shfl_xor(pm, o);
        const I fo = dev::shfl_xor(pa, o);
        if (mo > pm || (mo == pm && fo < pa)) pa = fo;
        pm = mo > pm ? mo : pm;
      }
      pa = group_bcast(pa, lane, G);
      if (ml != ml) first = pa;  // C (no class before the NaN): votes class 0
    }
  } else {
    if (Cl > 0) ml = math::row_max<A>(z, Cl);
    for (int o = G >> 1; o > 0; o >>= 1) ml = O::max(ml, dev::shfl_xor(ml, o));
  }
  m = group_bcast(ml, lane, G);
  if (exps) {
    math::row_exp_sum<A, A>(z, Cl, m, s, a,
                            [&](int64_t i, const A& d, const A& e) { sink(gl + G * static_cast<I>(i), d, e); });
    s = group_sum(s, G);
    a = group_sum(a, G);
  } else {
    s = a = A(0);
  }
  arg = first >= C ? I(-1) : first;
}

// The 7 outputs of item n; lane k < 7 of the calling warp writes metric k (NaN if not requested).
// `invalid`: a row of the item has a max that is not finite (NaN, +inf, every class masked; only
// reachable with check_finite=False): every output but the variation ratio is NaN, as on the CPU.
template <class A>
FB_DEV void write_outputs(const Params& P, int64_t n, int lane, double ent, double h, double kl, int modal,
                          double sd, double top1, double top2, bool invalid) {
  if (lane >= math::kNumMetrics) return;
  const double inv_T = P.inv_T;
  double v = 0;
  switch (lane) {
    case math::kEntropy: v = ent; break;
    case math::kExpectedEntropy: v = h * inv_T; break;
    case math::kBald: v = math::clamp0(kl * inv_T); break;
    case math::kVariationRatio: v = math::variation_ratio_inv<double>(modal, inv_T); break;
    case math::kMeanStd: v = sd * P.inv_C; break;
    case math::kMargin: v = top1 - top2; break;
    default: v = 1.0 - top1; break;
  }
  if (invalid && lane != math::kVariationRatio) v = std::numeric_limits<double>::quiet_NaN();
  A* out = static_cast<A*>(P.out);
  out[lane * P.N + n] = ((P.metrics >> lane) & 1) ? static_cast<A>(v) : std::numeric_limits<A>::quiet_NaN();
}

FB_DEV void mark_bad(const Params& P, int64_t n) {
  dev::atomic_max_global(P.flag, ~0ull - static_cast<unsigned long long>(n));
}

// Warp-aggregated mark_bad: the lowest item n among the lanes with `bad` set, flagged with one
// atomic by the lowest such lane (a ballot, and nothing more, when no lane is bad). All 32 lanes
// of the warp must call it.
FB_DEV void mark_bad_warp(const Params& P, bool bad, int64_t n) {
  const unsigned b = dev::ballot(bad);
  if (b == 0) return;
  unsigned long long v = bad ? ~0ull - static_cast<unsigned long long>(n) : 0ull;
  v = group_imax(v, 32);
  const int lane = dev::tid() & 31;
  if (bad && (b & ((1u << lane) - 1u)) == 0) dev::atomic_max_global(P.flag, v);
}

// Finite-check of a row (max not finite: NaN, +inf or all -inf; for probs also |sum p - 1| > tol,
// with sum p = s * exp(m) since the row was shifted by m = max log p).
template <class A>
FB_DEV bool row_bad(const Params& P, A m, bool have_sum, A s) {
  if (!P.check) return false;
  if (!(m > -a_inf<A>() && m < a_inf<A>())) return true;
  if (have_sum && P.kind == math::kProbs) {
    const A tot = s * math::Ops<A>::exp(m);
    if (!(std::fabs(static_cast<double>(tot) - 1.0) <= P.tol)) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Tile kernel: a block scores chunks of kk items whose tiles sit in shared memory.

template <class S, class A>
struct TileKernel {
  const Params& P;
  unsigned char* smem;
  int tid, B, lane, warp, nwarps;
  int T, C, Cp, kk;
  A *zd, *ze, *rls, *rinv, *rh, *cent, *ckl, *cstd, *cpb;
  int* cnt;
  math::Needs needs;
  bool need_vr;

  FB_DEV TileKernel(const Params& p, unsigned char* sm)
      : P(p), smem(sm), needs(p.metrics, p.kind) {
    tid = dev::tid();
    B = dev::bdim();
    lane = tid & 31;
    warp = tid >> 5;
    nwarps = B >> 5;
    T = static_cast<int>(P.T);
    C = static_cast<int>(P.C);
    Cp = P.Cp;
    kk = P.kk;
    zd = reinterpret_cast<A*>(smem + P.off_d);
    ze = reinterpret_cast<A*>(smem + P.off_e);
    rls = reinterpret_cast<A*>(smem + P.off_rls);
    rinv = reinterpret_cast<A*>(smem + P.off_rinv);
    rh = reinterpret_cast<A*>(smem + P.off_rh);
    cent = reinterpret_cast<A*>(smem + P.off_cent);
    ckl = reinterpret_cast<A*>(smem + P.off_ckl);
    cstd = reinterpret_cast<A*>(smem + P.off_cstd);
    cpb = reinterpret_cast<A*>(smem + P.off_cpb);
    cnt = reinterpret_cast<int*>(smem + P.off_cnt);
    need_vr = (P.metrics & (1 << math::kVariationRatio)) != 0;
  }

  // Shared row index of sample t of chunk item j.
  FB_DEV int row_of(int j, int t) const { return P.tnc_rows ? t * kk + j : j * T + t; }

  // ---- load: chunk items [n0, n0 + kc) -> zd (converted to A; log for probs) ----
  static constexpr int VW = 16 / static_cast<int>(sizeof(S));  // elements per 16-byte vector
  static constexpr int U = 4;                                   // vectors in flight per thread

  template <bool kLog>
  FB_DEV static A conv(const S& v) {
    const A a = static_cast<A>(v);
    if constexpr (kLog) {
      return math::Ops<A>::log(a);
    } else {
      return a;
    }
  }
  // Element q of a span whose shared offset is `base` (pad: rows of Cp = C + padw, so
  // q + (q / C) * padw). q is the element's index from the span's start, never from the end of an
  // unaligned head: the row of an element depends on its index in the span (issue 10).
  template <bool kPad, bool kLog>
  FB_DEV void put(int base, int q, const S& v) {
    zd[base + q + (kPad ? P.div_c(q) * (Cp - C) : 0)] = conv<kLog>(v);
  }

  // Contiguous NTC: the chunk is one span of kc*T*C elements.
  template <bool kPad, bool kLog>
  FB_DEV void load_flat(const S* x, int64_t n0, int kc) {
    const S* src = x + n0 * P.sN;
    const int len = kc * T * C;
    int head = static_cast<int>(((16 - (reinterpret_cast<uintptr_t>(src) & 15)) & 15) / sizeof(S));
    head = head < len ? head : len;
    const int nv = (len - head) / VW;
    const int tail0 = head + nv * VW;
    const int nsc = head + (len - tail0);
    for (int i = tid; i < nsc; i += B) {
      const int q = i < head ? i : tail0 + (i - head);
      put<kPad, kLog>(0, q, dev::load_elem(src + q));
    }
    const S* vsrc = src + head;
    int v = tid;
    for (; v + (U - 1) * B < nv; v += U * B) {
      S buf[U][VW];
      FB_UNROLL
      for (int u = 0; u < U; ++u) dev::load16(vsrc + (v + u * B) * VW, buf[u]);
      FB_UNROLL
      for (int u = 0; u < U; ++u) {
        FB_UNROLL
        for (int i = 0; i < VW; ++i) put<kPad, kLog>(0, head + (v + u * B) * VW + i, buf[u][i]);
      }
    }
    for (; v < nv; v += B) {
      S buf[VW];
      dev::load16(vsrc + v * VW, buf);
      FB_UNROLL
      for (int i = 0; i < VW; ++i) put<kPad, kLog>(0, head + v * VW + i, buf[i]);
    }
  }

  // Contiguous TNC, a full chunk: T spans of kk*C elements, all with the host-planned alignment.
  template <bool kPad, bool kLog>
  FB_DEV void load_tnc(const S* x, int64_t n0) {
    const S* base = x + n0 * P.sN;
    const int head = P.tnc_head, nv = P.tnc_nv, nsc = P.tnc_nsc;
    const int tail0 = head + nv * VW;
    const int span = kk * Cp;  // shared offset between the spans of consecutive t
    for (int w = tid; w < T * nsc; w += B) {
      const int t = P.div_nsc(w);
      const int i = w - t * nsc;
      const int q = i < head ? i : tail0 + (i - head);
      put<kPad, kLog>(t * span, q, dev::load_elem(base + static_cast<int64_t>(t) * P.sT + q));
    }
    const int total = T * nv;
    int w = tid;
    for (; w + (U - 1) * B < total; w += U * B) {
      S buf[U][VW];
      int tt[U], qq[U];
      FB_UNROLL
      for (int u = 0; u < U; ++u) {
        const int ww = w + u * B;
        tt[u] = P.div_nv(ww);
        qq[u] = head + (ww - tt[u] * nv) * VW;
        dev::load16(base + static_cast<int64_t>(tt[u]) * P.sT + qq[u], buf[u]);
      }
      FB_UNROLL
      for (int u = 0; u < U; ++u) {
        FB_UNROLL
        for (int i = 0; i < VW; ++i) put<kPad, kLog>(tt[u] * span, qq[u] + i, buf[u][i]);
      }
    }
    for (; w < total; w += B) {
      const int t = P.div_nv(w);
      const int q = head + (w - t * nv) * VW;
      S buf[VW];
      dev::load16(base + static_cast<int64_t>(t) * P.sT + q, buf);
      FB_UNROLL
      for (int i = 0; i < VW; ++i) put<kPad, kLog>(t * span, q + i, buf[i]);
    }
  }

  // Any strides: element i of the chunk in the loop order gen_order (smallest stride innermost),
  // U loads in flight per thread.
  FB_DEV bool gen_coords(int i, int kc, int& j, int& t, int& c) const {
    if (P.gen_order == kOrderJTC) {
      const int r = P.div_c(i);
      c = i - r * C;
      j = P.div_t(r);
      t = r - j * T;
    } else if (P.gen_order == kOrderJCT) {
      const int r = P.div_t(i);
      t = i - r * T;
      j = P.div_c(r);
      c = r - j * C;
    } else {
      const int r = P.div_c(i);
      c = i - r * C;
      t = P.div_kk(r);
      j = r - t * kk;
    }
    return j < kc;
  }
  template <bool kLog>
  FB_DEV void load_generic(const S* x, int64_t n0, int kc) {
    const int total = (P.gen_order == kOrderTJC ? kk : kc) * T * C;
    for (int i0 = tid; i0 < total; i0 += U * B) {
      S v[U];
      int dst[U];
      FB_UNROLL
      for (int u = 0; u < U; ++u) {
        const int i = i0 + u * B;
        int j = 0, t = 0, c = 0;
        const bool ok = i < total && gen_coords(i, kc, j, t, c);
        dst[u] = ok ? row_of(j, t) * Cp + c : -1;
        // Out-of-range slots read the chunk's first element (always valid) and are not stored.
        const int64_t g = ok ? (n0 + j) * P.sN + static_cast<int64_t>(t) * P.sT + static_cast<int64_t>(c) * P.sC
                             : n0 * P.sN;
        v[u] = dev::load_elem(x + g);
      }
      FB_UNROLL
      for (int u = 0; u < U; ++u) {
        if (dst[u] >= 0) zd[dst[u]] = conv<kLog>(v[u]);
      }
    }
  }

  template <bool kLog>
  FB_DEV void load_as(const S* x, int64_t n0, int kc) {
    if (P.load_mode == kLoadFlat) {
      if (P.pad) {
        load_flat<true, kLog>(x, n0, kc);
      } else {
        load_flat<false, kLog>(x, n0, kc);
      }
    } else if (P.load_mode == kLoadTnc && kc == kk) {
      if (P.pad) {
        load_tnc<true, kLog>(x, n0);
      } else {
        load_tnc<false, kLog>(x, n0);
      }
    } else {
      load_generic<kLog>(x, n0, kc);  // also the last, partial chunk of a TNC pool
    }
  }
  FB_DEV void load(const S* x, int64_t n0, int kc) {
    if (P.kind == math::kProbs) {
      load_as<true>(x, n0, kc);
    } else {
      load_as<false>(x, n0, kc);
    }
  }

  // ---- rows: max / exp sums (d in place, e in ze) / argmax vote; row stats; votes ----
  // A group of G = row_lanes lanes per row (G == 1: a thread per row), rows spread over the block.
  FB_DEV void rows(int64_t n0, int kc) {
    const bool exps = needs.exps;
    const bool two = P.two_arrays != 0;
    const int G = P.row_lanes;
    const int gl = lane & (G - 1);
    const int nrows = P.tnc_rows ? kk * T : kc * T;
    const int per_iter = B / G;
    const int iters = (nrows + per_iter - 1) / per_iter;  // uniform over the block
    for (int it = 0; it < iters; ++it) {
      const int rs = it * per_iter + tid / G;
      int j = 0, t = 0;
      bool active = rs < nrows;
      if (active) {
        if (P.tnc_rows) {
          t = P.div_kk(rs);
          j = rs - t * kk;
        } else {
          j = P.div_t(rs);
          t = rs - j * T;
        }
        active = j < kc;
      }
      A* row = zd + (active ? rs : 0) * Cp;
      A* erow = ze + (active ? rs : 0) * Cp;
      const int Ce = active ? C : 0;  // a group without a row still takes part in the shuffles
      auto z = [row, gl, G](int64_t i) { return row[gl + G * static_cast<int>(i)]; };
      A m, s, a;
      int arg = -1;
      if (two) {
        group_row<A, int>(z, Ce, gl, lane, G, exps, need_vr, m, arg, s, a, [row, erow](int c, const A& d, const A& e) {
          row[c] = d;
          erow[c] = e;
        });
      } else {
        group_row<A, int>(z, Ce, gl, lane, G, exps, need_vr, m, arg, s, a,
                          [row](int c, const A& d, const A&) { row[c] = d; });
      }
      bool bad = false;
      if (active && gl == 0) {
        if (exps) {
          // A row whose max is not finite gets NaN stats: its item's outputs are NaN (reduce()).
          const bool fin = m > -a_inf<A>() && m < a_inf<A>();
          const A ls = fin ? math::Ops<A>::log(s) : std::numeric_limits<A>::quiet_NaN();
          const A inv = A(1) / s;
          rls[rs] = ls;
          rinv[rs] = inv;
          rh[rs] = math::row_entropy(ls, a, inv);
        }
        bad = row_bad<A>(P, m, exps, s);
        if (need_vr) {
          const int ai = arg < 0 ? 0 : (arg >= C ? C - 1 : arg);
          dev::atomic_add_shared(&cnt[j * C + ai], 1);
        }
      }
      if (P.check) mark_bad_warp(P, bad, n0 + j);  // uniform: every lane of the block is here
    }
  }

  // ---- columns: per (item, class): pbar, -pbar log pbar, KL and variance sums ----
  // Thread group of col_lanes threads per pair; sub-lane `sub` takes samples sub, sub + lanes, ...
  FB_DEV void columns(int kc) {
    const int lanes = P.col_lanes;
    const int npairs = kc * C;
    const int rounds = (npairs * lanes + B - 1) / B;  // uniform over the block
    const double inv_T = P.inv_T;
    const bool two = P.two_arrays != 0;
    const int rstep = (P.tnc_rows ? kk : 1) * lanes;  // shared rows between a sub-lane's samples
    for (int round = 0; round < rounds; ++round) {
      const int slot = round * B + tid;
      const int w = slot >> P.col_lanes_log2;  // pair
      const int sub = slot & (lanes - 1);
      const bool active = w < npairs && sub < T;
      int c = 0, r0 = 0;
      if (active) {
        const int j = P.div_c(w);
        c = w - j * C;
        r0 = row_of(j, sub);
      }
      const int n = active ? (T - sub + lanes - 1) / lanes : 0;  // samples of this sub-lane
      A sp = A(0);
      if (two) {
        const A* pe = ze + r0 * Cp + c;
        const A* pi = rinv + r0;
        for (int k = 0; k < n; ++k, pe += rstep * Cp, pi += rstep) sp = sp + *pe * *pi;
      } else {
        const A* pd = zd + r0 * Cp + c;
        const A* pl = rls + r0;
        for (int k = 0; k < n; ++k, pd += rstep * Cp, pl += rstep) sp = sp + math::Ops<A>::exp(*pd - *pl);
      }
      if (lanes > 1) sp = group_sum(sp, lanes);
      const double pb = static_cast<double>(sp) * inv_T;
      const double lpb = math::log_pbar<double>(pb);
      if (needs.second) {
        const double lfl = static_cast<double>(math::Limits<A>::log_floor);
        const A lpf = static_cast<A>(lpb > lfl ? lpb : lfl);
        const A pbf = static_cast<A>(pb);
        A kl = A(0), var = A(0);
        const A* pd = zd + r0 * Cp + c;
        const A* pl = rls + r0;
        if (two) {
          const A* pe = ze + r0 * Cp + c;
          const A* pi = rinv + r0;
          for (int k = 0; k < n; ++k, pd += rstep * Cp, pl += rstep, pe += rstep * Cp, pi += rstep) {
            const A p = *pe * *pi;
            kl = kl + math::kl_term(p, *pd - *pl, lpf);
            const A dv = p - pbf;
            var = var + dv * dv;
          }
        } else {
          for (int k = 0; k < n; ++k, pd += rstep * Cp, pl += rstep) {
            const A lp = *pd - *pl;
            const A p = math::Ops<A>::exp(lp);
            kl = kl + math::kl_term(p, lp, lpf);
            const A dv = p - pbf;
            var = var + dv * dv;
          }
        }
        if (lanes > 1) {
          kl = group_sum(kl, lanes);
          var = group_sum(var, lanes);
        }
        if (active && sub == 0) {
          ckl[w] = kl;
          cstd[w] = static_cast<A>(static_cast<double>(var) * inv_T);  // variance; sqrt in reduce()
        }
      }
      if (active && sub == 0) {
        cent[w] = static_cast<A>(math::neg_plogp<double>(pb, lpb));
        cpb[w] = static_cast<A>(pb);
      }
    }
  }

  // ---- reduce over classes and rows, write the outputs: warp per item ----
  FB_DEV void reduce(int64_t n0, int kc) {
    for (int j = warp; j < kc; j += nwarps) {
      double ent = 0, kl = 0, sd = 0, h = 0, top1 = 0, top2 = 0;
      int modal = 0;
      for (int c = lane; c < C; c += 32) {
        const int w = j * C + c;
        if (needs.pbar) {
          ent += static_cast<double>(cent[w]);
          math::top2_update<double>(static_cast<double>(cpb[w]), top1, top2);
          if (needs.second) {
            kl += static_cast<double>(ckl[w]);
            sd += std::sqrt(static_cast<double>(cstd[w]));
          }
        }
        if (need_vr) modal = cnt[w] > modal ? cnt[w] : modal;
      }
      int invalid = 0;  // a row with a non-finite max (its log s is NaN: rows())
      if (needs.exps) {
        for (int t = lane; t < T; t += 32) {
          const A ls = rls[row_of(j, t)];
          invalid |= ls != ls;
          if (needs.entropy_t) h += static_cast<double>(rh[row_of(j, t)]);
        }
      }
      ent = warp_sum(ent);
      kl = warp_sum(kl);
      sd = warp_sum(sd);
      h = warp_sum(h);
      modal = warp_imax(modal);
      warp_top2(top1, top2);
      invalid = warp_imax(invalid);
      write_outputs<A>(P, n0 + j, lane, ent, h, kl, modal, sd, top1, top2, invalid != 0);
    }
  }

  FB_DEV void run() {
    const S* x = static_cast<const S*>(P.x);
    for (int64_t chunk = dev::bid(); chunk < P.nchunks; chunk += dev::gdim()) {
      const int64_t n0 = chunk * kk;
      const int kc = static_cast<int>(P.N - n0 < kk ? P.N - n0 : kk);
      if (need_vr) {
        for (int i = tid; i < kc * C; i += B) cnt[i] = 0;
      }
      load(x, n0, kc);
      dev::sync();
      rows(n0, kc);
      dev::sync();
      if (needs.pbar) {
        columns(kc);
        dev::sync();
      }
      reduce(n0, kc);
      dev::sync();
    }
  }
};

template <class S, class A>
FB_DEV void tile_body(const Params& P, unsigned char* smem) {
  TileKernel<S, A> k(P, smem);
  k.run();
}

// ---------------------------------------------------------------------------------------------
// Stream kernel: a block per item, the tile re-read from global memory (L2) in each pass.

template <class S, class A>
FB_DEV void stream_body(const Params& P, unsigned char* smem) {
  using O = math::Ops<A>;
  const int tid = dev::tid(), B = dev::bdim(), lane = tid & 31, warp = tid >> 5, nwarps = B >> 5;
  const int64_t T = P.T, C = P.C;
  const math::Needs needs(P.metrics, P.kind);
  const bool need_vr = (P.metrics & (1 << math::kVariationRatio)) != 0;
  A* rm = reinterpret_cast<A*>(smem + P.off_rm);
  A* rls = reinterpret_cast<A*>(smem + P.off_rls);
  double* red = reinterpret_cast<double*>(smem + P.off_red);
  int* cnt = reinterpret_cast<int*>(smem + P.off_args);  // C counters or T argmax indices
  const S* x = static_cast<const S*>(P.x);
  const double inv_T = P.inv_T;
  for (int64_t n = dev::bid(); n < P.N; n += dev::gdim()) {
    const S* base = x + n * P.sN;
    if (need_vr && P.cnt_mode) {
      for (int64_t c = tid; c < C; c += B) cnt[c] = 0;
    }
    dev::sync();
    // Pass A: warp per row.
    double h = 0;
    bool bad = false;
    int invalid = 0;  // a row with a non-finite max: the item's outputs but the vote are NaN
    for (int64_t t = warp; t < T; t += nwarps) {
      const S* row = base + t * P.sT;
      const int64_t sC = P.sC;
      const int kind = P.kind;
      const int ln = lane;
      auto z = [row, sC, kind, ln](int64_t i) { return to_acc<A>(dev::load_elem(row + (ln + 32 * i) * sC), kind); };
      A m, s, a;
      int64_t arg = -1;
      group_row<A, int64_t>(z, C, lane, lane, 32, needs.exps, need_vr, m, arg, s, a,
                            [](int64_t, const A&, const A&) {});
      if (lane == 0) {
        rm[t] = m;
        if (needs.exps) {
          const A ls = O::log(s);
          rls[t] = ls;
          h += static_cast<double>(math::row_entropy(ls, a, A(1) / s));
        }
        bad = bad || row_bad<A>(P, m, needs.exps, s);
        invalid |= !(m > -a_inf<A>() && m < a_inf<A>());
        if (need_vr) {
          const int64_t ai = arg < 0 ? 0 : (arg >= C ? C - 1 : arg);
          if (P.cnt_mode) {
            dev::atomic_add_shared(&cnt[ai], 1);
          } else {
            cnt[t] = static_cast<int>(ai);
          }
        }
      }
    }
    if (P.check) mark_bad_warp(P, bad, n);  // one atomic per warp with a bad row
    dev::sync();
    // Pass B: thread per class.
    double ent = 0, kl = 0, sd = 0, top1 = 0, top2 = 0;
    int modal = 0;
    if (needs.pbar) {
      const double lfl = static_cast<double>(math::Limits<A>::log_floor);
      for (int64_t c = tid; c < C; c += B) {
        const S* col = base + c * P.sC;
        A sp = A(0);
        for (int64_t t = 0; t < T; ++t) {
          const A lp = math::shifted<A, A>(to_acc<A>(dev::load_elem(col + t * P.sT), P.kind), rm[t]) - rls[t];
          sp = sp + O::exp(lp);
        }
        const double pb = static_cast<double>(sp) * inv_T;
        const double lpb = math::log_pbar<double>(pb);
        ent += math::neg_plogp<double>(pb, lpb);
        math::top2_update<double>(pb, top1, top2);
        if (needs.second) {
          const A lpf = static_cast<A>(lpb > lfl ? lpb : lfl);
          const A pbf = static_cast<A>(pb);
          A klc = A(0), var = A(0);
          for (int64_t t = 0; t < T; ++t) {
            const A lp = math::shifted<A, A>(to_acc<A>(dev::load_elem(col + t * P.sT), P.kind), rm[t]) - rls[t];
            const A p = O::exp(lp);
            klc = klc + math::kl_term(p, lp, lpf);
            const A dv = p - pbf;
            var = var + dv * dv;
          }
          kl += static_cast<double>(klc);
          sd += std::sqrt(static_cast<double>(var) * inv_T);
        }
      }
    }
    if (need_vr) {
      if (P.cnt_mode) {
        for (int64_t c = tid; c < C; c += B) modal = cnt[c] > modal ? cnt[c] : modal;
      } else {
        for (int64_t t = tid; t < T; t += B) {
          int k = 0;
          for (int64_t u = 0; u < T; ++u) k += cnt[u] == cnt[t];
          modal = k > modal ? k : modal;
        }
      }
    }
    // Block reduction in a fixed order: warps, then warp 0 over the warps' partials.
    ent = warp_sum(ent);
    kl = warp_sum(kl);
    sd = warp_sum(sd);
    h = warp_sum(h);
    modal = warp_imax(modal);
    warp_top2(top1, top2);
    invalid = warp_imax(invalid);
    if (lane == 0) {
      double* r = red + warp * 8;
      r[0] = ent;
      r[1] = kl;
      r[2] = sd;
      r[3] = h;
      r[4] = top1;
      r[5] = top2;
      r[6] = static_cast<double>(modal);
      r[7] = static_cast<double>(invalid);
    }
    dev::sync();
    if (warp == 0) {
      ent = kl = sd = h = top1 = top2 = 0;
      modal = 0;
      invalid = 0;
      if (lane < nwarps) {
        const double* r = red + lane * 8;
        ent = r[0];
        kl = r[1];
        sd = r[2];
        h = r[3];
        top1 = r[4];
        top2 = r[5];
        modal = static_cast<int>(r[6]);
        invalid = static_cast<int>(r[7]);
      }
      ent = warp_sum(ent);
      kl = warp_sum(kl);
      sd = warp_sum(sd);
      h = warp_sum(h);
      modal = warp_imax(modal);
      warp_top2(top1, top2);
      invalid = warp_imax(invalid);
      write_outputs<A>(P, n, lane, ent, h, kl, modal, sd, top1, top2, invalid != 0);
    }
    dev::sync();
  }
}

}  // namespace cuda
}  // namespace fastbald
