// Item kernel of fastbald::pool_scores: small C known at compile time (2..16), contiguous NTC input
// (float, half, bfloat16; logits or log_probs). Design and instruction counts: NOTES.md section 2.4.
//
// A group of G lanes per pool item (G = 1: a thread per item; chosen by the planner for occupancy),
// lane l of the group taking the rows l, l + G, ... A block of B threads scores chunks of
// kk = B / G items (grid-stride over chunks):
//   1. load: the chunk (kk*T*C contiguous elements) is copied to a tile in shared memory with
//      coalesced 16-byte copies (cp.async: float, and half / bf16 with C even as the raw 2-byte
//      elements; half / bf16 with C odd converted to floats on the way), item j at j * stride;
//   2. one pass over the rows, per row in registers (csrc/scores_math.h, base-2 forms): max
//      (+ argmax vote), the shifted logits scaled to bits, one ex2 each, s, log2 s, 1/s; per class
//      S += p, V += (p - p0)^2 and the row's mean-KL terms sum_c p (lp2 - K_c), the lane's first
//      row giving the shifts (K_c, p0_c: see row());
//   3. group sums (xor shuffles) of S and the votes; log2 pbar; the lane's mean-KL, entropy and
//      variance sums from its shifted sums, group sums;
//   4. per item in float: the 7 outputs, written by lane 0 of the group (NaN where not asked for).
// No per-(item, class) or per-row shared arrays, no block reductions: one barrier after the load
// and one before the next chunk's load.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../scores_math.h"
#include "device_compat.h"
#include "kernels.h"  // mark_bad_warp
#include "plan.h"

namespace fastbald {
namespace cuda {

namespace item {

// ---- shared-memory and async-copy primitives of this kernel ----
#if defined(__CUDACC__)
// 16 bytes global -> shared without a register round trip (sm_80+ cp.async, L2 only: .cg), to the
// shared-window address sbase + boff (bytes) of a tile at sbase (smem_base). No memory clobber:
// the copies are ordered by cp_async_wait_all (which has one) and the barrier after it.
using SmemBase = unsigned;
FB_DEV SmemBase smem_base(void* tile) { return static_cast<unsigned>(__cvta_generic_to_shared(tile)); }
FB_DEV void cp_async16(SmemBase sbase, int boff, const void* gsrc) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sbase + static_cast<unsigned>(boff)),
               "l"(gsrc));
}
FB_DEV float bits_float(uint32_t u) { return __uint_as_float(u); }
// NW words at p (16-byte aligned when NW % 4 == 0, 8-byte when NW % 2 == 0).
template <int NW>
FB_DEV void load_words(const void* p, uint32_t (&w)[NW]) {
  if constexpr (NW % 4 == 0) {
    FB_UNROLL
    for (int i = 0; i < NW / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  } else if constexpr (NW % 2 == 0) {
    FB_UNROLL
    for (int i = 0; i < NW / 2; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[i];
      w[2 * i] = v.x;
      w[2 * i + 1] = v.y;
    }
  } else {
    FB_UNROLL
    for (int i = 0; i < NW; ++i) w[i] = reinterpret_cast<const uint32_t*>(p)[i];
  }
}
FB_DEV void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
FB_DEV void store4(float* dst, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
}
// A row of C floats at p (8-byte aligned when C is even, 16-byte aligned when C % 4 == 0).
template <int C>
FB_DEV void load_row(const float* p, float (&z)[C]) {
  if constexpr (C % 4 == 0) {
    FB_UNROLL
    for (int i = 0; i < C / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(p)[i];
      z[4 * i] = v.x;
      z[4 * i + 1] = v.y;
      z[4 * i + 2] = v.z;
      z[4 * i + 3] = v.w;
    }
  } else if constexpr (C % 2 == 0) {
    FB_UNROLL
    for (int i = 0; i < C / 2; ++i) {
      const float2 v = reinterpret_cast<const float2*>(p)[i];
      z[2 * i] = v.x;
      z[2 * i + 1] = v.y;
    }
  } else {
    FB_UNROLL
    for (int i = 0; i < C; ++i) z[i] = p[i];
  }
}
#else
// Host emulation: the same alignment contract, checked (a misaligned vector access traps).
inline void check_align(const void* p, uintptr_t a) {
  if (reinterpret_cast<uintptr_t>(p) % a != 0) __builtin_trap();
}
using SmemBase = unsigned char*;
inline SmemBase smem_base(void* tile) { return static_cast<unsigned char*>(tile); }
inline void cp_async16(SmemBase sbase, int boff, const void* gsrc) {
  check_align(sbase + boff, 16);
  check_align(gsrc, 16);
  std::memcpy(sbase + boff, gsrc, 16);
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <int NW>
inline void load_words(const void* p, uint32_t (&w)[NW]) {
  check_align(p, NW % 4 == 0 ? 16 : (NW % 2 == 0 ? 8 : 4));
  std::memcpy(w, p, 4 * NW);
}
inline void cp_async_wait_all() {}
inline void store4(float* dst, float a, float b, float c, float d) {
  check_align(dst, 16);
  dst[0] = a;
  dst[1] = b;
  dst[2] = c;
  dst[3] = d;
}
template <int C>
inline void load_row(const float* p, float (&z)[C]) {
  check_align(p, C % 4 == 0 ? 16 : (C % 2 == 0 ? 8 : 4));
  for (int i = 0; i < C; ++i) z[i] = p[i];
}
#endif

}  // namespace item

template <class S, int C>
struct ItemKernel {
  // The tile's element: the raw 2-byte input for half / bf16 with C even (a row is then C / 2
  // whole words, converted when read), else float (converted on the way in).
  static constexpr bool kRaw = sizeof(S) == 2 && C % 2 == 0;
  using TE = std::conditional_t<kRaw, S, float>;
  static constexpr int VW = 16 / static_cast<int>(sizeof(S));  // elements per 16-byte load
  static constexpr int U = 4;                                   // loads in flight per thread
  static constexpr int NP = (C + 1) / 2;                        // packed vote counters
  static constexpr int kVoteBits = 64 / C < 16 ? 64 / C : 16;   // bits per class in a row block
  static constexpr int kVoteRows = (1 << kVoteBits) - 1;          // rows per lane between unpacks

  // ---- 1. load the chunk [n0, n0 + kc) into the float tile ----
  FB_DEV static void load(const Params& P, const S* x, int64_t n0, int kc, TE* tile, int tid, int B) {
    const int TC = P.it_tc, stride = P.it_stride;
    const S* src = x + n0 * P.sN;
    if (P.it_vec) {
      // Vector w of the chunk: item j = w / nvi (multiply-high), shared offset w * VW + j * pad.
      // The plan's values are copied to registers first (they are not reloaded per vector).
      const int nvi = P.it_nvi, total = kc * nvi, pad = stride - TC;
      const FastDiv dnvi = P.div_nvi;
      if constexpr (sizeof(S) == 4 || kRaw) {
        // float, or the raw 2-byte elements: 16-byte copies, no conversion.
        const item::SmemBase sb = item::smem_base(tile);
        for (int w0 = tid; w0 < total; w0 += U * B) {
          // Unpredicated: past the end, a thread copies the chunk's last vector again (the same
          // bytes to the same place), so the address arithmetic is not sunk into branches.
          FB_UNROLL
          for (int u = 0; u < U; ++u) {
            const int w = w0 + u * B < total ? w0 + u * B : total - 1;
            const int off = w * VW + static_cast<int>(dnvi.div(static_cast<uint32_t>(w))) * pad;
            item::cp_async16(sb, off * static_cast<int>(sizeof(TE)), src + static_cast<int64_t>(w) * VW);
          }
        }
        item::cp_async_wait_all();
      } else {
        // Unpredicated like the float path: past the end, a thread loads and stores the chunk's
        // last vector again (the same bytes to the same place).
        for (int w0 = tid; w0 < total; w0 += U * B) {
          S buf[U][VW];
          int wc[U];
          FB_UNROLL
          for (int u = 0; u < U; ++u) {
            wc[u] = w0 + u * B < total ? w0 + u * B : total - 1;
            dev::load16(src + static_cast<int64_t>(wc[u]) * VW, buf[u]);
          }
          FB_UNROLL
          for (int u = 0; u < U; ++u) {
            float* dst = tile + wc[u] * VW + static_cast<int>(dnvi.div(static_cast<uint32_t>(wc[u]))) * pad;
            FB_UNROLL
            for (int i = 0; i < VW; i += 4) {
              item::store4(dst + i, static_cast<float>(buf[u][i]), static_cast<float>(buf[u][i + 1]),
                           static_cast<float>(buf[u][i + 2]), static_cast<float>(buf[u][i + 3]));
            }
          }
        }
      }
    } else {
      // Unaligned start or T*C not a multiple of a vector: one element per thread-iteration.
      const int total = kc * TC;
      for (int i = tid; i < total; i += B) {
        const int j = P.div_tc(i);
        tile[j * stride + (i - j * TC)] = static_cast<TE>(dev::load_elem(src + i));
      }
    }
  }

  // Floor of the mean-KL shift K (bits), as the strip kernel's kShiftFloor (strip_kernel.h): a
  // reference row that confidently disagrees with the others (lp2 ~ -40 .. -125 of their class)
  // would otherwise make every term p (lp2 - K) ~ |K| p and U cancel against S (log2 pbar - K).
  static constexpr float kShiftFloor = -8.0f;

  // One row of a lane (C logits in registers, from the float tile): the max (NaN-propagating) and
  // argmax, d2 = max(z log2 e - m log2 e, exp_floor log2 e), e = 2^d2, s = sum e, log2 s, 1/s;
  // with p = e / s and lp2 = d2 - log2 s the accumulators
  //   S_c += p,   V_c += (p - p0_c)^2,   u += sum_c p (lp2 - K_c)
  // where the mean-KL shift K_c = Kd_c - ls0 (ls0: log2 s of the lane's first row, Kd_c: its d2
  // floored at ls0 + kShiftFloor, i.e. K_c = its lp2 floored at kShiftFloor bits) and p0_c its p:
  // the first row (kFirst) sets them. The mean-KL needs only the class sum of U, so it is summed
  // per row, in the exponent's units: sum_c p (lp2 - K_c) = (1/s) sum_c e (d2 - Kd_c) - (log2 s -
  // ls0) (sum_c p = 1): one FADD and one FFMA per logit, no per-class U. Identical rows give
  // d2 = Kd_c and log2 s = ls0 exactly (u = 0). Returns the argmax (the row's vote); an invalid row
  // (max NaN / +inf / -inf) makes s, hence every sum, NaN.
  // A row of the tile as C floats.
  FB_DEV static void load_z(const TE* rowp, float (&z)[C]) {
    if constexpr (kRaw) {
      uint32_t w[C / 2];
      item::load_words<C / 2>(rowp, w);
      FB_UNROLL
      for (int i = 0; i < C / 2; ++i) {
        if constexpr (StripIsBf16<S>::value) {
          z[2 * i] = item::bits_float(w[i] << 16);
          z[2 * i + 1] = item::bits_float(w[i] & 0xffff0000u);
        } else {
          S h[2];
          std::memcpy(h, &w[i], 4);
          z[2 * i] = static_cast<float>(h[0]);
          z[2 * i + 1] = static_cast<float>(h[1]);
        }
      }
    } else {
      item::load_row<C>(rowp, z);
    }
  }

  template <bool kFirst>
  FB_DEV static int row(const TE* rowp, float (&Kd)[C], float (&P0)[C], float& ls0, float (&Sa)[C],
                        float (&Va)[C], float& Ut) {
    using namespace math;
    float z[C], e[C];
    load_z(rowp, z);
    int arg = 0;
    const float m = row_max_arg_n<C, true>(z, arg);
    float s, a2;
    row_exp2_n<C, false>(z, m, e, s, a2);
    if (row_nonfinite(m)) s = std::numeric_limits<float>::quiet_NaN();
    const float inv = fast_rcp(s), ls2 = fast_log2(s);
    if constexpr (kFirst) {
      ls0 = ls2;
      FB_UNROLL
      for (int c = 0; c < C; ++c) {
        Kd[c] = std::fmax(z[c], ls2 + kShiftFloor);
        P0[c] = e[c] * inv;
      }
    }
    float u = 0.0f;
    FB_UNROLL
    for (int c = 0; c < C; ++c) {
      u = std::fma(e[c], z[c] - Kd[c], u);
      Sa[c] = std::fma(e[c], inv, Sa[c]);
      const float dv = std::fma(e[c], inv, -P0[c]);
      Va[c] = std::fma(dv, dv, Va[c]);
    }
    Ut += std::fma(u, inv, ls0 - ls2);
    return arg;
  }

  // Adds the F-bit vote fields of acc to the 16-bit counters cnt[].
  FB_DEV static void unpack(uint64_t acc, uint32_t (&cnt)[NP]) {
    FB_UNROLL
    for (int c = 0; c < C; ++c) {
      const uint32_t v = static_cast<uint32_t>(acc >> (kVoteBits * c)) & kVoteRows;
      cnt[c / 2] += v << (16 * (c & 1));
    }
  }

  // ---- 2.-5. one item per group of G lanes ----
  // One pass over the item's rows (no write-back, no second pass): lane l of the group streams
  // its rows l, l + G, ... from the tile through row(); with its first row as the reference
  // (K_c, p0_c) and n_l rows, per class (bits), with U = the lane's sum of u:
  //   sum_c sum_t p (lp2 - log2 pbar_c) = U - sum_c S_c (log2 pbar_c - K_c)
  //   sum_t (p - pbar_c)^2              = V_c - 2 d (S_c - n_l p0_c) + n_l d^2,   d = pbar_c - p0_c
  //   sum_t sum_c p lp2                 = U + sum_c K_c S_c   (minus the lane's row entropies)
  // exactly; in floating point the shifted sums cancel only in proportion to the spread of the
  // lane's rows around its first one (identical samples: U = 0 exactly where lp2 >= -8, V_c ~ (ulp p)^2).
  FB_DEV static void items(const Params& P, TE* tile, int64_t n0, int kc, int tid) {
    using namespace math;
    const int G = P.row_lanes;
    const int l = tid & (G - 1);
    const int j = tid >> P.it_glog2;
    const bool active = j < kc;
    const int T = static_cast<int>(P.T);
    const int Te = active ? T : 0;  // an idle group still takes part in the shuffles
    const TE* it = tile + (active ? j : 0) * P.it_stride;
    const float inv_T = static_cast<float>(P.inv_T);

    float Kd[C], P0[C], Sa[C], Va[C];
    float ls0 = 0.0f, Ut = 0.0f;
    uint32_t cnt[NP];
    FB_UNROLL
    for (int c = 0; c < C; ++c) Kd[c] = P0[c] = Sa[c] = Va[c] = 0.0f;
    FB_UNROLL
    for (int i = 0; i < NP; ++i) cnt[i] = 0u;
    // Votes: one 64-bit add per row into F-bit fields of the lane's class counts (F = 64 / C
    // bits, so at most R = 2^F - 1 rows per field), unpacked into 16-bit fields of cnt[] after
    // every R rows of the lane. The lane's first row (the shifts) is the first vote of the first
    // block.
    uint64_t acc = 0;
    int t = l, cap = kVoteRows;
    if (l < Te) {
      acc = uint64_t(1) << (kVoteBits * row<true>(it + l * C, Kd, P0, ls0, Sa, Va, Ut));
      t += G;
      cap -= 1;
    }
    for (;;) {
      const int t1 = Te < t + G * cap ? Te : t + G * cap;
      for (; t < t1; t += G) {
        acc += uint64_t(1) << (kVoteBits * row<false>(it + t * C, Kd, P0, ls0, Sa, Va, Ut));
      }
      unpack(acc, cnt);
      if (t >= Te) break;
      acc = 0;
      cap = kVoteRows;
    }
    const float nl = static_cast<float>(l < Te ? (Te - l + G - 1) >> P.it_glog2 : 0);  // the lane's rows
    // Group sums (xor butterflies, every lane gets the sums) of S and the votes; log2 pbar.
    float pb[C];
    FB_UNROLL
    for (int c = 0; c < C; ++c) pb[c] = Sa[c];
    for (int o = G >> 1; o > 0; o >>= 1) {
      FB_UNROLL
      for (int c = 0; c < C; ++c) pb[c] += dev::shfl_xor(pb[c], o);
      FB_UNROLL
      for (int i = 0; i < NP; ++i) cnt[i] += dev::shfl_xor(cnt[i], o);
    }
    // An invalid row made its item's sums NaN: flag the item; its softmax-based outputs are NaN
    // (the CPU op's result with check_finite=False; the variation ratio still counts its vote).
    const bool item_bad = pb[0] != pb[0];
    FB_UNROLL
    for (int c = 0; c < C; ++c) pb[c] *= inv_T;
    float lpb[C];
    FB_UNROLL
    for (int c = 0; c < C; ++c) lpb[c] = log2_pbar(pb[c]);
    // The lane's mean-KL, sum of row entropies (negated) and per-class squared deviations from
    // pbar, then their group sums.
    float kl = Ut, hn = Ut;
    FB_UNROLL
    for (int c = 0; c < C; ++c) {
      const float K = Kd[c] - ls0;
      kl -= Sa[c] * (lpb[c] - K);
      hn = std::fma(K, Sa[c], hn);
      const float d = pb[c] - P0[c];
      const float q = std::fma(-nl, P0[c], Sa[c]);  // sum_t (p - p0)
      Va[c] = std::fma(d, std::fma(nl, d, -2.0f * q), Va[c]);
    }
    for (int o = G >> 1; o > 0; o >>= 1) {
      kl += dev::shfl_xor(kl, o);
      hn += dev::shfl_xor(hn, o);
      FB_UNROLL
      for (int c = 0; c < C; ++c) Va[c] += dev::shfl_xor(Va[c], o);
    }
    // Per item: entropy = -ln 2 sum_c pbar log2 pbar (log2 pbar is floored, so pbar = 0 adds 0),
    // mean_std = sqrt(1/T) sum_c sqrt(T var_c) / C.
    float ent = 0.0f, top1 = 0.0f, top2 = 0.0f, sd = 0.0f;
    FB_UNROLL
    for (int c = 0; c < C; ++c) {
      ent = std::fma(pb[c], lpb[c], ent);
      top2_update_nb(pb[c], top1, top2);
      sd += fast_sqrt(std::fmax(Va[c], 0.0f));
    }
    uint32_t modal = 0;
    FB_UNROLL
    for (int i = 0; i < NP; ++i) {
      const uint32_t lo = cnt[i] & 0xffffu, hi = cnt[i] >> 16;
      modal = lo > modal ? lo : modal;
      modal = hi > modal ? hi : modal;
    }
    // One atomic per warp with a bad item (warp-aggregated; every lane of the warp is here).
    if (P.check) mark_bad_warp(P, item_bad && active && l == 0, n0 + j);
    if (active && l == 0) {
      const float klv = kl * Base2<float>::ln2 * inv_T;
      const float hv = -hn * Base2<float>::ln2 * inv_T;
      const float v[kNumMetrics] = {-ent * Base2<float>::ln2,
                                    hv > 0.0f ? hv : 0.0f,
                                    klv > 0.0f ? klv : 0.0f,
                                    1.0f - static_cast<float>(modal) * inv_T,
                                    sd * fast_sqrt(inv_T) * static_cast<float>(P.inv_C),
                                    top1 - top2,
                                    1.0f - top1};
      float* out = static_cast<float*>(P.out) + (n0 + j);
      // The metrics asked for; a bad item's softmax-based outputs are NaN (its votes still count).
      const int mk = item_bad ? P.metrics & (1 << kVariationRatio) : P.metrics;
      constexpr float nan = std::numeric_limits<float>::quiet_NaN();
      FB_UNROLL
      for (int k = 0; k < kNumMetrics; ++k) out[k * P.N] = (mk >> k) & 1 ? v[k] : nan;
    }
  }

  FB_DEV static void run(const Params& P, unsigned char* smem) {
    const int tid = dev::tid(), B = dev::bdim();
    TE* tile = reinterpret_cast<TE*>(smem);
    const S* x = static_cast<const S*>(P.x);
    for (int64_t chunk = dev::bid(); chunk < P.nchunks; chunk += dev::gdim()) {
      const int64_t n0 = chunk * P.kk;
      const int kc = static_cast<int>(P.N - n0 < P.kk ? P.N - n0 : P.kk);
      load(P, x, n0, kc, tile, tid, B);
      dev::sync();
      items(P, tile, n0, kc, tid);
      dev::sync();
    }
  }
};

template <class S, int C>
FB_DEV void item_body(const Params& P, unsigned char* smem) {
  ItemKernel<S, C>::run(P, smem);
}

// item_body for the runtime C (the host emulator; the CUDA launch has its own switch over
// FB_ITEM_CLASSES). float64 input never takes this path.
template <class S>
FB_DEV void item_dispatch(const Params& P, unsigned char* smem) {
  if constexpr (sizeof(S) != 8) {
    switch (P.C) {
#define FB_ITEM_CASE(c) \
  case c:               \
    item_body<S, c>(P, smem); \
    break;
      FB_ITEM_CLASSES(FB_ITEM_CASE)
#undef FB_ITEM_CASE
      default:
        break;
    }
  }
}

}  // namespace cuda
}  // namespace fastbald
