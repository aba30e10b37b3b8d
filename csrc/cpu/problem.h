// What one call of the CPU op scores, as both CPU kernels (item_kernel.h, group_kernel.h) see it:
// the input pointer, its shape and strides, the input kind, the metrics asked for, the finite
// check, and the output. Filled once by the op (scores_cpu.cpp); each kernel adds only its own
// layout decisions.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <cstdint>

#include "../scores_math.h"
#include "simd_traits.h"

namespace fastbald {
namespace cpu {
namespace {

using math::Ops;
template <class A>
using Vec = at::vec::Vectorized<A>;

// scalar_t: the input's element type; A: the accumulation type (double for double input, float
// otherwise).
template <class scalar_t, class A>
struct Problem {
  const scalar_t* x;
  int64_t N, T, C;     // pool items, MC samples, classes
  int64_t sN, sT, sC;  // element strides of x along N, T, C
  int kind;            // math::kLogits / kLogProbs / kProbs
  int metrics;         // bit k set: write output row k (math::kBald, ...)
  bool check;          // stop at the first item with a NaN / +-inf / all-masked row (bad probs)
  double tol;          // input kind probs: allowed |sum_c p - 1|
  math::Needs needs;   // the intermediate quantities the asked metrics need
  A* out;              // [kNumMetrics, N], row k = metric k
};

// The lowest index of a bad item found so far (N: none), shared by the worker threads. A thread
// stops at the first bad item of its range and skips items past the lowest one found, so the error
// names the first bad item of the pool whatever the number of threads.
class FirstBad {
 public:
  explicit FirstBad(int64_t n) : first_(n) {}
  // True when item n comes after a bad item already found (no need to score it).
  bool after(int64_t n) const { return n > first_.load(std::memory_order_relaxed); }
  void note(int64_t n) {
    int64_t cur = first_.load();
    while (n < cur && !first_.compare_exchange_weak(cur, n)) {
    }
  }
  int64_t get() const { return first_.load(); }

 private:
  std::atomic<int64_t> first_;
};

}  // namespace
}  // namespace cpu
}  // namespace fastbald
