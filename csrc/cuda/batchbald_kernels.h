// Kernel bodies and host driver of fastbald::batchbald on CUDA (greedy BatchBALD; the math and its
// notation: ../batchbald_math.h, the CPU op: ../cpu/batchbald_cpu.cpp). Written against the
// primitives of device_compat.h, so the same source is compiled by nvcc (batchbald_cuda.cu) and, for
// the CPU tests, by g++ with the fiber emulation (emu/batchbald_emu.cpp, tests/test_cuda_batchbald.py).
//
// Per greedy step (everything on the device; the host only enqueues, it never reads a result back
// except the validity flag after the first pass):
//   1. table update with the point chosen at the previous step (its index is read on the device):
//      chosen_probs (exp of its [K, C] log-probs, float64), then
//        exact regime (rows * C <= M): extend_exact, rows -> rows * C (double-buffered master table);
//        first sampled step: init_table with M' = K * (M // K) rows, then append for every chosen
//          point in order (the configurations batchbald_redux draws, drawn once);
//        later sampled steps: append (one sampled class per configuration; no re-sampling);
//      both write the float64 master w[r][k] and the compute copy Wt[k][r] (type T) plus the row
//      weights a[r] (q_r exact, 1/M' sampled); finish_table reduces H(Y_S) (one block);
//   2. evaluate: one block per group of kG = 4 candidates, the candidates' probabilities [kG][K][Cp]
//      in shared memory (Cp = C padded to a multiple of the class chunk CB), the block's threads
//      over the table rows; per row, per chunk of CB classes, kG x CB accumulators in registers
//      over k (one load of Wt[k][r], coalesced across the warp, for kG * CB FMAs; the candidates'
//      probabilities are shared-memory broadcasts), the row entropy in T, the weighted sum over
//      rows in float64 and a fixed-order tree reduction over the block: deterministic, and the same
//      value for identical candidates (duplicates tie, the lower index wins);
//   3. argmax: one block, lowest index on ties; writes the index, the score (joint MI of the batch
//      so far) and the count of evaluated candidates of the step into the outputs, marks the item.
// Memory: the pool is read in place; O(M K) for the table (two float64 copies while exact, one
// compute copy) and O(N) per-item arrays (conditional entropy, gain, chosen flag): no N x M x C
// temporary. Lazy greedy (lazy=true) in the exact regime: the candidate of the largest bound (its
// last gain + slack) is evaluated first, then every candidate whose bound reaches that gain (no
// other can win): the batch of a full evaluation. The sampled regime evaluates every candidate
// (the CPU's lazy=false; its sampled-regime lazy bounds need standard errors, not done here).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../batchbald_math.h"
#include "device_compat.h"

namespace fastbald {
namespace cuda {
namespace bb {

constexpr int kG = 4;           // candidates per evaluation block
constexpr int kMaxBlock = 256;  // threads per block (all kernels)
constexpr int kSmemBudget = 48 * 1024;

enum Kernel : int {
  kFirstPass = 0,
  kArgmax = 1,
  kChosenProbs = 2,
  kInitTable = 3,
  kExtendExact = 4,
  kAppend = 5,
  kFinishTable = 6,
  kEval = 7,
  kProbe = 8,
};

// Everything a kernel needs (passed by value to every launch; the per-launch fields are set by the
// driver before each launch).
struct Params {
  // pool: log_probs[n, k, c] at x[n * sN + k * sK + c * sC], float32 (x_double = 0) or float64
  const void* x;
  int x_double;
  int64_t N, K, C, sN, sK, sC;
  double tol;  // prob_tol (inf: no normalisation check)
  double invK;  // 1 / K (no double division in the kernels: its slow path is a call that spills)
  uint64_t seed;
  int use_double;  // compute type T of the table copy and the inner products
  // per-item arrays [N]
  double* cond;     // E_k H[p_k(.|x_n)]
  double* gain;     // the current gain of every candidate (-inf: not evaluated at this step)
  double* ub;       // lazy greedy: upper bound of every candidate's next gain (last gain + slack)
  int64_t* probe;   // lazy greedy: the candidate of the largest bound (evaluated first)
  double slack;     // rounding allowance of the bounds (float: 2e-5, double: 1e-11, as the CPU)
  uint8_t* chosen;  // 1 once chosen
  unsigned long long* flag;  // ~0 - (first invalid item), 0 if none
  // outputs [b]
  int64_t* idx_out;
  double* score_out;
  int64_t* nev_out;
  double* state;  // [2]: H(Y_S), sum of cond over S
  // table
  double* w[2];  // float64 master copies [rows][K] (two while exact: double buffer)
  double* q[2];  // [rows]: q_r (exact) or log q_r (sampled)
  void* Wt;      // [K][rows] in T
  double* a;     // [rows] row weights
  double* pch;   // [K][C] float64 probabilities of the point being added
  // per launch
  int64_t step;  // argmax: the greedy step; chosen_probs / append: the chosen point's position
  int64_t rows;  // table rows (after the update)
  double inv_rows;  // 1 / rows
  int src, dst;  // table buffers (extend_exact: src -> dst; others: dst)
  int sampled;
  double init_q;  // init_table: q of every row (1: exact, 0: sampled log q)
  int CB;         // eval: class chunk (2, 4, 5 or 8), Cp = C padded to a multiple of it
  int64_t Cp;
  int smem_p;     // eval: candidates' probabilities in shared memory (1) or in the global scratch
  int lazy_phase; // eval: 0 every candidate, 1 the probe only, 2 those whose bound reaches the probe's gain
  int lazy_step;  // argmax: this step was lazy (num_evaluated = the candidates evaluated)
  void* pscratch; // eval, smem_p == 0: [grid][kG][K][Cp] in T
};

// ---------------------------------------------------------------------------------------------
// Device helpers.

// Table buffer i (a select, not an index into the kernel parameter: that could put the parameter
// block in local memory).
FB_DEV double* wbuf(const Params& P, int i) { return i ? P.w[1] : P.w[0]; }
FB_DEV double* qbuf(const Params& P, int i) { return i ? P.q[1] : P.q[0]; }

FB_DEV double load_x(const Params& P, int64_t off) {
  return P.x_double ? static_cast<const double*>(P.x)[off]
                    : static_cast<double>(static_cast<const float*>(P.x)[off]);
}
template <class T>
FB_DEV T load_xt(const Params& P, int64_t off) {
  // As the CPU's gather_tile: the log-probability converted to T (float input stays float).
  return P.x_double ? static_cast<T>(static_cast<const double*>(P.x)[off])
                    : static_cast<T>(static_cast<const float*>(P.x)[off]);
}
FB_DEV float exp_t(float x) { return ::expf(x); }
FB_DEV double exp_t(double x) { return ::exp(x); }

// Fixed-order tree sum over the block (bdim a power of two) of one double per thread; buf has bdim
// doubles. Every thread gets the sum. Starts and ends with a barrier.
FB_DEV double block_sum(double v, double* buf) {
  const int t = dev::tid(), B = dev::bdim();
  dev::sync();
  buf[t] = v;
  dev::sync();
  for (int o = B >> 1; o > 0; o >>= 1) {
    if (t < o) buf[t] = buf[t] + buf[t + o];
    dev::sync();
  }
  const double s = buf[0];
  dev::sync();
  return s;
}

// ---------------------------------------------------------------------------------------------
// 1. First pass (grid-stride, a thread per item, float64): conditional entropy, BALD (the exact
// first gain) and validity, as the CPU's first_pass_tile.
FB_DEV void first_pass_body(const Params& P, unsigned char*) {
  const int64_t K = P.K, C = P.C;
  const double invK = P.invK;
  for (int64_t n = dev::bid() * dev::bdim() + dev::tid(); n < P.N; n += dev::gdim() * dev::bdim()) {
    const int64_t base = n * P.sN;
    bool bad = false;
    double condacc = 0;
    for (int64_t k = 0; k < K; ++k) {
      double rs = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double lp = load_x(P, base + k * P.sK + c * P.sC);
        bad = bad || !(lp < std::numeric_limits<double>::infinity());
        const double p = ::exp(lp);
        condacc += p > 0 ? p * lp : 0.0;
        rs += p;
      }
      if (P.tol < std::numeric_limits<double>::infinity() && !(::fabs(rs - 1.0) <= P.tol)) bad = true;
    }
    double h = 0;
    for (int64_t c = 0; c < C; ++c) {
      double pb = 0;
      for (int64_t k = 0; k < K; ++k) pb += ::exp(load_x(P, base + k * P.sK + c * P.sC));
      h -= batchbald::xlogx_normal(pb * invK);
    }
    const double cd = -condacc * invK;
    P.cond[n] = cd;
    P.gain[n] = h - cd;
    P.ub[n] = h - cd + P.slack;
    P.chosen[n] = 0;
    if (bad) dev::atomic_max_global(P.flag, ~0ull - static_cast<unsigned long long>(n));
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Argmax over the candidates not chosen yet (one block): the largest value, the lowest index on
// ties (NaN as -inf), and the number of finite values. Every thread gets them.
FB_DEV void block_argmax(const double* v, const Params& P, unsigned char* smem, double& best_v, int64_t& best_i,
                         int64_t& count) {
  double* bv = reinterpret_cast<double*>(smem);
  int64_t* bi = reinterpret_cast<int64_t*>(bv + dev::bdim());
  int64_t* bc = bi + dev::bdim();
  const int t = dev::tid(), B = dev::bdim();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double m = -kInf;
  int64_t id = -1, cnt = 0;
  for (int64_t n = t; n < P.N; n += B) {
    if (P.chosen[n]) continue;
    const double g = v[n];
    cnt += (g > -kInf && g < kInf) ? 1 : 0;
    if (id < 0 || g > m) {  // n increases: an equal value keeps the lower index
      m = g == g ? g : -kInf;
      id = n;
    }
  }
  dev::sync();
  bv[t] = m;
  bi[t] = id;
  bc[t] = cnt;
  dev::sync();
  for (int o = B >> 1; o > 0; o >>= 1) {
    if (t < o) {
      const double v2 = bv[t + o];
      const int64_t i2 = bi[t + o];
      const bool take = i2 >= 0 && (bi[t] < 0 || v2 > bv[t] || (v2 == bv[t] && i2 < bi[t]));
      if (take) {
        bv[t] = v2;
        bi[t] = i2;
      }
      bc[t] += bc[t + o];
    }
    dev::sync();
  }
  best_v = bv[0];
  best_i = bi[0];
  count = bc[0];
}

// The step's choice: writes its outputs and marks the item.
FB_DEV void argmax_body(const Params& P, unsigned char* smem) {
  double v;
  int64_t best, count;
  block_argmax(P.gain, P, smem, v, best, count);
  if (dev::tid() == 0) {
    const int64_t s = P.step;
    P.idx_out[s] = best;
    P.nev_out[s] = P.lazy_step ? count : (s == 0 ? P.N : P.N - s);
    if (best >= 0) {
      P.score_out[s] = P.state[0] + P.gain[best] - P.state[1];
      P.chosen[best] = 1;
      P.state[1] += P.cond[best];
    } else {
      P.score_out[s] = std::numeric_limits<double>::quiet_NaN();
    }
  }
}

// Lazy greedy, first: the candidate of the largest bound (one block).
FB_DEV void probe_body(const Params& P, unsigned char* smem) {
  double v;
  int64_t best, count;
  block_argmax(P.ub, P, smem, v, best, count);
  if (dev::tid() == 0) P.probe[0] = best;
}

// ---------------------------------------------------------------------------------------------
// 3. Table updates.

// pch[k][c] = exp(log_probs[idx_out[step], k, c]) in float64 (as the CPU's Table::probs).
FB_DEV void chosen_probs_body(const Params& P, unsigned char*) {
  const int64_t n = P.idx_out[P.step];
  const int64_t KC = P.K * P.C;
  for (int64_t i = dev::bid() * dev::bdim() + dev::tid(); i < KC; i += dev::gdim() * dev::bdim()) {
    const int64_t k = i / P.C, c = i % P.C;
    P.pch[i] = ::exp(load_x(P, n * P.sN + k * P.sK + c * P.sC));
  }
}

// Row r of the compute copy and its weight.
template <class T>
FB_DEV void pack_row(const Params& P, int64_t r, const double* wr, double a) {
  T* Wt = static_cast<T*>(P.Wt);
  for (int64_t k = 0; k < P.K; ++k) Wt[k * P.rows + r] = static_cast<T>(wr[k]);
  P.a[r] = a;
}

// Every row uniform over the models, q = init_q (a 1-row exact table, or the M' sampled rows).
template <class T>
FB_DEV void init_table_body(const Params& P, unsigned char*) {
  const double u = P.invK;
  for (int64_t r = dev::bid() * dev::bdim() + dev::tid(); r < P.rows; r += dev::gdim() * dev::bdim()) {
    double* wr = wbuf(P, P.dst) + r * P.K;
    for (int64_t k = 0; k < P.K; ++k) wr[k] = u;
    qbuf(P, P.dst)[r] = P.init_q;
    pack_row<T>(P, r, wr, P.sampled ? P.inv_rows : P.init_q);
  }
}

// Exact regime: new row r2 = r * C + c from old row r (P.rows = new rows).
template <class T>
FB_DEV void extend_exact_body(const Params& P, unsigned char*) {
  const int64_t K = P.K, C = P.C;
  for (int64_t r2 = dev::bid() * dev::bdim() + dev::tid(); r2 < P.rows; r2 += dev::gdim() * dev::bdim()) {
    const int64_t r = r2 / C, c = r2 % C;
    double* out = wbuf(P, P.dst) + r2 * K;
    const double q2 = qbuf(P, P.src)[r] * batchbald::extend_row(wbuf(P, P.src) + r * K, P.pch + c, C, K, out);
    qbuf(P, P.dst)[r2] = q2;
    pack_row<T>(P, r2, out, q2);
  }
}

// Sampled regime: configuration r (drawn from MC sample r / (rows / K)) gets a class of the point
// at position P.step, drawn from its model's p, as the CPU's Table::append.
template <class T>
FB_DEV void append_body(const Params& P, unsigned char*) {
  const int64_t K = P.K, C = P.C, S = P.rows / K;
  for (int64_t r = dev::bid() * dev::bdim() + dev::tid(); r < P.rows; r += dev::gdim() * dev::bdim()) {
    const int64_t k_r = r / S;
    const double u = batchbald::uniform01(P.seed, static_cast<uint64_t>(P.step), static_cast<uint64_t>(r));
    const int64_t c = batchbald::sample_class(P.pch + k_r * C, C, 1, u);
    double* wr = wbuf(P, P.dst) + r * K;
    qbuf(P, P.dst)[r] += batchbald::append_row(wr, P.pch, K, C, c);
    pack_row<T>(P, r, wr, P.inv_rows);
  }
}

// H(Y_S) of the table (one block): exact -sum q log q, sampled -mean log q.
FB_DEV void finish_table_body(const Params& P, unsigned char* smem) {
  double s = 0;
  const double* q = qbuf(P, P.dst);
  for (int64_t r = dev::tid(); r < P.rows; r += dev::bdim())
    s += P.sampled ? q[r] : batchbald::xlogx(q[r]);
  s = block_sum(s, reinterpret_cast<double*>(smem));
  if (dev::tid() == 0) P.state[0] = P.sampled ? -s * P.inv_rows : -s;
}

// ---------------------------------------------------------------------------------------------
// 4. Candidate evaluation: gain[n] = sum_r a_r H(m_r(n)) - cond[n] for kG candidates per block
// (grid-stride over groups). Shared memory: [kG][K][Cp] probabilities in T (smem_p; else they go
// to this block's slice of the global scratch) and kG * bdim doubles for the reduction.
// Rows per thread at a time in the evaluation: RB * kG * CB accumulators of T, at most 64 floats
// or 32 doubles (64 registers), and RB <= 4 (ptxas: 107-170 registers per thread, no spills).
template <class T, int CB>
constexpr int rows_per_pass() {
  constexpr int r = (sizeof(T) == 4 ? 64 : 32) / (kG * CB);
  return r < 1 ? 1 : (r > 4 ? 4 : r);
}

// kShared: P.smem_p (a compile-time address space: shared loads, not generic ones).
template <class T, int CB, bool kShared>
FB_DEV void eval_body(const Params& P, unsigned char* smem) {
  constexpr int RB = rows_per_pass<T, CB>();
  const int64_t K = P.K, C = P.C, Cp = P.Cp, rows = P.rows;
  const int t = dev::tid(), B = dev::bdim();
  const int64_t kcp = K * Cp;
  double* red = reinterpret_cast<double*>(smem);
  T* Ps;
  if constexpr (kShared) {
    Ps = reinterpret_cast<T*>(smem + static_cast<size_t>(kG) * B * sizeof(double));
  } else {
    Ps = static_cast<T*>(P.pscratch) + dev::bid() * kG * kcp;
  }
  const T* Wt = static_cast<const T*>(P.Wt);
  const int64_t ngroups = (P.N + kG - 1) / kG;
  // Lazy greedy (exact regime): phase 1 evaluates the probe (the largest bound) alone, phase 2 the
  // candidates whose bound reaches the probe's gain (no other can be the argmax); the others get
  // gain -inf (not evaluated). Phase 0: every candidate.
  const int phase = P.lazy_phase;
  const int64_t probe = phase ? P.probe[0] : -1;
  const double tau = phase == 2 ? P.gain[probe] : 0.0;
  auto eligible = [&](int64_t n) {
    if (n >= P.N || P.chosen[n]) return false;
    return phase == 0 || (phase == 1 ? n == probe : (n != probe && P.ub[n] >= tau));
  };
  const int64_t start = phase == 1 ? probe / kG : dev::bid();
  const int64_t stride = phase == 1 ? ngroups : dev::gdim();
  for (int64_t grp = start; grp < ngroups; grp += stride) {
    const int64_t n0 = grp * kG;
    bool live = false;
    for (int g = 0; g < kG; ++g) live = live || eligible(n0 + g);
    if (phase == 2 && t < kG) {
      const int64_t n = n0 + t;
      if (n < P.N && !P.chosen[n] && n != probe && !eligible(n)) P.gain[n] = -std::numeric_limits<double>::infinity();
    }
    if (!live) continue;  // uniform over the block
    dev::sync();          // the previous group's readers of Ps are done
    // 32-bit index arithmetic (the host checks K * Cp < 2^28): a 64-bit division is a call.
    const uint32_t ukcp = static_cast<uint32_t>(kcp), ucp = static_cast<uint32_t>(Cp);
    for (uint32_t i = static_cast<uint32_t>(t); i < kG * ukcp; i += static_cast<uint32_t>(B)) {
      const uint32_t g = i / ukcp, rem = i - g * ukcp, k = rem / ucp, c = rem - k * ucp;
      const int64_t n = n0 + g;
      // Padded classes and missing candidates: probability 0 (x log x = 0, never read back).
      Ps[i] = (n < P.N && c < C) ? exp_t(load_xt<T>(P, n * P.sN + k * P.sK + c * P.sC)) : T(0);
    }
    dev::sync();
    double s1[kG];
    FB_UNROLL
    for (int g = 0; g < kG; ++g) s1[g] = 0;
    // RB rows per thread at a time (r0, r0 + B, ...: the same row order as one at a time), so one
    // shared-memory broadcast of a candidate's probability feeds RB FMAs.
    for (int64_t r0 = t; r0 < rows; r0 += static_cast<int64_t>(B) * RB) {
      double ar[RB];
      T h[RB][kG];
      FB_UNROLL
      for (int i = 0; i < RB; ++i) {
        const int64_t r = r0 + static_cast<int64_t>(i) * B;
        ar[i] = r < rows ? P.a[r] : 0.0;  // 0: past the table, or a configuration of probability 0
        FB_UNROLL
        for (int g = 0; g < kG; ++g) h[i][g] = T(0);
      }
      for (int64_t c0 = 0; c0 < Cp; c0 += CB) {
        T acc[RB][kG][CB];
        FB_UNROLL
        for (int i = 0; i < RB; ++i) {
          FB_UNROLL
          for (int g = 0; g < kG; ++g) {
            FB_UNROLL
            for (int j = 0; j < CB; ++j) acc[i][g][j] = T(0);
          }
        }
        const T* pc = Ps + c0;
        for (int64_t k = 0; k < K; ++k) {
          T wk[RB];
          FB_UNROLL
          for (int i = 0; i < RB; ++i) {
            const int64_t r = r0 + static_cast<int64_t>(i) * B;
            wk[i] = r < rows ? Wt[k * rows + r] : T(0);
          }
          FB_UNROLL
          for (int g = 0; g < kG; ++g) {
            const T* pg = pc + g * kcp + k * Cp;
            FB_UNROLL
            for (int j = 0; j < CB; ++j) {
              const T p = pg[j];
              FB_UNROLL
              for (int i = 0; i < RB; ++i) acc[i][g][j] += wk[i] * p;
            }
          }
        }
        FB_UNROLL
        for (int i = 0; i < RB; ++i) {
          FB_UNROLL
          for (int g = 0; g < kG; ++g) {
            FB_UNROLL
            for (int j = 0; j < CB; ++j) h[i][g] -= batchbald::xlogx_normal(acc[i][g][j]);
          }
        }
      }
      FB_UNROLL
      for (int i = 0; i < RB; ++i) {
        if (ar[i] == 0) continue;
        FB_UNROLL
        for (int g = 0; g < kG; ++g) s1[g] += ar[i] * static_cast<double>(h[i][g]);
      }
    }
    // Fixed-order tree over the block, kG sums at once.
    FB_UNROLL
    for (int g = 0; g < kG; ++g) red[g * B + t] = s1[g];
    dev::sync();
    for (int o = B >> 1; o > 0; o >>= 1) {
      if (t < o) {
        FB_UNROLL
        for (int g = 0; g < kG; ++g) red[g * B + t] += red[g * B + t + o];
      }
      dev::sync();
    }
    if (t < kG) {
      const int64_t n = n0 + t;
      if (eligible(n)) {
        const double g = red[t * B] - P.cond[n];
        P.gain[n] = g;
        P.ub[n] = g + P.slack;
      }
    }
  }
}

// Runs the body of kernel `id` (T: the compute type; the eval kernel's class chunk from P.CB).
template <class T>
FB_DEV void body(int id, const Params& P, unsigned char* smem) {
  switch (id) {
    case kFirstPass: first_pass_body(P, smem); break;
    case kArgmax: argmax_body(P, smem); break;
    case kProbe: probe_body(P, smem); break;
    case kChosenProbs: chosen_probs_body(P, smem); break;
    case kInitTable: init_table_body<T>(P, smem); break;
    case kExtendExact: extend_exact_body<T>(P, smem); break;
    case kAppend: append_body<T>(P, smem); break;
    case kFinishTable: finish_table_body(P, smem); break;
    default: break;
  }
}

// The evaluation body for the runtime class chunk P.CB (the emulator; the CUDA build instantiates
// one kernel per chunk instead).
template <class T, bool kShared>
FB_DEV void eval_dispatch_cb(const Params& P, unsigned char* smem) {
  switch (P.CB) {
    case 2: eval_body<T, 2, kShared>(P, smem); break;
    case 4: eval_body<T, 4, kShared>(P, smem); break;
    case 5: eval_body<T, 5, kShared>(P, smem); break;
    default: eval_body<T, 8, kShared>(P, smem); break;
  }
}
template <class T>
FB_DEV void eval_dispatch(const Params& P, unsigned char* smem) {
  if (P.smem_p) {
    eval_dispatch_cb<T, true>(P, smem);
  } else {
    eval_dispatch_cb<T, false>(P, smem);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: sizes, workspace layout and the greedy driver.

// The class chunk: the one of {8, 5, 4, 2} with the least padding (ties: the larger chunk, fewer
// re-reads of the table).
inline int class_chunk(int64_t C) {
  static const int cands[4] = {8, 5, 4, 2};
  int best = 8;
  int64_t best_pad = (C + 7) / 8 * 8;
  for (int cb : cands) {
    const int64_t pad = (C + cb - 1) / cb * cb;
    if (pad < best_pad) {
      best = cb;
      best_pad = pad;
    }
  }
  return best;
}

// C padded to a multiple of its class chunk (the evaluation's Cp).
inline int64_t padded_classes(int64_t C) {
  const int cb = class_chunk(C);
  return (C + cb - 1) / cb * cb;
}

// Threads for `work` parallel items: a power of two in [32, max_block].
inline int block_for(int64_t work, int max_block) {
  int b = 32;
  while (b < max_block && b < work) b *= 2;
  return b;
}

// The largest K * C the kernels take (32-bit index arithmetic in the evaluation's load).
constexpr int64_t kMaxKC = int64_t{1} << 28;

// The largest table the b - 1 updates reach (rows of the exact regime stay <= M).
inline int64_t max_rows(int64_t K, int64_t C, int64_t M, int64_t b) {
  int64_t rows = 1, mx = 1;
  bool sampled = false;
  for (int64_t step = 1; step < b; ++step) {
    if (!sampled && rows * C <= M) {
      rows *= C;
    } else if (!sampled) {
      sampled = true;
      rows = K * (M / K);
    }
    mx = rows > mx ? rows : mx;
  }
  return mx;
}

struct Workspace {
  // byte offsets into one allocation (each 256-byte aligned)
  int64_t cond, gain, ub, probe, chosen, flag, state, w0, w1, q0, q1, Wt, a, pch, pscratch, total;
};

struct Config {
  int max_block = kMaxBlock;  // tests: a smaller block makes more rows per thread
  int64_t max_grid = 1 << 20; // tests: a small grid makes the grid-stride loops go round
  int force_scratch = 0;      // tests: the eval kernel's global-scratch path
};

inline int64_t eval_grid(int64_t N, const Config& cfg) {
  const int64_t g = (N + kG - 1) / kG;
  return g < cfg.max_grid ? g : cfg.max_grid;
}

inline int64_t eval_smem_p(int64_t K, int64_t Cp, int64_t tsize) { return kG * K * Cp * tsize; }

inline bool eval_in_smem(int64_t K, int64_t C, int64_t tsize, const Config& cfg) {
  return !cfg.force_scratch && eval_smem_p(K, padded_classes(C), tsize) + kG * kMaxBlock * 8 <= kSmemBudget;
}

inline Workspace layout(int64_t N, int64_t K, int64_t C, int64_t M, int64_t b, int64_t tsize, const Config& cfg) {
  Workspace ws{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += (bytes + 255) / 256 * 256;
    return o;
  };
  const int64_t R = max_rows(K, C, M, b);
  ws.cond = take(N * 8);
  ws.gain = take(N * 8);
  ws.ub = take(N * 8);
  ws.probe = take(8);
  ws.chosen = take(N);
  ws.flag = take(8);
  ws.state = take(16);
  ws.w0 = take(R * K * 8);
  ws.w1 = take(R * K * 8);
  ws.q0 = take(R * 8);
  ws.q1 = take(R * 8);
  ws.Wt = take(R * K * tsize);
  ws.a = take(R * 8);
  ws.pch = take(K * C * 8);
  ws.pscratch = take(eval_in_smem(K, C, tsize, cfg) ? 0 : eval_grid(N, cfg) * eval_smem_p(K, padded_classes(C), tsize));
  ws.total = off;
  return ws;
}

// Sets the workspace pointers of P (base: the allocation, zero-filled by the caller where noted:
// flag and state must start at 0).
inline void bind(Params& P, unsigned char* base, const Workspace& ws) {
  P.cond = reinterpret_cast<double*>(base + ws.cond);
  P.gain = reinterpret_cast<double*>(base + ws.gain);
  P.ub = reinterpret_cast<double*>(base + ws.ub);
  P.probe = reinterpret_cast<int64_t*>(base + ws.probe);
  P.chosen = base + ws.chosen;
  P.flag = reinterpret_cast<unsigned long long*>(base + ws.flag);
  P.state = reinterpret_cast<double*>(base + ws.state);
  P.w[0] = reinterpret_cast<double*>(base + ws.w0);
  P.w[1] = reinterpret_cast<double*>(base + ws.w1);
  P.q[0] = reinterpret_cast<double*>(base + ws.q0);
  P.q[1] = reinterpret_cast<double*>(base + ws.q1);
  P.Wt = base + ws.Wt;
  P.a = reinterpret_cast<double*>(base + ws.a);
  P.pch = reinterpret_cast<double*>(base + ws.pch);
  P.pscratch = base + ws.pscratch;
}

// The greedy loop. launch(id, grid, block, smem_bytes, P) enqueues kernel `id`; read_flag()
// waits for the first pass and returns the flag. Returns -1, or the first invalid item (nothing
// else enqueued then). P: pool, sizes, seed, use_double, outputs and workspace pointers set.
template <class Launch, class ReadFlag>
int64_t drive(Params P, int64_t b, int64_t M, bool lazy, const Config& cfg, Launch&& launch, ReadFlag&& read_flag) {
  if (b == 0) return -1;
  const int64_t N = P.N, K = P.K, C = P.C;
  const int64_t tsize = P.use_double ? 8 : 4;
  const int mb = cfg.max_block;
  P.invK = 1.0 / static_cast<double>(K);
  P.slack = P.use_double ? 1e-11 : 2e-5;
  P.lazy_phase = 0;
  P.lazy_step = 0;
  auto go = [&](int id, int64_t grid, int block, int64_t smem, Params& Q) {
    Q.inv_rows = Q.rows > 0 ? 1.0 / static_cast<double>(Q.rows) : 0.0;
    launch(id, grid, block, smem, static_cast<const Params&>(Q));
  };
  auto grid_for = [&](int64_t work, int block) {
    const int64_t g = (work + block - 1) / block;
    return g < 1 ? int64_t{1} : (g < cfg.max_grid ? g : cfg.max_grid);
  };
  go(kFirstPass, grid_for(N, mb), mb, 0, P);
  const unsigned long long flag = read_flag();
  if (flag != 0) return static_cast<int64_t>(~0ull - flag);
  P.step = 0;
  go(kArgmax, 1, mb, static_cast<int64_t>(mb) * 24, P);
  P.CB = class_chunk(C);
  P.Cp = padded_classes(C);
  P.smem_p = eval_in_smem(K, C, tsize, cfg) ? 1 : 0;
  int64_t rows = 1;
  bool sampled = false;
  int cur = 0;
  for (int64_t step = 1; step < b; ++step) {
    // 1. add the point chosen at step - 1
    if (!sampled && rows * C <= M) {
      if (step == 1) {  // the empty batch's table: one row, uniform, q = 1
        P.rows = 1;
        P.dst = cur;
        P.sampled = 0;
        P.init_q = 1.0;
        go(kInitTable, 1, 32, 0, P);
      }
      P.step = step - 1;
      go(kChosenProbs, grid_for(K * C, mb), mb, 0, P);
      P.src = cur;
      P.dst = 1 - cur;
      P.rows = rows * C;
      go(kExtendExact, grid_for(P.rows, mb), mb, 0, P);
      rows *= C;
      cur = 1 - cur;
    } else {
      P.dst = cur;
      if (!sampled) {  // the first sampled step: draw M' configurations of every chosen point
        sampled = true;
        rows = K * (M / K);
        P.rows = rows;
        P.sampled = 1;
        P.init_q = 0.0;
        go(kInitTable, grid_for(rows, mb), mb, 0, P);
        for (int64_t i = 0; i + 1 < step; ++i) {
          P.step = i;
          go(kChosenProbs, grid_for(K * C, mb), mb, 0, P);
          go(kAppend, grid_for(rows, mb), mb, 0, P);
        }
      }
      P.step = step - 1;
      go(kChosenProbs, grid_for(K * C, mb), mb, 0, P);
      go(kAppend, grid_for(rows, mb), mb, 0, P);
    }
    P.rows = rows;
    P.dst = cur;
    P.sampled = sampled ? 1 : 0;
    go(kFinishTable, 1, mb, static_cast<int64_t>(mb) * 8, P);
    // 2. evaluate every candidate left
    const int eb = block_for(rows, mb);
    const int64_t smem = static_cast<int64_t>(kG) * eb * 8 + (P.smem_p ? eval_smem_p(K, P.Cp, tsize) : 0);
    P.lazy_step = lazy && !sampled ? 1 : 0;
    if (P.lazy_step) {
      go(kProbe, 1, mb, static_cast<int64_t>(mb) * 24, P);
      P.lazy_phase = 1;
      go(kEval, 1, eb, smem, P);
      P.lazy_phase = 2;
    }
    go(kEval, eval_grid(N, cfg), eb, smem, P);
    P.lazy_phase = 0;
    // 3. choose
    P.step = step;
    go(kArgmax, 1, mb, static_cast<int64_t>(mb) * 24, P);
  }
  return -1;
}

}  // namespace bb
}  // namespace cuda
}  // namespace fastbald
