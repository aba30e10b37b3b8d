"""Greedy BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019) as a native op.

``batchbald_batch(log_probs_N_K_C, batch_size)`` picks ``batch_size`` pool items one at a time, each
maximising the joint mutual information ``I(y_1..y_n; w) = H(y_1..y_n) - sum_i E_w H(y_i | w)``
of the batch so far plus the candidate, as ``batchbald_redux.batchbald.get_batchbald_batch`` does:

* the joint entropy is exact while ``C**n <= num_samples`` (n = points already chosen), and
  estimated beyond from ``K * (num_samples // K)`` configurations of the chosen points drawn from
  the K-sample mixture and importance-weighted (batchbald_redux's estimator). They are drawn once,
  at the first sampled step; every later chosen point appends one sampled class to each of them
  (batchbald_redux re-draws every chosen point at every step);
* every candidate's joint entropy is a ``[rows, K] x [K, C]`` product with the entropy fused
  behind it, over tiles of candidates in parallel (``torch.get_num_threads()``): no ``N x M x C``
  temporary; memory is ``O(num_samples * K)`` plus a small tile per thread;
* ``lazy=True`` (default) evaluates candidates in decreasing order of an upper bound on their gain
  (their last evaluated gain: BatchBALD is submodular, gains only shrink as the batch grows) and
  stops once the best gain found beats every bound left. In the exact regime this returns the
  same batch as evaluating every candidate (up to rounding ties). In the sampled regime it is a
  heuristic: at the first sampled step every candidate is evaluated (an exact gain does not bound a
  Monte-Carlo estimate), later bounds are the estimate plus three standard errors, so a candidate
  whose estimate rises by more than that between steps may be skipped. ``lazy=False`` evaluates
  every candidate at every step.
* sampled-regime scores are biased low by roughly ``0.5 / num_samples`` nats (about 0.04 nats at
  ``num_samples=12``, 0.01 at 60; negligible at the default 10,000): the greedy order and the
  estimates of the later steps share one configuration table, so the points chosen are those
  whose estimate came out favourable on that very table (a selection effect, not MC noise).

The result is deterministic for a ``seed`` (whatever the number of threads); a chosen point is
never chosen again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import _ops

__all__ = ["BatchResult", "batchbald_batch"]


@dataclass(frozen=True)
class BatchResult:
    """The acquired batch, in the order it was chosen.

    ``indices`` (int64 [b]) are pool indices; ``scores`` (float64 [b]) the joint mutual information
    of the first ``i + 1`` points (batchbald_redux's ``CandidateBatch.scores``), non-decreasing up to
    Monte-Carlo error; ``num_evaluated`` (int64 [b]) how many candidates were evaluated at each step.
    Unpacks as ``indices, scores = result``.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    num_evaluated: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.indices, self.scores))

    def __len__(self) -> int:
        return int(self.indices.numel())


def _has_cuda_kernel() -> bool:
    """Whether fastbald::batchbald has a CUDA kernel (csrc/cuda/batchbald_cuda.cu was built)."""
    if not _ops.load()["native"]:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("fastbald::batchbald", "CUDA"))


def batchbald_batch(
    log_probs_N_K_C: torch.Tensor,
    batch_size: int,
    num_samples: int = 10_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lazy: bool = True,
    prob_tol: float = 1e-3,
) -> BatchResult:
    """Greedy BatchBALD batch of ``batch_size`` pool items.

    Args:
        log_probs_N_K_C: log-probabilities ``[N, K, C]`` (N pool items, K MC samples, C classes),
            float32/float64 (float16/bfloat16 are converted to float32), any strides, on the CPU,
            or on a CUDA device when fastbald was built with CUDA: the op then runs there and the
            result stays on that device (lazy greedy in the exact regime only; the sampled regime
            evaluates every candidate, the batch of ``lazy=False``); other devices are copied to
            the CPU. ``-inf`` is a class of probability 0.
        batch_size: number of items to acquire, ``0 <= batch_size <= N``.
        num_samples: the M of the paper: exact joint entropies while ``C**n <= num_samples``,
            ``K * (num_samples // K)`` sampled configurations beyond. Must be ``>= K``.
        seed: seed of the sampled configurations (counter-based: same result on any thread count).
        dtype: precision of the inner products, ``torch.float32`` (default; all terms are
            non-negative, relative error <= K * 2**-24) or ``torch.float64``. Sums over
            configurations, the conditional entropies and the BALD step are always float64.
        lazy: lazy greedy evaluation (see the module docstring); ``False`` evaluates every
            candidate at every step.
        prob_tol: every ``exp(log_probs[n, k])`` must sum to 1 within this tolerance
            (``math.inf`` skips the check).

    Returns:
        :class:`BatchResult` (indices, scores, num_evaluated).

    Raises:
        ValueError: wrong dimensions, ``batch_size`` outside ``[0, N]``, ``num_samples < K``,
            a NaN / +inf log-probability or a row that is not normalised (naming the item).
        TypeError: ``log_probs_N_K_C`` is not a floating tensor, or ``dtype`` is not
            float32/float64.
    """
    if not isinstance(log_probs_N_K_C, torch.Tensor):
        raise TypeError(f"log_probs_N_K_C must be a torch.Tensor, got {type(log_probs_N_K_C).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if math.isnan(prob_tol):
        raise ValueError("prob_tol must be >= 0 (math.inf skips the check), got nan")
    if not _ops.load()["native"]:
        raise RuntimeError(f"fastbald.batchbald_batch needs the native extension: {_ops.why_not('cpu')}")
    x = log_probs_N_K_C
    if x.device.type != "cpu" and not (x.device.type == "cuda" and _has_cuda_kernel()):
        x = x.cpu()
    idx, scores, nev = torch.ops.fastbald.batchbald(
        x, batch_size, num_samples, int(seed), dtype == torch.float64, bool(lazy), float(prob_tol)
    )
    return BatchResult(idx, scores, nev)
