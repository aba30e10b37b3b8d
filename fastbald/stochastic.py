"""Stochastic batch acquisition (Kirsch, Farquhar, Atighehchian, Jesson, Branchaud-Charron & Gal,
"Stochastic Batch Acquisition: A Simple Baseline for Deep Active Learning", TMLR 2023).

Instead of the top-k of a score, draw k pool items without replacement with probabilities

* ``"power"``:    p_i ~ s_i^beta, s clamped at 0 (the paper's PowerBALD when s is BALD),
* ``"softmax"``:  p_i ~ exp(beta s_i),
* ``"softrank"``: p_i ~ rank_i^-beta, rank 1 = the best item (real ranks: tied scores share their
  average rank, as scipy's ``rankdata``),

where ``s`` is any score of :class:`fastbald.PoolScores`, oriented so that large = acquire first
(``margin``, where small is uncertain, enters softmax and softrank negated, and power as
``1 - margin``). ``beta = inf`` is the top-k of ``fastbald.acquire``; ``beta = 0`` is uniform.

The draw is a Gumbel top-k: item i gets the key ``log p_i + G_i`` with G_i a standard Gumbel, and
the k largest keys, in order, are a sample of k items without replacement (the sequential
"draw, remove, renormalise" of ``np.random.choice(replace=False, p=...)``). Everything is in
log-space, shifted before the scaling by beta so that the best item's log-weight is 0 (``beta *
(s - max s)``, ``beta * (log s - log max s)``, ``-beta * (log rank - log min rank)``): no key is
+inf however large beta is. An item whose weight underflows relative to the best (a ratio below
exp(-1.8e308)) is drawn after the others in a new round re-shifted to the remaining best (the
same Plackett-Luce draw); after 64 such rounds, the rest in score order (the beta -> inf limit).
Items of weight 0 (power: a score <= 0) come after every item of positive weight, in uniformly
random order.

The noise of item i is a pure function of ``(seed, i)`` (splitmix64), so a seed gives the same
draw on every backend and for any number of threads. On the CPU, power and softmax run in one fused
native pass (``torch.ops.fastbald.stochastic_topk``: a running top-k that skips, with integer
arithmetic only, every item that cannot enter it; no temporary of size N): about the time of
``torch.topk`` itself (``fastbald bench batch``). Softrank (mode 3 of the same op) gets the ranks
without sorting the pool: a histogram of the scores bounds every item's rank, the scan keeps the
items whose bound can reach the top k, and only those get their exact average rank (one more pass).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _ops
from .acquire import ASCENDING, ranking_key, top_k

__all__ = ["MODES", "sampling_probabilities", "stochastic_acquire"]

MODES: tuple[str, ...] = ("power", "softmax", "softrank")
_MODE_CODE = {"logw": 0, "power": 1, "softmax": 2, "softrank": 3}
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

_NATIVE: dict[str, Any] = {}
# Rounds of re-shifted draws for items whose weight underflows relative to the best (huge beta);
# beyond them the remaining items come in score order (the beta -> inf limit).
_MAX_LEVELS = 64


def _native_op():
    """``torch.ops.fastbald.stochastic_topk`` when the CPU extension is built, else None."""
    return _ops.extension_op("fastbald._stochastic_cpu", "stochastic_topk", _NATIVE)


# ------------------------------------------------------------------------------------------------
# The noise: splitmix64 of (seed, item), bit for bit as csrc/cpu/stochastic_cpu.cpp
# ------------------------------------------------------------------------------------------------
def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _lsr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _lsr(z, 30)) * _signed(_M1)  # int64 multiplication wraps modulo 2^64
    z = (z ^ _lsr(z, 27)) * _signed(_M2)
    return z ^ _lsr(z, 31)


def gumbel_noise(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The standard Gumbel noise ``-log(E_i)``, ``E_i = -log(1 - v_i)``, of items 0..n-1 for
    ``seed`` (float64), the noise the native kernel adds to item i's log-weight."""
    s0 = _signed(_mix64_int(seed))
    i1 = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    m = _lsr(_mix64(i1 * _signed(_GAMMA) + s0), 11)
    v = (m.to(torch.float64) + 0.5) * 2.0**-53
    return -torch.log(-torch.log1p(-v))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def _values(x_or_scores: Any, method: str, score_kwargs: dict) -> torch.Tensor:
    """The [N] scores of ``method`` from a tensor / array of scores, PoolScores or predictions."""
    obj = x_or_scores
    if hasattr(obj, "_fields"):  # PoolScores
        v = getattr(obj, method, None)
        if v is None:
            raise ValueError(f"these PoolScores do not hold {method!r}")
        obj = v
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"x_or_scores must be a tensor, numpy array or PoolScores, got {type(obj).__name__}"
        )
    if obj.dim() == 3:
        from .scores import scores as _scores

        obj = getattr(_scores(obj, metrics=[method], **score_kwargs), method)
    if obj.dim() != 1:
        raise ValueError(
            f"x_or_scores must be [N] scores or [N, T, C] predictions, got shape {tuple(obj.shape)}"
        )
    if not obj.is_floating_point():
        obj = obj.to(torch.float64)
    if obj.dtype not in (torch.float32, torch.float64):
        obj = obj.float()
    return obj.detach()


def _check_finite(values: torch.Tensor) -> None:
    # A NaN or inf makes the sum non-finite (so may an overflow): only then the exact search, which
    # costs a [N] bool temporary (5 ms per 1M scores on a busy machine, more than the draw).
    if values.shape[0] == 0 or bool(torch.isfinite(values.sum())):
        return
    ok = torch.isfinite(values)
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(f"scores must be finite; pool item {i} is {values[i].item()}")


def _check_args(mode: str, beta: float, k: Any, N: int) -> float:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (inf = top-k, 0 = uniform), got {beta}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > N:
        raise ValueError(f"k={k} is larger than the pool ({N} items)")
    return beta


def _oriented(values: torch.Tensor, mode: str, method: str) -> torch.Tensor:
    """The score that the mode's weights use, large = acquire first."""
    if mode == "power" and method in ASCENDING:
        return 1.0 - values.to(torch.float64)  # margin in [0, 1]: 1 - margin >= 0, large = uncertain
    return ranking_key(values, method)


def _average_ranks(key: torch.Tensor) -> torch.Tensor:
    """Ranks of ``key`` in descending order, 1 = largest; ties share their average rank."""
    N = key.shape[0]
    sv, order = torch.sort(key, descending=True)  # order within ties is irrelevant
    new = torch.ones(N, dtype=torch.bool, device=key.device)
    new[1:] = sv[1:] != sv[:-1]
    gid = torch.cumsum(new, 0) - 1
    first = new.nonzero().squeeze(1)
    last = torch.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1:] = N - 1
    avg = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty(N, dtype=torch.float64, device=key.device)
    ranks[order] = avg[gid]
    return ranks


def _shift(s: torch.Tensor, mode: str) -> float:
    """The largest unscaled log-weight (softmax: max s; power: log max s, 0 if no s > 0), which
    ``_log_weights`` and the native kernel subtract BEFORE scaling by beta: the best item gets
    log-weight 0 and no log-weight is +inf however large beta is (beta * s overflowed)."""
    if s.shape[0] == 0:
        return 0.0
    m = float(s.max())
    if not math.isfinite(m):  # NaN / inf scores: the caller's check names the item
        return 0.0
    if mode == "power":
        return math.log(m) if m > 0 else 0.0
    return m


def _log_weights(s: torch.Tensor, mode: str, beta: float) -> torch.Tensor:
    """log p (unnormalised), float64, shifted so that the largest is 0 (never +inf; -inf for a
    weight 0, or a weight below exp(-1.8e308) times the largest)."""
    s = s.to(torch.float64)
    if beta == 0:
        return torch.zeros_like(s)
    if mode == "power":
        return beta * (torch.log(s.clamp_min(0)) - _shift(s, mode))
    if mode == "softmax":
        return beta * (s - _shift(s, mode))
    r = torch.log(_average_ranks(s))
    return -beta * (r - r.min()) if s.shape[0] else r


def sampling_probabilities(
    x_or_scores: Any, mode: str = "power", beta: float = 1.0, method: str = "bald", **score_kwargs: Any
) -> torch.Tensor:
    """The probabilities ``p_i`` (``[N]``, float64, summing to 1) of the first draw of
    :func:`stochastic_acquire` with the same arguments. ``beta = inf``: all mass on the best item.
    If every weight is 0 (power, no positive score) the draw is uniform."""
    values = _values(x_or_scores, method, score_kwargs)
    beta = _check_args(mode, beta, 0, values.shape[0])
    _check_finite(values)
    s = _oriented(values, mode, method)
    if math.isinf(beta):
        p = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
        if s.shape[0]:
            p[int(top_k(s, 1)[0])] = 1.0
        return p
    lw = _log_weights(s, mode, beta)
    if s.shape[0] and bool(torch.isneginf(lw).all()):
        lw = torch.zeros_like(lw)
    return torch.softmax(lw, 0)


def _resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        if generator is not None:
            raise ValueError("pass seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        return int(seed) & _MASK64
    # One draw from the generator (the default one when None): torch.manual_seed controls it.
    return int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64))


def _gumbel_topk(
    s: torch.Tensor, k: int, mode: str, beta: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, keys) of the k largest ``log w_i + G_i(seed)``, best first."""
    op = _native_op()
    if op is not None and s.device.type == "cpu":
        # softrank: ranks in the kernel, O(N), no sort of the pool (shift unused). power / softmax:
        # NaN makes the kernel compute _shift's value itself, serially (no parallel region).
        shift = 0.0 if mode == "softrank" or beta == 0 else math.nan
        return op(s.contiguous(), int(k), _MODE_CODE[mode], float(beta), _signed(seed), shift)
    _check_finite(s)
    keys = _log_weights(s, mode, beta) + gumbel_noise(s.shape[0], seed, s.device)
    # Order by key, ties (only -inf keys: weight 0) by the lower index, as the native kernel.
    idx = torch.sort(keys, descending=True, stable=True).indices[:k]
    return idx, keys[idx]


def stochastic_acquire(
    x_or_scores: Any,
    k: int,
    mode: str = "power",
    beta: float = 1.0,
    method: str = "bald",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **score_kwargs: Any,
) -> Any:
    """Draw the ``k`` pool items to label next, without replacement, in the order drawn.

    Args:
        x_or_scores: ``[N]`` scores (tensor or numpy array) of ``method``, a ``PoolScores``, or
            ``[N, T, C]`` predictions (scored with ``fastbald.scores(**score_kwargs)``).
        k: how many items (``0 <= k <= N``).
        mode: ``"power"`` (p ~ max(s, 0)^beta), ``"softmax"`` (p ~ exp(beta s)) or
            ``"softrank"`` (p ~ rank^-beta).
        beta: inverse temperature, ``>= 0``; ``float("inf")`` gives the top-k (the order of
            ``fastbald.acquire``), ``0`` a uniform draw. The paper uses beta = 1.
        method: which score (``"bald"``, ``"entropy"``, ... as in ``fastbald.acquire``); sets the
            direction (``margin``: small = acquire first).
        seed: the draw is a pure function of ``(scores, k, mode, beta, seed)``, whatever the device
            or number of threads. Or ``generator``: a ``torch.Generator`` that supplies the seed
            (one draw from it); neither: one draw from torch's default generator.
    Returns: int64 indices ``[k]`` (numpy if the input was numpy).
    """
    was_numpy = isinstance(x_or_scores, np.ndarray)
    values = _values(x_or_scores, method, score_kwargs)
    N = values.shape[0]
    beta = _check_args(mode, beta, k, N)
    k = int(k)
    if math.isinf(beta):  # top-k (also validates finiteness)
        _check_finite(values)
        idx = top_k(values, k, largest=method not in ASCENDING)
    else:
        seed_ = _resolve_seed(seed, generator)
        s = _oriented(values, mode, method)
        if (mode == "softrank" or beta == 0) and (_native_op() is None or values.device.type != "cpu"):
            _check_finite(values)  # the native kernel checks (and names the item) itself
        run_mode = "softmax" if beta == 0 else mode  # beta = 0: every weight exp(0) = 1
        idx, keys = _gumbel_topk(s, k, run_mode, beta, seed_)
        n_pos = int(torch.isfinite(keys).sum())
        if n_pos < k:
            # Keys of -inf: weight 0 (power, s <= 0), or a weight below exp(-1.8e308) times the
            # best's (huge beta). The latter are drawn next, each round with the log-weights
            # re-shifted to the remaining items' best (the same Plackett-Luce draw, by its
            # memorylessness); then the weight-0 items uniformly.
            taken = torch.zeros(N, dtype=torch.bool, device=values.device)
            taken[idx[:n_pos]] = True
            parts = [idx[:n_pos]]
            positive = s > 0 if run_mode == "power" else torch.ones_like(taken)
            # softrank's weights are the ranks in the WHOLE pool: rank^-beta = exp(beta u).
            lvl_s, lvl_mode = s, run_mode
            if run_mode == "softrank":
                lvl_s, lvl_mode = -torch.log(_average_ranks(s)), "softmax"
            for level in range(1, _MAX_LEVELS + 1):
                cand = (~taken & positive).nonzero().squeeze(1)
                if n_pos == k or cand.shape[0] == 0:
                    break
                if level == _MAX_LEVELS:  # beta -> inf limit: the rest of them by score
                    order = torch.sort(lvl_s[cand], descending=True, stable=True).indices
                    sub = cand[order[: k - n_pos]]
                else:
                    sub, sub_keys = _gumbel_topk(lvl_s[cand], min(k - n_pos, cand.shape[0]), lvl_mode, beta,
                                                 _mix64_int(seed_ + level * _GAMMA))
                    sub = cand[sub[: int(torch.isfinite(sub_keys).sum())]]  # >= 1: the best has key G
                taken[sub] = True
                parts.append(sub)
                n_pos += sub.shape[0]
            idx = torch.cat(parts)
        if n_pos < k:
            # Fewer than k items of positive weight: the rest uniformly from the weight-0 items.
            rest = (~taken).nonzero().squeeze(1)
            sub, _ = _gumbel_topk(
                torch.zeros(rest.shape[0], dtype=torch.float64, device=values.device),
                k - n_pos, "softmax", 0.0, _mix64_int(seed_ ^ 0x5DEECE66D),
            )
            idx = torch.cat([idx[:n_pos], rest[sub]])
    return idx.cpu().numpy() if was_numpy else idx
