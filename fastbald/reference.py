"""Pure-PyTorch implementation of the pool scores.

Two roles:

* the ``"torch"`` backend, used when the native extension is not built (it processes the pool in
  chunks so its temporaries stay bounded, whatever N is);
* in float64, the oracle the tests and benchmarks compare the native kernels against.

The math follows the definitions in ``csrc/scores_math.h`` (and ../shared/README.md section 1):
per sample ``log p_t = z_t - logsumexp(z_t)``, mean prediction ``pbar = mean_t p_t``, BALD in the
mean-KL form ``(1/T) sum_t KL(p_t || pbar)`` (no cancellation between two large entropies).
All outputs are in nats; ``0 log 0 = 0``; a ``-inf`` logit is a masked class.
"""

from __future__ import annotations

import math

import torch

from .metrics import METRICS, N_METRICS

__all__ = ["INPUT_KINDS", "METRICS", "reference_scores"]

INPUT_KINDS: tuple[str, ...] = ("logits", "log_probs", "probs")

# Elements per chunk of the torch backend (the temporaries are a few times this).
_CHUNK_ELEMS = 1 << 22


def _where0(keep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` where ``keep``, else 0."""
    return torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))


def _xlogy0(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """p * logp with the convention 0 * log 0 = 0 (also when logp is -inf).

    Where ``p`` is 0 the product's factor is replaced by 0 *before* multiplying, not only the
    product after: else the backward pass multiplies a zero gradient by ``logp = -inf`` and
    every gradient that shares the graph turns NaN (the same guard in :func:`_scores_chunk`)."""
    live = p > 0
    return _where0(live, p * _where0(live, logp))


def _scores_chunk(x: torch.Tensor, input_kind: str, acc: torch.dtype, branchless: bool = False) -> torch.Tensor:
    """Scores of one chunk x [n, T, C] (any dtype) -> [N_METRICS, n] in ``acc`` (rows in
    ``METRICS`` order). ``branchless``: no branch on the data (the same values; the native op's
    backward needs it to be traceable by torch.compile)."""
    n, T, C = x.shape
    z = x.to(acc)
    if input_kind == "probs":
        s = z.sum(-1, keepdim=True)
        pos = z > 0  # log 0 = -inf without the 1/0 derivative that would poison the gradient
        ninf = torch.full((), -math.inf, dtype=acc, device=z.device)
        logp = torch.where(pos, torch.log(torch.where(pos, z, torch.ones((), dtype=acc))), ninf) - torch.log(s)
    else:
        logp = torch.log_softmax(z, dim=-1)
    p = torch.exp(logp)  # [n, T, C]
    h_t = -_xlogy0(p, logp).sum(-1)  # [n, T]
    expected_entropy = h_t.mean(-1)
    pbar = p.mean(1)  # [n, C]
    # log pbar via logsumexp over t in the log domain (robust to underflow of p). A class that is
    # -inf in every sample has log pbar = -inf; logsumexp's derivative there is 0/0, so it is
    # taken over zeros and the -inf put back.
    dead = torch.isneginf(logp).all(1)  # [n, C]
    lse = torch.logsumexp(torch.where(dead.unsqueeze(1), torch.zeros((), dtype=acc), logp), dim=1)
    logpbar = torch.where(dead, torch.full((), -math.inf, dtype=acc), lse) - torch.log(
        torch.tensor(float(T), dtype=acc)
    )
    entropy = -_xlogy0(pbar, logpbar).sum(-1)
    live = p > 0
    kl = _where0(live, p * _where0(live, logp - logpbar.unsqueeze(1)))
    bald = (kl.sum(-1).mean(-1)).clamp_min(0)
    # Variation ratio: mode of the sampled classes (argmax per sample, ties -> lowest index).
    # A row holding NaN votes for the argmax of its classes before the first NaN (class 0 when
    # the NaN is at class 0), the native kernels' rule (scores_math.h row_max_argmax).
    zl = torch.log(z) if input_kind == "probs" else z  # as the kernels: probabilities -> log
    nan = torch.isnan(zl)
    if branchless or bool(nan.any()):
        zl = torch.where(nan.cumsum(-1) > 0, torch.full((), -math.inf, dtype=acc), zl)
    am = torch.argmax(zl, dim=-1)
    counts = torch.zeros(n, C, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, am, torch.ones_like(am))
    variation_ratio = 1 - counts.max(-1).values.to(acc) / T
    # Variance over samples by its definition, E_t[(p_t - pbar)^2] (two passes, as in
    # scores_math.h): no cancellation, unlike E[p^2] - pbar^2 when all samples agree.
    var = (p - pbar.unsqueeze(1)).square().mean(1)
    # sqrt has an infinite derivative at 0 (all samples agree, e.g. a masked class): use 0 there.
    pos_var = var > 0
    mean_std = _where0(pos_var, torch.sqrt(torch.where(pos_var, var, torch.ones((), dtype=acc)))).mean(-1)
    if C >= 2:
        top2 = torch.topk(pbar, 2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = pbar[:, 0]
    least_confidence = 1 - pbar.max(-1).values
    # An item with a row whose max is NaN or infinite (a NaN anywhere, +inf, or every class
    # masked) has no defined scores: NaN for all but the variation ratio, as the kernels give
    # with check_finite=False.
    row_max = torch.where(nan, torch.full((), math.nan, dtype=acc), zl).amax(-1)  # NaN-propagating
    invalid = ~torch.isfinite(row_max).all(-1)  # [n]
    if branchless or bool(invalid.any()):
        nan_n = torch.full((), math.nan, dtype=acc)
        entropy, expected_entropy, bald, mean_std, margin, least_confidence = (
            torch.where(invalid, nan_n, v)
            for v in (entropy, expected_entropy, bald, mean_std, margin, least_confidence)
        )
    rows = {
        "entropy": entropy,
        "expected_entropy": expected_entropy,
        "bald": bald,
        "variation_ratio": variation_ratio,
        "mean_std": mean_std,
        "margin": margin,
        "least_confidence": least_confidence,
    }
    return torch.stack([rows[m] for m in METRICS])


def reference_scores(x: torch.Tensor, input_kind: str = "logits", *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every metric of a pool ``x`` [N, T, C] as a [N_METRICS, N] tensor (rows in ``METRICS``
    order, see :mod:`fastbald.metrics`).

    ``dtype`` is the accumulation/output dtype: float64 gives the test oracle; by default
    float64 input is computed in float64 and everything else in float32.
    No input validation: callers (``fastbald.scores``) validate first.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input must be one of {INPUT_KINDS}, got {input_kind!r}")
    acc = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    N, T, C = x.shape
    out = torch.empty(N_METRICS, N, dtype=acc, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(1, T * C))
    for i in range(0, N, step):
        out[:, i : i + step] = _scores_chunk(x[i : i + step], input_kind, acc)
    return out
