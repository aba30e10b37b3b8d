// The item (row) kernel of the CPU op: any T * C, one pool item at a time per thread.
//
// The SIMD lanes hold L consecutive MC samples (rows) of the item, so every per-row reduction over
// C is a lane-wise vector op with no horizontal shuffles, and the row math is the one of
// csrc/scores_math.h with V = Vectorized<A> (the CUDA kernels run the same functions with V = float,
// one row per thread). Each logit is read from memory once and exponentiated once; the item's
// probabilities and log-probabilities stay in a per-thread scratch (L1/L2) for the second, mean-KL
// pass. Only when T*C is too large for that scratch is the row recomputed (one more exp). No
// temporary grows with N. Small items (T * C <= kGroupLimit) go to the group kernel instead
// (group_kernel.h), whose lanes are items.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../scores_math.h"
#include "problem.h"

namespace fastbald {
namespace cpu {
namespace {

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
struct ItemKernel : Problem<scalar_t, A> {
  using P = Problem<scalar_t, A>;
  using P::x, P::N, P::T, P::C, P::sN, P::sT, P::sC, P::kind, P::metrics, P::check, P::tol,
      P::needs, P::out;
  using V = Vec<A>;
  using O = Ops<V>;
  using I = at::vec::int_same_size_t<A>;
  using VI = Vec<I>;
  static constexpr int64_t L = V::size();
  // Gather straight from the input when it is float32 / float64 (the accumulation type).
  static constexpr bool kGather = std::is_same_v<scalar_t, A>;

  bool store;      // keep the item's p and log p for the second pass (nb * C * L <= kStoreLimit)
  bool gather_ok;  // in-item offsets fit the gather's index type

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
    bool invalid = false;  // a row with a NaN or infinite max (check off: NaN scores but for VR)
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
        if (!(marr[l] > -std::numeric_limits<A>::infinity() &&
              marr[l] < std::numeric_limits<A>::infinity())) {
          if (check) {
            ok = false;
            break;
          }
          invalid = true;
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
    if (invalid) {  // as the group kernel and the CUDA kernels: every score but VR is NaN
      for (int k = 0; k < math::kNumMetrics; ++k) {
        if (k != math::kVariationRatio) put(k, std::numeric_limits<double>::quiet_NaN());
      }
      return true;
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

// Scores every item of p with the item kernel (at::parallel_for over items); a bad item (when
// p.check) is noted in first_bad and ends its thread's range.
template <class scalar_t, class A>
void score_items(const Problem<scalar_t, A>& p, FirstBad& first_bad) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t nb = (p.T + L - 1) / L;
  const bool store = nb * p.C * L <= kStoreLimit;
  using I = at::vec::int_same_size_t<A>;
  const bool gather_ok =
      (L - 1) * p.sT + (p.C - 1) * p.sC <= static_cast<int64_t>(std::numeric_limits<I>::max());
  const ItemKernel<scalar_t, A> k{p, store, gather_ok};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.T * p.C));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    Scratch<A> s(p.T, p.C, L, store);
    for (int64_t n = begin; n < end; ++n) {
      if (first_bad.after(n)) break;
      if (!k.run(n, s)) {
        first_bad.note(n);
        break;
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastbald
