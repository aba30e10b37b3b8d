"""Public scoring API: every acquisition score of a pool from one pass over its logits."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _ops
from .metrics import METRICS, metrics_mask
from .reference import INPUT_KINDS, reference_scores

LAYOUTS: tuple[str, ...] = ("NTC", "TNC", "NCT")
BACKENDS: tuple[str, ...] = ("auto", "native", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Default tolerance on |sum_c p_tc - 1| for input="probs", per input dtype.
_PROB_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

_warned_fallback = False


class PoolScores(NamedTuple):
    """Scores of N pool items, each a [N] tensor (None when not requested), in nats.

    Uncertain items have a large ``entropy``, ``bald``, ``variation_ratio``, ``mean_std`` and
    ``least_confidence``, and a small ``margin``.
    """

    entropy: torch.Tensor | None
    expected_entropy: torch.Tensor | None
    bald: torch.Tensor | None
    variation_ratio: torch.Tensor | None
    mean_std: torch.Tensor | None
    margin: torch.Tensor | None
    least_confidence: torch.Tensor | None


def backends() -> dict[str, str]:
    """What can compute scores here: {"cpu-native": "available (avx512 kernel)" | "unavailable: why", ...}."""
    st = _ops.load()
    out = {"torch": "available (pure PyTorch, any device)"}
    out["cpu-native"] = (
        f"available ({st['cpu']} kernel)" if st["cpu"] else f"unavailable: {st['why'].get('cpu')}"
    )
    if st["cuda"] and torch.cuda.is_available():
        out["cuda-native"] = "available"
    else:
        out["cuda-native"] = f"unavailable: {st['why'].get('cuda')}"
    return out


def _as_tensor(x: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise TypeError(f"x must hold floating-point values, got numpy dtype {x.dtype}")
        return torch.from_numpy(x), True
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x, False


def _canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View x as [N, T, C] (no copy: only the strides change)."""
    if not isinstance(layout, str) or layout.upper() not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if x.dim() != 3:
        raise ValueError(
            f"x must have 3 dimensions ({layout}: pool items, MC samples, classes), "
            f"got shape {tuple(x.shape)}"
        )
    layout = layout.upper()
    perm = {"NTC": (0, 1, 2), "TNC": (1, 0, 2), "NCT": (0, 2, 1)}[layout]
    return x.permute(*perm)


def _validate(x: torch.Tensor, input: str) -> None:
    if input not in INPUT_KINDS:
        raise ValueError(f"input must be one of {INPUT_KINDS}, got {input!r}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x must be float32, float64, float16 or bfloat16, got {x.dtype}"
            + (" (cast integer class counts or labels to float first)" if not x.is_floating_point() else "")
        )
    if x.device.type == "meta":
        raise ValueError("x is on the meta device: it has no values to score")
    N, T, C = x.shape
    if T == 0 or C == 0:
        raise ValueError(f"x must have T >= 1 samples and C >= 1 classes, got N={N}, T={T}, C={C}")


def _check_torch_input(x: torch.Tensor, input: str, prob_tol: float) -> None:
    """Data checks of the torch backend (the native ops do the same checks inside the kernel)."""
    bad = torch.isnan(x) | (x == float("inf"))
    if input == "probs":
        bad |= x < 0
    else:
        bad |= (x == float("-inf")).all(-1, keepdim=True)
    row_bad = bad.flatten(1).any(1)
    if bool(row_bad.any()):
        n = int(row_bad.nonzero()[0, 0])
        raise ValueError(
            f"pool item {n} has NaN, +inf, all -inf or (for probs) negative values; "
            "pass check_finite=False to skip this check"
        )
    if input == "probs":
        s = x.to(torch.float64).sum(-1)
        off = (s - 1).abs() > prob_tol
        if bool(off.any()):
            n, t = (int(v) for v in off.nonzero()[0])
            raise ValueError(
                f"input='probs' but the probabilities of pool item {n}, sample {t} sum to "
                f"{float(s[n, t]):.6g}, not 1 (tolerance {prob_tol:g})"
            )


def _compute(
    x: Any,
    *,
    input: str,
    layout: str,
    backend: str,
    metrics: Iterable[str] | None,
    check_finite: bool,
    prob_tol: float | None,
) -> tuple[torch.Tensor, bool]:
    global _warned_fallback
    t, was_numpy = _as_tensor(x)
    t = _canonical(t, layout)
    _validate(t, input)
    mask = metrics_mask(metrics)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    tol = float(prob_tol if prob_tol is not None else _PROB_TOL[t.dtype])
    use_native = False
    if backend in ("auto", "native"):
        use_native = _ops.native_available(t.device)
        if not use_native:
            why = _ops.why_not(t.device.type) or f"no native kernel for device {t.device.type}"
            if backend == "native":
                raise RuntimeError(f"backend='native' is unavailable for {t.device}: {why}")
            if not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    f"fastbald: using the pure-PyTorch backend ({why})", RuntimeWarning, stacklevel=3
                )
    if use_native:
        out = torch.ops.fastbald.pool_scores(t, INPUT_KINDS.index(input), mask, check_finite, tol)
    else:
        if check_finite and t.shape[0] > 0:
            _check_torch_input(t, input, tol)
        out = reference_scores(t, input)
    return out, was_numpy


def _field(out: torch.Tensor, i: int, was_numpy: bool) -> Any:
    v = out[i]
    return v.numpy() if was_numpy else v


def scores(
    x: Any,
    *,
    input: str = "logits",
    layout: str = "NTC",
    backend: str = "auto",
    metrics: Iterable[str] | None = None,
    check_finite: bool = True,
    prob_tol: float | None = None,
) -> PoolScores:
    """All acquisition scores of a pool of MC-dropout predictions, from one pass over ``x``.

    Args:
        x: [N, T, C] predictions (N pool items, T stochastic passes, C classes) as a tensor or a
            numpy array (numpy in, numpy out); float32, float64, float16 or bfloat16, any strides.
        input: what ``x`` holds: ``"logits"`` (default), ``"log_probs"`` or ``"probs"``.
        layout: axis order of ``x``: ``"NTC"`` (default), ``"TNC"`` (a stack of T forward passes) or
            ``"NCT"`` (baal's predictions); read through strides, never copied.
        backend: ``"auto"`` (native kernel for x's device, else pure PyTorch with one warning),
            ``"native"`` (raise if unavailable) or ``"torch"``.
        metrics: names of the metrics to compute (default all); the others are ``None``.
        check_finite: raise ValueError naming the first pool item with NaN, +inf or an all -inf row
            (and, for probs, negative values or rows that do not sum to 1).
        prob_tol: tolerance on ``|sum_c p - 1|`` for ``input="probs"`` (default by dtype).

    Returns:
        PoolScores of [N] tensors: float64 for float64 input, float32 otherwise.
    """
    out, was_numpy = _compute(
        x, input=input, layout=layout, backend=backend, metrics=metrics,
        check_finite=check_finite, prob_tol=prob_tol,
    )
    mask = metrics_mask(metrics)
    return PoolScores(
        *(_field(out, i, was_numpy) if mask >> i & 1 else None for i in range(len(METRICS)))
    )


def _one(name: str):
    i = METRICS.index(name)

    def f(
        x: Any,
        *,
        input: str = "logits",
        layout: str = "NTC",
        backend: str = "auto",
        check_finite: bool = True,
        prob_tol: float | None = None,
    ) -> Any:
        out, was_numpy = _compute(
            x, input=input, layout=layout, backend=backend, metrics=[name],
            check_finite=check_finite, prob_tol=prob_tol,
        )
        return _field(out, i, was_numpy)

    return f


bald = _one("bald")
bald.__name__ = "bald"
bald.__doc__ = "BALD: mutual information between prediction and weights, (1/T) sum_t KL(p_t || pbar). Same arguments as scores()."
predictive_entropy = _one("entropy")
predictive_entropy.__name__ = "predictive_entropy"
predictive_entropy.__doc__ = "Entropy of the mean prediction, H[pbar] (Max Entropy). Same arguments as scores()."
expected_entropy = _one("expected_entropy")
expected_entropy.__name__ = "expected_entropy"
expected_entropy.__doc__ = "Mean entropy of the T sampled predictions, E_t H[p_t]. Same arguments as scores()."
variation_ratio = _one("variation_ratio")
variation_ratio.__name__ = "variation_ratio"
variation_ratio.__doc__ = "1 - (count of the modal sampled class) / T. Same arguments as scores()."
mean_std = _one("mean_std")
mean_std.__name__ = "mean_std"
mean_std.__doc__ = "Mean over classes of the std over samples of p_tc (Mean STD). Same arguments as scores()."
margin = _one("margin")
margin.__name__ = "margin"
margin.__doc__ = "pbar top-1 minus top-2 (small = uncertain). Same arguments as scores()."
least_confidence = _one("least_confidence")
least_confidence.__name__ = "least_confidence"
least_confidence.__doc__ = "1 - max_c pbar_c. Same arguments as scores()."
