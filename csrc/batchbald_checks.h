// Argument checks of fastbald::batchbald shared by the CPU and CUDA implementations (same messages
// on both devices).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastbald {

inline void check_batchbald_args(const at::Tensor& log_probs, int64_t batch_size, int64_t num_samples,
                                 double prob_tol) {
  TORCH_CHECK_VALUE(log_probs.dim() == 3, "fastbald.batchbald: log_probs must be [N, K, C], got ",
                    log_probs.dim(), " dimensions (shape ", log_probs.sizes(), ")");
  const auto st = log_probs.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "fastbald.batchbald: log_probs must be float32, float64, float16 or bfloat16, "
                   "got ",
                   st);
  const int64_t N = log_probs.size(0), K = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK_VALUE(K >= 1 && C >= 1, "fastbald.batchbald: log_probs needs K >= 1 MC samples and "
                    "C >= 1 classes, got shape ", log_probs.sizes());
  TORCH_CHECK_VALUE(batch_size >= 0, "fastbald.batchbald: batch_size must be >= 0, got ",
                    batch_size);
  TORCH_CHECK_VALUE(batch_size <= N, "fastbald.batchbald: batch_size (", batch_size,
                    ") is larger than the pool (N = ", N, " items)");
  TORCH_CHECK_VALUE(num_samples >= K, "fastbald.batchbald: num_samples (", num_samples,
                    ") must be >= K (", K,
                    " MC samples): the sampled regime draws num_samples // K configurations per "
                    "MC sample");
  TORCH_CHECK_VALUE(prob_tol >= 0, "fastbald.batchbald: prob_tol must be >= 0 (inf skips the "
                    "check), got ", prob_tol);
}

}  // namespace fastbald
