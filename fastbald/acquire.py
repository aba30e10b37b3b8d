"""Top-k acquisition from pool scores."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .metrics import ACQUISITION_TABLE, METRIC_TABLE, METRICS
from .scores import (
    _PROB_TOL,
    INPUT_KINDS,
    _as_tensor,
    _canonical,
    _check_torch_input,
    _validate,
    numpy_to_tensor,
)
from .scores import scores as _scores

#: Metrics where a *small* value means an uncertain (informative) item.
ASCENDING = frozenset(m.name for m in METRIC_TABLE if m.ascending)
#: What ``acquire`` accepts: every metric (top-k by it), then the other acquisition functions.
METHODS: tuple[str, ...] = (*METRICS, *(a.name for a in ACQUISITION_TABLE if a.name not in METRICS))
_RULES = {a.name: a.rule for a in ACQUISITION_TABLE}
_STOCHASTIC_RULES = ("power", "softmax", "softrank")  # the modes of fastbald.stochastic


def ranking_key(values: torch.Tensor, method: str) -> torch.Tensor:
    """Key where larger = acquire first (negates metrics where small means uncertain)."""
    return -values if method in ASCENDING else values


def top_k(values: torch.Tensor, k: int, largest: bool = True, check_nan: bool = False) -> torch.Tensor:
    """Indices of the ``k`` largest (``largest=False``: smallest) of ``values`` [N], best first,
    ties broken by the lowest index: exactly ``torch.sort(v, descending=largest,
    stable=True).indices[:k]``, without sorting the pool.

    ``torch.topk`` of k+1 items (O(N)) gives the answer when the (k+1)-th value differs from the
    k-th; else (ties at the k-th value ``v``) the items strictly better than ``v`` and the
    lowest-indexed items equal to ``v`` (two more passes). The k are ordered by a stable sort of
    those k alone. NaN has no consistent place in a top-k: ``check_nan=True`` raises ValueError
    naming the first NaN item (found by the same topk: NaN orders above everything), else the
    caller must have rejected it. -0.0 and 0.0 are equal, as in the sort. ``k`` must be an
    integer (Python or numpy, not bool) in ``[0, N]``, else ValueError (as in ``acquire``).
    """
    N = values.shape[0]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= N:
        raise ValueError(f"k must be an integer in [0, N={N}], got {k!r}")
    k = int(k)
    if check_nan and values.is_floating_point() and N:
        # torch.topk orders NaN above everything: the largest value is NaN iff there is one (one
        # more single-threaded pass only for ascending metrics; no parallel region).
        top1 = torch.topk(values, 1).values if not largest or k == 0 else None
        if top1 is not None and bool(torch.isnan(top1[0])):
            raise ValueError(f"scores contain NaN (first at pool item {int(torch.isnan(values).nonzero()[0, 0])})")
    if k == 0 or N == 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    # The k+1 best, sorted: when the (k+1)-th value differs from the k-th, no item outside the
    # first k is tied with it and those k are the answer (one O(N) pass, the common case).
    top_v, top_i = torch.topk(values, min(k + 1, N), largest=largest, sorted=True)
    if check_nan and largest and values.is_floating_point() and bool(torch.isnan(top_v[0])):
        raise ValueError(f"scores contain NaN (first at pool item {int(torch.isnan(values).nonzero()[0, 0])})")
    kth = top_v[k - 1]
    if k == N or bool(top_v[k] != kth):
        cand = top_i[:k].sort().values  # ascending index
    else:  # ties cut at the k-th value: the better ones and the lowest-indexed tied ones
        better = (values > kth if largest else values < kth).nonzero().squeeze(1)
        tied = (values == kth).nonzero().squeeze(1)[: k - better.shape[0]]
        cand = torch.cat([better, tied]).sort().values
    order = torch.sort(values[cand], descending=largest, stable=True).indices
    return cand[order]


def _batchbald_log_probs(
    x: torch.Tensor, input: str = "logits", layout: str = "NTC", prob_tol: float | None = None, **other: Any
) -> torch.Tensor:
    """[N, T, C] log-probabilities for ``batchbald_batch`` from predictions that are what ``input``
    says (as in ``fastbald.scores``); probabilities are checked (finite, >= 0, rows summing to 1)."""
    if other:
        raise TypeError(
            f"acquire(..., 'batchbald') takes only input=, layout= and prob_tol= keyword arguments, got "
            f"{sorted(other)}"
        )
    if input not in INPUT_KINDS:
        raise ValueError(f"input must be one of {INPUT_KINDS}, got {input!r}")
    x = _canonical(x, layout)
    _validate(x, input)
    tol = float(prob_tol if prob_tol is not None else _PROB_TOL[x.dtype])
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if input == "probs":
        _check_torch_input(x, "probs", tol)
        x = x.log()  # 0 -> -inf (a class of probability 0); renormalised below
    return torch.log_softmax(x, -1)


def acquire(
    x_or_scores: Any,
    k: int,
    method: str = "bald",
    *,
    generator: torch.Generator | None = None,
    **score_kwargs: Any,
) -> Any:
    """Indices of the ``k`` pool items to label next, best first.

    Args:
        x_or_scores: [N, T, C] predictions (scored with ``fastbald.scores(**score_kwargs)``), a [N]
            tensor/array of scores of ``method``, or a ``PoolScores``.
        k: how many items to pick (0 <= k <= N).
        method: one of ``fastbald.acquire.METHODS``; ``"random"`` picks uniformly (``generator``).
        score_kwargs: keyword arguments of ``fastbald.scores`` for [N, T, C] predictions
            (``input``, ``layout``, ...). ``"batchbald"`` takes ``input``, ``layout`` and ``prob_tol``
            only (TypeError for others) and needs [N, T, C] predictions.
    Ties are broken deterministically: the lowest pool index first. Returns int64 indices (numpy if
    the input was numpy).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rule = "top_k" if method in METRICS else _RULES[method]
    if rule in _STOCHASTIC_RULES:  # p ~ score^beta etc., beta = 1 (fastbald.stochastic)
        from .stochastic import stochastic_acquire

        metric = next(a.metric for a in ACQUISITION_TABLE if a.name == method)
        return stochastic_acquire(x_or_scores, k, rule, 1.0, metric, generator=generator, **score_kwargs)
    if rule == "batchbald":  # a joint criterion of [N, T, C] predictions (fastbald.batchbald)
        from .batchbald import batchbald_batch

        x, was_np = _as_tensor(x_or_scores)
        lp = _batchbald_log_probs(x, **score_kwargs)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        idx = batchbald_batch(lp.cpu().contiguous(), k, seed=seed).indices
        return idx.numpy() if was_np else idx
    if rule not in ("top_k", "uniform"):  # pragma: no cover - a table row without an implementation
        raise NotImplementedError(f"acquire() does not implement the {rule!r} rule of {method!r}")
    was_numpy = isinstance(x_or_scores, np.ndarray)
    obj = numpy_to_tensor(x_or_scores) if was_numpy else x_or_scores
    if hasattr(obj, "_fields"):  # PoolScores
        if rule == "uniform":
            obj = next(v for v in obj if v is not None)
        else:
            obj = getattr(obj, method)
            if obj is None:
                raise ValueError(f"these PoolScores do not hold {method!r}")
        if isinstance(obj, np.ndarray):  # PoolScores of numpy input hold numpy rows
            was_numpy, obj = True, numpy_to_tensor(obj)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"x_or_scores must be a tensor, numpy array or PoolScores, got {type(obj).__name__}")
    if obj.dim() == 3:
        N = obj.shape[0] if score_kwargs.get("layout", "NTC").upper() != "TNC" else obj.shape[1]
        if rule == "top_k":
            obj = getattr(_scores(obj, metrics=[method], **score_kwargs), method)
    elif obj.dim() == 1:
        N = obj.shape[0]
    else:
        raise ValueError(f"x_or_scores must be [N] scores or [N, T, C] predictions, got shape {tuple(obj.shape)}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= N:
        raise ValueError(f"k must be an integer in [0, N={N}], got {k!r}")
    if rule == "uniform":
        idx = torch.randperm(N, generator=generator)[: int(k)]
    else:
        idx = top_k(obj, int(k), largest=method not in ASCENDING, check_nan=True)
    return idx.cpu().numpy() if was_numpy else idx
