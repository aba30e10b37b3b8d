"""batchbald_redux's and the epig repository's BALD scoring, computed by fastbald.

Same signatures, same values (up to float32 rounding), one import to change:

.. code-block:: python

    # from batchbald_redux.batchbald import get_bald_batch, get_batchbald_batch
    from fastbald.integrations.batchbald import get_bald_batch, get_batchbald_batch
    candidates = get_bald_batch(log_probs_N_K_C, batch_size=10)
    candidates = get_batchbald_batch(log_probs_N_K_C, batch_size=10, num_samples=10_000)

    # epig (github.com/fbickfordsmith/epig): from src.uncertainty import bald_from_logprobs
    from fastbald.integrations.batchbald import bald_from_logprobs
    scores_N = bald_from_logprobs(logprobs_N_K_C)

Inputs are ``[N, K, C]`` tensors (pool items, MC samples, classes) of log-probabilities (logits work
too: they are normalised per sample) or, for the ``*_from_probs`` functions, probabilities; on the
CPU or, with fastbald's CUDA kernels, a GPU. Unlike the originals, nothing ``N x K x C`` is
materialised, BALD is computed in the mean-KL form (never negative), and a ``-inf`` log-probability
(a masked class) counts as probability 0 instead of giving NaN.

EPIG itself (the joint predictive of pool and target items) is :func:`fastbald.epig`: chunked,
never the ``[N_p, N_t, C, C]`` joint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scores import scores as _fb_scores

try:  # the result type of batchbald_redux's get_bald_batch, when it is installed
    from batchbald_redux.batchbald import CandidateBatch
except ImportError:  # pragma: no cover - exercised only without batchbald_redux

    @dataclass
    class CandidateBatch:  # type: ignore[no-redef]
        """Scores and pool indices of an acquired batch (batchbald_redux's type)."""

        scores: list[float]
        indices: list[int]


__all__ = [
    "CandidateBatch",
    "bald_from_logprobs",
    "bald_from_probs",
    "compute_conditional_entropy",
    "compute_entropy",
    "conditional_entropy_from_logprobs",
    "conditional_entropy_from_probs",
    "get_bald_batch",
    "get_batchbald_batch",
    "get_bald_scores",
    "marginal_entropy_from_logprobs",
    "marginal_entropy_from_probs",
]


def _metric(x_N_K_C: torch.Tensor, metric: str, input: str) -> torch.Tensor:
    if not isinstance(x_N_K_C, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor [N, K, C], got {type(x_N_K_C).__name__}")
    if x_N_K_C.dim() != 3:
        raise ValueError(f"expected a tensor [N, K, C], got shape {tuple(x_N_K_C.shape)}")
    return getattr(_fb_scores(x_N_K_C.detach(), input=input, metrics=[metric]), metric)


# ------------------------------------------------------------------------------------------------
# batchbald_redux.batchbald
# ------------------------------------------------------------------------------------------------
def get_bald_scores(log_probs_N_K_C: torch.Tensor) -> torch.Tensor:
    """BALD of every pool item, ``[N]`` (float32 for float32 input, float64 for float64), on the
    input's device. Log-probabilities or logits ``[N, K, C]``."""
    # 'logits' normalises each sample (a no-op for log-probs) at no extra cost in the kernel.
    return _metric(log_probs_N_K_C, "bald", "logits")


def compute_entropy(log_probs_N_K_C: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean prediction, ``[N]`` float64 on the CPU, like batchbald_redux's."""
    return _metric(log_probs_N_K_C, "entropy", "logits").to("cpu", torch.float64)


def compute_conditional_entropy(log_probs_N_K_C: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample entropy, ``[N]`` float64 on the CPU, like
    batchbald_redux's."""
    return _metric(log_probs_N_K_C, "expected_entropy", "logits").to("cpu", torch.float64)


def get_bald_batch(
    log_probs_N_K_C: torch.Tensor, batch_size: int, dtype=None, device=None
) -> CandidateBatch:
    """The ``batch_size`` pool items of highest BALD, as batchbald_redux's ``get_bald_batch``:
    ``CandidateBatch(scores, indices)``, highest first. ``dtype`` and ``device`` are accepted for
    its signature and unused (as there)."""
    N = log_probs_N_K_C.shape[0]
    batch_size = min(batch_size, N)
    if batch_size <= 0:
        return CandidateBatch([], [])
    scores_N = get_bald_scores(log_probs_N_K_C)
    values, indices = torch.topk(scores_N.to(torch.float64), batch_size)
    return CandidateBatch(values.tolist(), indices.tolist())


def get_batchbald_batch(
    log_probs_N_K_C: torch.Tensor, batch_size: int, num_samples: int, dtype=None, device=None
) -> CandidateBatch:
    """batchbald_redux's ``get_batchbald_batch``, computed by :func:`fastbald.batchbald_batch`
    (native op: no ``N x M x C`` temporary, chosen points never re-sampled, lazy greedy).

    Same arguments and result: ``CandidateBatch(scores, indices)`` in the order chosen, ``scores``
    the joint mutual information of the first i + 1 points. ``batch_size`` is capped at N as there.
    ``dtype`` is the inner-product precision (``None``: float32, as batchbald_redux's default;
    ``torch.float64`` for redux's double mode). ``device`` is accepted for the signature: the op
    runs on the CPU (a CUDA input is copied there). In the exact regime (``C**n <= num_samples``)
    the batch is batchbald_redux's; beyond, both are Monte-Carlo estimates with different draws
    (seed 0 here: deterministic).
    """
    from ..batchbald import batchbald_batch

    if not isinstance(log_probs_N_K_C, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor [N, K, C], got {type(log_probs_N_K_C).__name__}")
    if log_probs_N_K_C.dim() != 3:
        raise ValueError(f"expected a tensor [N, K, C], got shape {tuple(log_probs_N_K_C.shape)}")
    N = log_probs_N_K_C.shape[0]
    batch_size = min(int(batch_size), N)
    if batch_size <= 0:
        return CandidateBatch([], [])
    lp = log_probs_N_K_C.detach().cpu()
    r = batchbald_batch(lp, batch_size, num_samples=int(num_samples),
                        dtype=torch.float32 if dtype is None else dtype)
    return CandidateBatch(r.scores.tolist(), r.indices.tolist())


# ------------------------------------------------------------------------------------------------
# epig: src/uncertainty/bald_logprobs.py and bald_probs.py
# ------------------------------------------------------------------------------------------------
def bald_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """BALD ``[N]`` of log-probabilities ``[N, K, C]`` (epig's ``bald_from_logprobs``)."""
    return _metric(logprobs, "bald", "logits")


def marginal_entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """``H[E_theta p(y|x, theta)]`` ``[N]`` of log-probabilities ``[N, K, C]``."""
    return _metric(logprobs, "entropy", "logits")


def conditional_entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """``E_theta H[p(y|x, theta)]`` ``[N]`` of log-probabilities ``[N, K, C]``."""
    return _metric(logprobs, "expected_entropy", "logits")


def bald_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """BALD ``[N]`` of probabilities ``[N, K, C]`` (epig's ``bald_from_probs``)."""
    return _metric(probs, "bald", "probs")


def marginal_entropy_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """``H[E_theta p(y|x, theta)]`` ``[N]`` of probabilities ``[N, K, C]``."""
    return _metric(probs, "entropy", "probs")


def conditional_entropy_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """``E_theta H[p(y|x, theta)]`` ``[N]`` of probabilities ``[N, K, C]``."""
    return _metric(probs, "expected_entropy", "probs")
