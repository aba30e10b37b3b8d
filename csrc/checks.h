// Argument checks shared by the CPU and CUDA implementations of the fastbald ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "scores_math.h"

namespace fastbald {

inline void check_pool_scores_args(const at::Tensor& x, int64_t input_kind, int64_t metrics,
                                   double prob_tol) {
  TORCH_CHECK_VALUE(x.dim() == 3, "fastbald::pool_scores: x must be [N, T, C], got ", x.dim(),
                    " dimensions (shape ", x.sizes(), ")");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "fastbald::pool_scores: x must be float32, float64, float16 or bfloat16, got ",
                   st);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1,
                    "fastbald::pool_scores: x must have T >= 1 samples and C >= 1 classes, got "
                    "shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(input_kind >= 0 && input_kind <= 2,
                    "fastbald::pool_scores: input_kind must be 0 (logits), 1 (log_probs) or 2 "
                    "(probs), got ",
                    input_kind);
  TORCH_CHECK_VALUE(metrics > 0 && metrics < (1 << math::kNumMetrics),
                    "fastbald::pool_scores: metrics must be a non-empty bit mask of 7 metrics, "
                    "got ",
                    metrics);
  TORCH_CHECK_VALUE(prob_tol >= 0, "fastbald::pool_scores: prob_tol must be >= 0, got ",
                    prob_tol);
}

}  // namespace fastbald
