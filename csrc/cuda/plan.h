// Launch parameters of the CUDA pool-score kernels and the host code that chooses them (kernel,
// load mode, items per block, shared-memory layout). Plain C++ (no torch, no CUDA runtime): the
// CUDA glue (scores_cuda.cu) and the host emulator (emu/emu_main.cpp) use the same planner.
// See NOTES.md for the design.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../scores_math.h"

namespace fastbald {
namespace cuda {

// n / d for 0 <= n < 2^31, 1 <= d < 2^31 with a multiply-high and a shift (Granlund-Montgomery,
// as in PyTorch's IntDivider).
struct FastDiv {
  uint32_t d;
  uint32_t m;
  uint32_t s;
  FB_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, m);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (t + n) >> s;
  }
  FB_HD int operator()(int n) const { return static_cast<int>(div(static_cast<uint32_t>(n))); }
};

inline FastDiv make_fastdiv(int64_t d) {
  FastDiv f{};
  if (d < 1) d = 1;
  f.d = static_cast<uint32_t>(d);
  uint32_t s = 0;
  while (s < 31 && (uint64_t(1) << s) < static_cast<uint64_t>(d)) ++s;
  f.s = s;
  f.m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - uint64_t(d))) / uint64_t(d) + 1);
  return f;
}

enum Path : int { kTilePath = 0, kStreamPath = 1, kItemPath = 2, kStripPath = 3 };

// Item kernel (item_kernel.h): the class counts it is instantiated for (each costs ~7 s of nvcc
// time per architecture and input type); other C take the tile kernel.
#define FB_ITEM_CLASSES(X) X(2) X(3) X(4) X(5) X(6) X(8) X(10) X(16)
constexpr int kItemMaxC = 16;
inline bool item_has_classes(int64_t C) {
  switch (C) {
#define FB_ITEM_HAS(c) case c:
    FB_ITEM_CLASSES(FB_ITEM_HAS)
#undef FB_ITEM_HAS
    return true;
    default:
      return false;
  }
}

// Strip kernel (strip_kernel.h): (NV, mode) configurations, NV 4-class vectors per lane (the
// lane's classes and accumulators in registers); mode 0: G <= 16 lanes per item, 1: a warp per
// item, 2: a whole block per item (C > 1024). Each costs ~10-20 s of nvcc time per architecture
// and input type.
#define FB_STRIP_CONFIGS(X) X(4, 0) X(7, 0) X(8, 1) X(10, 2)
constexpr int kStripMaxC = 4 * 10 * 256;
// Which 2-byte storage types are bfloat16 (the strip and item kernels convert them by a shift and
// a mask per element instead of the type's operator). Specialised by the CUDA glue
// (c10::BFloat16) and the emulator.
template <class S>
struct StripIsBf16 {
  static constexpr bool value = false;
};

constexpr int kStripStride = 256;  // thread stride of its lane-private shared arrays (>= block)

// How the tile kernel copies a chunk of items from global to shared memory.
enum LoadMode : int {
  kLoadFlat = 0,     // contiguous NTC: the chunk is one span (16-byte vectors, head/tail per chunk)
  kLoadTnc = 1,      // contiguous TNC: for each t, the chunk's items are one span of kk*C; 16-byte
                     // vectors when all spans share one alignment (planned on the host)
  kLoadGeneric = 2,  // any strides: one element per thread-iteration, in the order of gen_order
};
// Loop order of the generic load, innermost last: the smallest stride innermost so that
// consecutive threads read neighbouring addresses.
enum GenOrder : int { kOrderJTC = 0, kOrderJCT = 1, kOrderTJC = 2 };

struct Params {
  // Filled by the caller.
  const void* x;
  void* out;                  // [7, N] of A
  unsigned long long* flag;   // ~0 - (first bad item), 0 if none; nullptr when !check
  // Problem.
  int64_t N, T, C, sN, sT, sC;
  int kind, metrics, check;
  double tol;
  double inv_T, inv_C;  // 1 / T, 1 / C (no double division on the device)
  // Plan.
  int path;
  int block;            // threads per block (multiple of 32)
  int64_t grid;         // blocks (grid-stride over chunks / items)
  int64_t smem;         // dynamic shared memory bytes
  // Tile kernel.
  int64_t nchunks;
  int kk;               // items per chunk
  int Cp;               // row stride of the shared tile (C or C + 1)
  int load_mode;
  int gen_order;
  int tnc_rows;         // shared row of (item j, sample t): t * kk + j (1) or j * T + t (0)
  int row_lanes;        // G: lanes per row in the rows phase (1: a thread per row ... 32: a warp)
  int two_arrays;       // 1: e stored next to d; 0: p recomputed as exp(d - log s)
  int pad;              // span loads: Cp == C + 1 (shared offset q + q / C)
  int col_lanes;        // threads per (item, class) pair in the column phase (power of 2 <= 32)
  int col_lanes_log2;
  int tnc_head, tnc_nv, tnc_nsc;  // kLoadTnc: per span, scalar head, 16-byte vectors, scalars
  FastDiv div_c, div_t, div_kk, div_nv, div_nsc;
  int off_d, off_e, off_rls, off_rinv, off_rh, off_cent, off_ckl, off_cstd, off_cpb, off_cnt;
  // Stream kernel.
  int cnt_mode;         // 1: C vote counters in shared memory; 0: T argmax indices
  int off_rm, off_args, off_red;
  // Item kernel (row_lanes = G lanes per item, kk = block / G items per chunk, nchunks).
  int it_tc;            // T * C
  int it_raw;           // 1: the tile holds the raw 2-byte elements (half / bf16 with C even), 0: floats
  int it_stride;        // tile elements between consecutive items (>= T * C, a 16-byte multiple)
  int it_vec;           // 16-byte loads (aligned start, T * C a multiple of 16 bytes of input)
  int it_nvi;           // 16-byte vectors per item
  int it_glog2;         // log2 G
  int it_conflict;      // planned shared-memory conflict degree of the row reads (1: none)
  FastDiv div_nvi, div_tc;
  // Strip kernel (row_lanes = G lanes per item, it_glog2 = log2 G, kk = B / G groups per block).
  int st_nv;            // 4-class vectors per lane
  int st_mode;          // 0: G <= 16; 1: G = 32 (REDUX); 2: G = the block (cross-warp reductions)
  int st_off_ref, st_off_cnt, st_off_red;
};

struct DeviceLimits {
  int64_t smem_optin = 227 * 1024;   // per block, opt-in maximum
  int64_t smem_per_sm = 228 * 1024;
  int num_sms = 132;
};

// Test hooks (the emulator and the GPU tests use them to reach every path with small inputs).
struct PlanOverrides {
  int force_path = -1;          // kTilePath / kStreamPath / kItemPath / kStripPath
  int force_generic = 0;        // tile kernel: element-wise load whatever the strides
  int force_one_array = 0;      // tile kernel: never store e
  int64_t tile_budget = 0;      // tile kernel: shared-memory budget (bytes) instead of the defaults
  int block = 0;                // threads per block
  int64_t max_grid = 0;         // cap on the grid (exercises the grid-stride loops)
  int force_args = 0;           // stream kernel: argmax indices instead of counters
  int force_kk = 0;             // tile kernel: items per chunk (if it fits)
  int row_lanes = 0;            // tile kernel: lanes per row (power of 2 <= 32); item kernel
                                // (force_path = kItemPath): lanes per item
};

namespace plan_detail {
inline int64_t a16(int64_t b) { return (b + 15) / 16 * 16; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct TileLayout {
  int64_t off_d, off_e, off_rls, off_rinv, off_rh, off_cent, off_ckl, off_cstd, off_cpb, off_cnt,
      total;
};
inline TileLayout tile_layout(int64_t k, int64_t T, int64_t C, int64_t Cp, int64_t acc, bool two) {
  TileLayout L{};
  int64_t o = 0;
  L.off_d = o;
  o += a16(k * T * Cp * acc);
  L.off_e = o;
  if (two) o += a16(k * T * Cp * acc);
  L.off_rls = o;
  o += a16(k * T * acc);
  L.off_rinv = o;
  o += a16(k * T * acc);
  L.off_rh = o;
  o += a16(k * T * acc);
  L.off_cent = o;
  o += a16(k * C * acc);
  L.off_ckl = o;
  o += a16(k * C * acc);
  L.off_cstd = o;
  o += a16(k * C * acc);
  L.off_cpb = o;
  o += a16(k * C * acc);
  L.off_cnt = o;
  o += a16(k * C * 4);
  L.total = o;
  return L;
}

inline int col_lanes_for(int64_t k, int64_t T, int64_t C, int block) {
  int lanes = 1;
  while (lanes < 32 && k * C * lanes * 2 <= block && lanes * 2 <= T) lanes *= 2;
  return lanes;
}

// Relative cost (instruction issue slots per thread slot, from the SASS of the loops: NOTES.md)
// of one chunk of k items with G lanes per row.
inline double chunk_cost(int64_t k, int64_t T, int64_t C, int block, int G, const math::Needs& needs) {
  int lgG = 0;
  while ((1 << lgG) < G) ++lgG;
  // per lane: ~25 per logit (max, shifted, exp, sums, stores), ~60 per row (log, 1/s, stats,
  // vote), 4 shuffle steps of ~3 per level of the group tree.
  const double row = double(cdiv(C, G)) * 25.0 + 60.0 + 12.0 * lgG;
  const double rows = double(cdiv(k * T * G, block)) * row;
  double cols = 0;
  if (needs.pbar) {
    const int lanes = col_lanes_for(k, T, C, block);
    int lg = 0;
    while ((1 << lg) < lanes) ++lg;
    cols = double(cdiv(k * C * lanes, block)) *
           (double(cdiv(T, lanes)) * (needs.second ? 20.0 : 6.0) + 12.0 * lg + 60.0);
  }
  const int64_t nwarps = block / 32;
  const double fixed = 300.0 + double(cdiv(k, nwarps)) * (double(cdiv(C, 32) + cdiv(T, 32)) * 8 + 80);
  return rows + cols + fixed;
}

// Row stride of the shared tile for G lanes per row: the rows that the groups of one warp read at
// the same time fall on distinct banks when Cp / G is odd (G < 32). With a thread per row (G = 1)
// only strides with a factor 4 are padded, so C = 10 (2-way at worst) keeps a plain copy as load.
inline int64_t row_stride(int64_t C, int G) {
  if (G >= 32) return C;
  if (G == 1) return C % 4 == 0 ? C + 1 : C;
  int64_t Cp = C;
  while (Cp % G != 0 || (Cp / G) % 2 == 0) ++Cp;
  return Cp;
}
}  // namespace plan_detail

// ---- item kernel planning ----
namespace plan_detail {
// Conflict degree (the most distinct 4-byte words any bank serves in one shared-memory wavefront)
// of the item kernel's row reads: thread tid reads, at the same time as the others, w words from
// (tid / G) * stride + (tid % G) * rw (a warp; stride and the row's rw in words; w = the row's
// vector width, 4, 2 or 1 words; wavefronts of 32 / w threads).
inline int item_conflict(int64_t stride, int G, int64_t rw) {
  const int w = rw % 4 == 0 ? 4 : (rw % 2 == 0 ? 2 : 1);
  const int per = 32 / w;
  int worst = 1;
  for (int ph = 0; ph < 32; ph += per) {
    int64_t words[32 * 4];
    int nw = 0;
    for (int tid = ph; tid < ph + per; ++tid) {
      const int64_t base = (tid / G) * stride + (tid % G) * rw;
      for (int i = 0; i < w; ++i) words[nw++] = base + i;
    }
    for (int b = 0; b < 32; ++b) {
      int64_t seen[32 * 4];
      int ns = 0;
      for (int k = 0; k < nw; ++k) {
        if (words[k] % 32 != b) continue;
        bool dup = false;
        for (int u = 0; u < ns; ++u) dup = dup || seen[u] == words[k];
        if (!dup) seen[ns++] = words[k];
      }
      worst = ns > worst ? ns : worst;
    }
  }
  return worst;
}
}  // namespace plan_detail

// The item kernel when it applies: float/half/bf16 logits or log-probs, C in FB_ITEM_CLASSES,
// contiguous NTC, an item tile that fits, and no tile-kernel test override. The tile holds floats,
// or for half / bf16 with C even the raw 2-byte elements (converted when a row is read: half the
// shared memory, so one lane per item reaches the occupancy target). G (lanes per item) is the
// smallest power of 2 that gives >= 16 resident warps per SM (shared memory permitting) with at
// most 4-way bank conflicts of the row reads (they cost shared-memory wavefronts, not issue
// slots, while the per-item code issues once per lane: G lanes cost G times its share per logit;
// NOTES.md 2.4); the item stride is the smallest padding of T*C (a 16-byte multiple) with the
// least conflicts for that G.
inline bool plan_item(Params& P, int64_t elem_size, int64_t acc_size, const DeviceLimits& lim,
                      const PlanOverrides& ov) {
  using namespace plan_detail;
  const int64_t N = P.N, T = P.T, C = P.C;
  const bool forced = ov.force_path == kItemPath;
  if (!forced && (ov.force_path >= 0 || ov.force_generic || ov.force_one_array || ov.tile_budget > 0 ||
                  ov.force_kk > 0 || ov.row_lanes > 0))
    return false;
  if (acc_size != 4 || elem_size == 8 || P.kind == math::kProbs || !item_has_classes(C)) return false;
  const bool contiguous = P.sC == 1 && (T == 1 || P.sT == C) && (N == 1 || P.sN == T * C);
  if (!contiguous || T * C > (int64_t(1) << 20) || T > 65535) return false;
  const int B = P.block;
  const int64_t TC = T * C;
  const bool raw = elem_size == 2 && C % 2 == 0;
  const int64_t te = raw ? 2 : 4;        // bytes per tile element
  const int64_t sv = 16 / te;             // tile elements per 16 bytes (the stride's multiple)
  int best_G = 0;
  int64_t best_stride = 0, best_res = -1;
  int best_conf = 1 << 30;
  for (int G = 1; G <= 32 && G <= B; G *= 2) {
    if (forced && ov.row_lanes > 0 && G != ov.row_lanes) continue;
    const int64_t kk = B / G;
    int64_t stride = 0;
    int conf = 1 << 30;
    for (int64_t s = (TC + sv - 1) / sv * sv; s < (TC + sv - 1) / sv * sv + 16 * sv; s += sv) {
      const int c = item_conflict(s * te / 4, G, C * te / 4);
      if (c < conf) {
        conf = c;
        stride = s;
      }
      if (c == 1) break;
    }
    const int64_t smem = kk * stride * te;
    if (smem > lim.smem_optin) continue;
    const int64_t blocks = std::min<int64_t>(lim.smem_per_sm / (smem + 1024), 2048 / B);
    const int64_t res = std::min<int64_t>(blocks * B, 512);  // resident threads per SM (target 512)
    // The first G that reaches the target with at most 4-way conflicts; else the most residents,
    // then the fewest conflicts, then the smallest G.
    if (best_G == 0 || res > best_res || (res == best_res && conf < best_conf)) {
      best_G = G;
      best_stride = stride;
      best_res = res;
      best_conf = conf;
    }
    if (res >= 512 && conf <= 4) break;
  }
  if (best_G == 0) return false;
  const int G = best_G;
  const int64_t kk = B / G;
  P.path = kItemPath;
  P.row_lanes = G;
  P.it_glog2 = 0;
  while ((1 << P.it_glog2) < G) ++P.it_glog2;
  P.kk = static_cast<int>(kk);
  P.Cp = static_cast<int>(C);
  P.it_tc = static_cast<int>(TC);
  P.it_raw = raw ? 1 : 0;
  P.it_stride = static_cast<int>(best_stride);
  P.it_conflict = best_conf;
  const int64_t vw = 16 / elem_size;
  P.it_vec = (reinterpret_cast<uintptr_t>(P.x) % 16 == 0 && TC % vw == 0) ? 1 : 0;
  P.it_nvi = static_cast<int>(TC / vw);
  P.div_nvi = make_fastdiv(std::max<int64_t>(1, P.it_nvi));
  P.div_tc = make_fastdiv(TC);
  P.smem = kk * best_stride * te;
  P.nchunks = cdiv(N, kk);
  const int64_t max_grid = ov.max_grid > 0 ? ov.max_grid : (int64_t(1) << 30);
  P.grid = std::max<int64_t>(1, std::min(P.nchunks, max_grid));
  P.cnt_mode = -1;
  return true;
}

// The strip kernel when it applies: float/half/bf16 logits or log-probs, contiguous NTC, C a
// multiple of 4 up to kStripMaxC, rows 4-element aligned, and no tile-kernel test override. For
// each configuration of FB_STRIP_CONFIGS the smallest G (a power of 2 up to 16 for mode 0, 32 for
// mode 1, the block size 64 to 256 for mode 2) whose G * 4 * NV lanes' classes cover C; the least modelled cost per logit wins (issue
// slots per lane-class from the SASS of the row loop, NOTES.md 2.5, times the fraction of the
// lanes' classes past C).
inline bool plan_strip(Params& P, int64_t elem_size, int64_t acc_size, const DeviceLimits& lim,
                       const PlanOverrides& ov) {
  using namespace plan_detail;
  const int64_t N = P.N, T = P.T, C = P.C;
  const bool forced = ov.force_path == kStripPath;
  if (!forced && (ov.force_path >= 0 || ov.force_generic || ov.force_one_array || ov.tile_budget > 0 ||
                  ov.force_kk > 0 || ov.row_lanes > 0))
    return false;
  if (acc_size != 4 || elem_size == 8 || P.kind == math::kProbs) return false;
  if (C % 4 != 0 || C > kStripMaxC || T > (int64_t(1) << 30)) return false;
  const bool contiguous = P.sC == 1 && (T == 1 || P.sT == C) && (N == 1 || P.sN == T * C);
  if (!contiguous || reinterpret_cast<uintptr_t>(P.x) % (4 * elem_size) != 0) return false;
  struct Cfg {
    int nv;
    int mode;
  };
  const Cfg cfgs[] = {
#define FB_STRIP_CFG(nv, mode) {nv, mode},
      FB_STRIP_CONFIGS(FB_STRIP_CFG)
#undef FB_STRIP_CFG
  };
  double best = 1e300;
  int best_nv = 0, best_G = 0, best_B = 0, best_mode = 0;
  for (const Cfg& cf : cfgs) {
    const int K = 4 * cf.nv;
    const bool blk = cf.mode == 2;
    int G = 0, B = 0;
    if (!blk) {
      B = P.block;
      for (int g = cf.mode == 1 ? 32 : 1; g <= (cf.mode == 1 ? 32 : 16) && g <= B; g *= 2) {
        if (ov.row_lanes > 0 && g != ov.row_lanes) continue;
        if (int64_t(g) * K >= C) {
          G = g;
          break;
        }
      }
    } else {
      for (int b = 64; b <= 256; b *= 2) {
        if (ov.block > 0 && b != ov.block) continue;
        if (ov.row_lanes > 0 && b != ov.row_lanes) continue;
        if (int64_t(b) * K >= C) {
          G = B = b;
          break;
        }
      }
    }
    if (G == 0) continue;
    // Lane-private: the shifts and p0 of the first sample, the outer sums S_c (strip_kernel.h
    // flush_sums), the vote counters; kBlock: the warps' partials.
    const int64_t smem = a16(3 * int64_t(K) * kStripStride * 4) + a16(int64_t(K) * kStripStride * 4) + (blk ? 2048 : 0);
    if (smem > lim.smem_optin) continue;
    int lgw = 0;
    while ((1 << lgw) < std::min(G, 32)) ++lgw;
    // Per lane-class: ~18 issue slots (load, conversion, max/argmax, exp sweep, accumulators);
    // per row: ~9 per shuffle level and ~30 of row statistics (+ ~60 across warps for kBlock);
    // per item: ~30 per class. Times the lanes' classes over C.
    const double row = 30.0 + (cf.mode == 0 ? 9.0 * lgw : 20.0) + (blk ? 60.0 + 6.0 * (B / 32) : 0.0);
    const double cost = (18.0 + row / K + 30.0 / double(T)) * double(int64_t(G) * K) / double(C);
    if (cost < best * (1 - 1e-9)) {
      best = cost;
      best_nv = cf.nv;
      best_G = G;
      best_B = B;
      best_mode = cf.mode;
    }
  }
  if (best_nv == 0) return false;
  const int K = 4 * best_nv, G = best_G;
  int B = best_B;
  if (best_mode != 2 && ov.block <= 0) {
    // Few items: no more groups per block than items (at least one warp).
    const int64_t want = std::max<int64_t>(32, (N * G + 31) / 32 * 32);
    B = static_cast<int>(std::min<int64_t>(B, want));
  }
  P.path = kStripPath;
  P.block = B;
  P.row_lanes = G;
  P.it_glog2 = 0;
  while ((1 << P.it_glog2) < G) ++P.it_glog2;
  P.kk = B / G;
  P.Cp = static_cast<int>(C);
  P.st_nv = best_nv;
  P.st_mode = best_mode;
  P.st_off_ref = 0;
  P.st_off_cnt = static_cast<int>(a16(3 * int64_t(K) * kStripStride * 4));
  P.st_off_red = P.st_off_cnt + static_cast<int>(a16(int64_t(K) * kStripStride * 4));
  P.smem = P.st_off_red + (best_mode == 2 ? 2048 : 0);
  P.nchunks = cdiv(N, P.kk);
  const int64_t max_grid = ov.max_grid > 0 ? ov.max_grid : (int64_t(1) << 30);
  P.grid = std::max<int64_t>(1, std::min(P.nchunks, max_grid));
  P.cnt_mode = -1;
  return true;
}

// Chooses the kernel and its configuration (P.x must be set: the TNC vector load depends on its
// alignment). Returns false with *err set when the problem cannot be run on the device (only: T
// too large for the stream kernel's per-row stats).
inline bool make_plan(Params& P, int64_t elem_size, int64_t acc_size, const DeviceLimits& lim,
                      const PlanOverrides& ov, std::string* err) {
  using namespace plan_detail;
  const int64_t N = P.N, T = P.T, C = P.C;
  const math::Needs needs(P.metrics, P.kind);
  const bool need_vr = (P.metrics & (1 << math::kVariationRatio)) != 0;
  P.inv_T = 1.0 / static_cast<double>(T);
  P.inv_C = 1.0 / static_cast<double>(C);
  P.block = ov.block > 0 ? ov.block : 256;
  const int B = P.block;
  const int64_t max_grid = ov.max_grid > 0 ? ov.max_grid : (int64_t(1) << 30);

  // ---- item kernel (small C, contiguous NTC float/half/bf16 logits or log-probs) ----
  if (plan_item(P, elem_size, acc_size, lim, ov)) return true;
  // ---- strip kernel (mid / large C, the same inputs) ----
  if (plan_strip(P, elem_size, acc_size, lim, ov)) return true;

  // ---- tile kernel ----
  bool tile_ok = false;
  if (ov.force_path != kStreamPath && T * C < (int64_t(1) << 26)) {
    const bool unit_c = C == 1 || P.sC == 1;
    const bool flat = unit_c && (T == 1 || P.sT == C) && (N == 1 || P.sN == T * C);
    const bool tnc = !flat && unit_c && (N == 1 || P.sN == C);
    int mode = flat ? kLoadFlat : (tnc ? kLoadTnc : kLoadGeneric);
    if (ov.force_generic) mode = kLoadGeneric;
    const int64_t asT = P.sT < 0 ? -P.sT : P.sT, asC = P.sC < 0 ? -P.sC : P.sC;
    const int order = tnc ? kOrderTJC : ((asT < asC && T > 1) ? kOrderJCT : kOrderJTC);
    const bool can_two = needs.pbar && !ov.force_one_array;
    struct Try {
      bool two;
      int64_t budget;
    };
    const int64_t half_sm = std::max<int64_t>(48 * 1024, lim.smem_per_sm / 2 - 1024);
    Try tries[4] = {{true, 48 * 1024}, {true, half_sm}, {false, half_sm}, {false, lim.smem_optin}};
    if (!can_two) {
      tries[0] = {false, 48 * 1024};
      tries[1] = {false, half_sm};
      tries[2] = {false, lim.smem_optin};
      tries[3] = {false, 0};
    }
    if (ov.tile_budget > 0) {
      tries[0] = {can_two, ov.tile_budget};
      tries[1] = {false, ov.tile_budget};
      tries[2] = {false, 0};
      tries[3] = {false, 0};
    }
    for (const Try& tr : tries) {
      const bool two = tr.two;
      if (tr.budget <= 0) continue;
      const int64_t budget = std::min(tr.budget, lim.smem_optin);
      // Joint choice of G (lanes per row) and k (items per chunk): least cost per item.
      int64_t best_k = 0, Cp = C;
      int best_G = 1;
      double best = 1e300;
      for (int G = 1; G <= 32; G *= 2) {
        if (ov.row_lanes > 0 && G != ov.row_lanes) continue;
        if (ov.row_lanes <= 0 && G > 1 && (G / 2) * 4 > C) continue;  // >= 4 classes per lane
        if (G > B) continue;
        const int64_t cp = row_stride(C, G);
        int64_t kmax = 0;
        while (kmax < std::min<int64_t>(N, 4096) && tile_layout(kmax + 1, T, C, cp, acc_size, two).total <= budget)
          ++kmax;
        for (int64_t k = 1; k <= kmax; ++k) {
          if (ov.force_kk > 0 && k != std::min<int64_t>(ov.force_kk, kmax)) continue;
          const double c = chunk_cost(k, T, C, B, G, needs) / double(k);
          if (c <= best * (1 + 1e-9)) {
            best = c;
            best_k = k;
            best_G = G;
            Cp = cp;
          }
        }
      }
      if (best_k < 1) continue;
      // TNC: 16-byte vectors need every span of every chunk at one alignment: rows of the input
      // 16-byte multiples apart and chunks of kk items a 16-byte multiple long (kk rounded down).
      bool tnc_vec = false;
      if (mode == kLoadTnc && (asT * elem_size) % 16 == 0 && ov.force_kk <= 0) {
        int64_t m = 1;
        while ((m * C * elem_size) % 16 != 0) ++m;
        if (best_k >= m) {
          best_k = best_k / m * m;
          tnc_vec = true;
        }
      }
      const TileLayout L = tile_layout(best_k, T, C, Cp, acc_size, two);
      P.path = kTilePath;
      P.kk = static_cast<int>(best_k);
      P.Cp = static_cast<int>(Cp);
      P.load_mode = (mode == kLoadTnc && !tnc_vec) ? kLoadGeneric : mode;
      P.gen_order = order;
      P.tnc_rows = tnc ? 1 : 0;
      P.row_lanes = best_G;
      P.two_arrays = two;
      P.pad = Cp != C && (P.load_mode == kLoadFlat || P.load_mode == kLoadTnc);
      const int64_t vw = 16 / elem_size;
      if (tnc_vec) {
        const uintptr_t addr = reinterpret_cast<uintptr_t>(P.x);
        const int64_t len = best_k * C;
        int64_t head = static_cast<int64_t>((16 - (addr & 15)) & 15) / elem_size;
        head = std::min(head, len);
        P.tnc_head = static_cast<int>(head);
        P.tnc_nv = static_cast<int>((len - head) / vw);
        P.tnc_nsc = static_cast<int>(len - P.tnc_nv * vw);
      }
      P.div_nv = make_fastdiv(std::max(1, P.tnc_nv));
      P.div_nsc = make_fastdiv(std::max(1, P.tnc_nsc));
      P.col_lanes = col_lanes_for(best_k, T, C, B);
      P.col_lanes_log2 = 0;
      while ((1 << P.col_lanes_log2) < P.col_lanes) ++P.col_lanes_log2;
      P.div_c = make_fastdiv(C);
      P.div_t = make_fastdiv(T);
      P.div_kk = make_fastdiv(best_k);
      P.off_d = static_cast<int>(L.off_d);
      P.off_e = static_cast<int>(L.off_e);
      P.off_rls = static_cast<int>(L.off_rls);
      P.off_rinv = static_cast<int>(L.off_rinv);
      P.off_rh = static_cast<int>(L.off_rh);
      P.off_cent = static_cast<int>(L.off_cent);
      P.off_ckl = static_cast<int>(L.off_ckl);
      P.off_cstd = static_cast<int>(L.off_cstd);
      P.off_cpb = static_cast<int>(L.off_cpb);
      P.off_cnt = static_cast<int>(L.off_cnt);
      P.smem = L.total;
      P.nchunks = cdiv(N, best_k);
      P.grid = std::max<int64_t>(1, std::min(P.nchunks, max_grid));
      tile_ok = true;
      break;
    }
  }
  if (tile_ok) return true;

  // ---- stream kernel ----
  const int64_t nwarps = B / 32;
  const int64_t red = a16(nwarps * 8 * 8);
  const int64_t base = a16(T * acc_size) * 2 + red;
  int64_t need = base;
  int cnt_mode = 1;
  if (need_vr) {
    if (!ov.force_args && base + a16(C * 4) <= lim.smem_optin) {
      need += a16(C * 4);
    } else {
      cnt_mode = 0;
      need += a16(T * 4);
    }
  }
  if (need > lim.smem_optin) {
    if (err) {
      *err = "T = " + std::to_string(T) + " MC samples with C = " + std::to_string(C) +
             " classes is too large for the CUDA kernel (per-sample statistics need " +
             std::to_string(need) + " bytes of shared memory, the device allows " +
             std::to_string(lim.smem_optin) + "); score this pool on the CPU";
    }
    return false;
  }
  P.path = kStreamPath;
  P.cnt_mode = cnt_mode;
  P.off_rm = 0;
  P.off_rls = static_cast<int>(a16(T * acc_size));
  P.off_red = static_cast<int>(2 * a16(T * acc_size));
  P.off_args = static_cast<int>(base);  // counters (cnt_mode) or argmax indices
  P.smem = need;
  P.nchunks = N;
  P.grid = std::max<int64_t>(1, std::min(N, max_grid));
  return true;
}

}  // namespace cuda
}  // namespace fastbald
