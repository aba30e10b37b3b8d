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
  // Every element passes the host's float64 re-check, yet the kernel flagged the item.
  if (kind == math::kProbs) {
    // A row sum within tol of 1 in float64 but not in the kernel's arithmetic (float for
    // float/half/bfloat16 input): name the sample closest to the edge.
    int64_t worst_t = 0;
    double worst_sum = 1.0;
    for (int64_t t = 0; t < T; ++t) {
      double sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(item[t * sT + c * sC]);
      if (std::abs(sum - 1.0) > std::abs(worst_sum - 1.0) || t == 0) {
        worst_t = t;
        worst_sum = sum;
      }
    }
    TORCH_CHECK_VALUE(false, "fastbald::pool_scores: input='probs' but pool item ", n, " (sample ", worst_t,
                      ") sums to 1 with |sum - 1| = ", std::abs(worst_sum - 1.0), " in float64, within the tolerance ", tol,
                      ", but not in the kernel's ",
                      sizeof(scalar_t) < 8 ? "float32" : "float64",
                      " sum; raise prob_tol or renormalise the probabilities");
  }
  TORCH_CHECK_VALUE(false, "fastbald::pool_scores: the kernel flagged pool item ", n, " (input='",
                    kind == math::kLogProbs ? "log_probs" : "logits",
                    "') as invalid, but on the host every sample has a finite maximum and no NaN or +inf; "
                    "this is a bug in fastbald, please report it (check_finite=False skips the check)");
}

}  // namespace fastbald
