// The error message of fastbald::pool_scores for a bad pool item, shared by the CPU and CUDA
// kernels (both find the first bad item inside the kernel, then call this once on the host with
// that item's [T, C] tile in host memory).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "scores_math.h"

namespace fastbald {

// Says exactly what is wrong with pool item n. `item` points at its element (t = 0, c = 0) in host
// memory; element (t, c) is item[t * sT + c * sC]. Always throws (c10::ValueError).
template <class scalar_t>
[[noreturn]] void report_bad_item(const scalar_t* item, int64_t n, int64_t T, int64_t C,
                                  int64_t sT, int64_t sC, int kind, double tol) {
  for (int64_t t = 0; t < T; ++t) {
    bool all_masked = true;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double v = static_cast<double>(item[t * sT + c * sC]);
      TORCH_CHECK_VALUE(!std::isnan(v), "fastbald::pool_scores: pool item ", n, " (sample ", t,
                        ", class ", c, ") is NaN; pass check_finite=False to skip this check");
      TORCH_CHECK_VALUE(v != std::numeric_limits<double>::infinity(),
                        "fastbald::pool_scores: pool item ", n, " (sample ", t, ", class ", c,
                        ") is +inf");
      if (kind == math::kProbs) {
        TORCH_CHECK_VALUE(v >= 0, "fastbald::pool_scores: input='probs' but pool item ", n,
                          " (sample ", t, ", class ", c, ") is negative (", v, ")");
      }
      all_masked = all_masked && (kind == math::kProbs
                                      ? v == 0
                                      : v == -std::numeric_limits<double>::infinity());
      sum += v;
    }
    TORCH_CHECK_VALUE(!all_masked, "fastbald::pool_scores: pool item ", n, " (sample ", t,
                      ") masks every class (all ", kind == math::kProbs ? "0" : "-inf", ")");
    if (kind == math::kProbs) {
      TORCH_CHECK_VALUE(std::abs(sum - 1.0) <= tol,
                        "fastbald::pool_scores: input='probs' but pool item ", n, " (sample ", t,
                        ") sums to ", sum, ", not 1 (tolerance ", tol, ")");
    }
  }
  TORCH_CHECK_VALUE(false, "fastbald::pool_scores: pool item ", n,
                    " is invalid (its probabilities do not sum to 1 within tolerance ", tol, ")");
}

}  // namespace fastbald
