"""Public scoring API: every acquisition score of a pool from one pass over its logits."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _ops
from .metrics import ALL_METRICS_MASK, METRICS, metric, metrics_mask, parse_metrics
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


assert PoolScores._fields == METRICS, "PoolScores fields must follow fastbald.metrics.METRICS"


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


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, also for what it refuses: non-native byte order and negative strides
    (``a[::-1]``) are copied first; anything else is shared, not copied."""
    if not a.dtype.isnative:  # big-endian data: torch reads native byte order only
        a = a.astype(a.dtype.newbyteorder("="))
    if any(s < 0 for s in a.strides):  # torch has no negative strides
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def _as_tensor(x: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise TypeError(f"x must hold floating-point values, got numpy dtype {x.dtype}")
        return numpy_to_tensor(x), True
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


def _bad_item_message(item: torch.Tensor, n: int, input: str) -> str:
    """What is wrong with pool item ``n`` ([T, C]), in the words of the native kernels'
    ``report_bad_item`` (the first bad sample and class)."""
    v = item.detach().to("cpu", torch.float64)
    for t in range(v.shape[0]):
        row = v[t]
        checks = [("is NaN", torch.isnan(row)), ("is +inf", row == math.inf)]
        if input == "probs":
            checks.append(("is negative", row < 0))
        for what, hit in checks:
            if bool(hit.any()):
                c = int(hit.nonzero()[0, 0])
                value = f" ({float(row[c])!r})" if what == "is negative" else ""
                return (f"pool item {n} (sample {t}, class {c}) {what}{value}; "
                        "pass check_finite=False to skip this check")
        if input != "probs" and bool((row == -math.inf).all()):
            return f"pool item {n} (sample {t}) masks every class (all -inf)"
    return f"pool item {n} is invalid"  # pragma: no cover - the caller found a bad value


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
        raise ValueError(_bad_item_message(x[n], n, input))
    if input == "probs":
        s = x.to(torch.float64).sum(-1)
        off = (s - 1).abs() > prob_tol
        if bool(off.any()):
            n, t = (int(v) for v in off.nonzero()[0])
            raise ValueError(
                f"input='probs' but the probabilities of pool item {n}, sample {t} sum to "
                f"{float(s[n, t]):.6g}, not 1 (tolerance {prob_tol:g})"
            )


_INPUT_CODES = {k: i for i, k in enumerate(INPUT_KINDS)}  # the op's input_kind codes
_OP: dict[str, Any] = {}


def pool_scores_op(
    x: torch.Tensor,
    *,
    metrics: str | Iterable[str] | None = None,
    input_kind: str = "logits",
    check_finite: bool = True,
    prob_tol: float = 1e-4,
) -> torch.Tensor:
    """The fused op ``torch.ops.fastbald.pool_scores`` called by names instead of codes.

    No layout handling, no backend choice, no fallback: ``x`` is [N, T, C] (any strides) on a
    device with a native kernel. Use :func:`scores` unless you want the raw op (benchmarks, tests).

    Args:
        x: [N, T, C] float32, float64, float16 or bfloat16 tensor.
        metrics: metric names (default every metric; see :func:`fastbald.metrics.parse_metrics`).
        input_kind: ``"logits"``, ``"log_probs"`` or ``"probs"``.
        check_finite: let the kernel raise on NaN, +inf, an all -inf row (and bad probabilities).
        prob_tol: tolerance on ``|sum_c p - 1|`` for ``input_kind="probs"``.

    Returns:
        [N_METRICS, N] tensor (float64 for float64 input, else float32), rows in
        :data:`fastbald.metrics.METRICS` order; rows not asked for are NaN.
    """
    kind = _INPUT_CODES.get(input_kind)
    if kind is None:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    mask = ALL_METRICS_MASK if metrics is None else metrics_mask(metrics)
    op = _OP.get("pool_scores")
    if op is None:  # resolved once: the attribute lookups cost more than a small pool's scores
        _ops.load()
        op = _OP["pool_scores"] = torch.ops.fastbald.pool_scores.default
    return op(x, kind, mask, bool(check_finite), float(prob_tol))


def _compute(
    x: Any,
    *,
    input: str,
    layout: str,
    backend: str,
    metrics: tuple[str, ...],
    check_finite: bool,
    prob_tol: float | None,
    stacklevel: int = 3,
) -> tuple[torch.Tensor, bool]:
    """[N_METRICS, N] scores of ``x`` (``metrics``: canonical names, parsed once by the caller)."""
    global _warned_fallback
    t, was_numpy = _as_tensor(x)
    t = _canonical(t, layout)
    _validate(t, input)
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
                    f"fastbald: using the pure-PyTorch backend ({why})",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
    if use_native:
        out = pool_scores_op(
            t, metrics=metrics, input_kind=input, check_finite=check_finite, prob_tol=tol
        )
    else:
        if check_finite and t.shape[0] > 0:
            _check_torch_input(t, input, tol)
        out = reference_scores(t, input)
    return out, was_numpy


def _row(out: torch.Tensor, name: str, was_numpy: bool) -> Any:
    v = out[metric(name).bit]
    return v.numpy() if was_numpy else v


def scores(
    x: Any,
    *,
    input: str = "logits",
    layout: str = "NTC",
    backend: str = "auto",
    metrics: str | Iterable[str] | None = None,
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
    names = parse_metrics(metrics)
    out, was_numpy = _compute(
        x, input=input, layout=layout, backend=backend, metrics=names,
        check_finite=check_finite, prob_tol=prob_tol,
    )
    return PoolScores(*(_row(out, m, was_numpy) if m in names else None for m in METRICS))


def _single(
    name: str, x: Any, input: str, layout: str, backend: str, check_finite: bool,
    prob_tol: float | None,
) -> Any:
    """One metric's [N] scores (the public one-metric functions below)."""
    out, was_numpy = _compute(
        x, input=input, layout=layout, backend=backend, metrics=(name,),
        check_finite=check_finite, prob_tol=prob_tol, stacklevel=4,
    )
    return _row(out, name, was_numpy)


# The one-metric functions: arguments as in scores() (without ``metrics``); each returns a [N]
# tensor (a numpy array for numpy input), float64 for float64 input, float32 otherwise, in nats.


def bald(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """BALD, the mutual information between prediction and weights (large = uncertain).

    ``(1/T) sum_t KL(p_t || pbar) = H[pbar] - E_t H[p_t]``, computed in the mean-KL form (no
    cancellation between two large entropies), clamped at 0. Arguments as in :func:`scores`.
    """
    return _single("bald", x, input, layout, backend, check_finite, prob_tol)


def predictive_entropy(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """Max Entropy: the entropy of the mean prediction, ``H[pbar] = -sum_c pbar_c log pbar_c``.

    Large = uncertain (epistemic and aleatoric together). Arguments as in :func:`scores`.
    """
    return _single("entropy", x, input, layout, backend, check_finite, prob_tol)


def expected_entropy(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """The mean entropy of the T sampled predictions, ``E_t H[p_t]`` (the aleatoric part).

    ``predictive_entropy - expected_entropy`` is BALD. Arguments as in :func:`scores`.
    """
    return _single("expected_entropy", x, input, layout, backend, check_finite, prob_tol)


def variation_ratio(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """Var Ratios: ``1 - (count of the modal sampled class) / T`` (large = uncertain).

    The sampled class of pass t is ``argmax_c z_tc`` (ties: lowest index), as in the paper's
    code. Arguments as in :func:`scores`.
    """
    return _single("variation_ratio", x, input, layout, backend, check_finite, prob_tol)


def mean_std(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """Mean STD: ``(1/C) sum_c sqrt(E_t[(p_tc - pbar_c)^2])`` (large = uncertain).

    The standard deviation over samples of each class probability, averaged over classes.
    Arguments as in :func:`scores`.
    """
    return _single("mean_std", x, input, layout, backend, check_finite, prob_tol)


def margin(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """Margin: the top-1 minus the top-2 class of ``pbar``. SMALL = uncertain.

    ``pbar_0`` for a single class. Arguments as in :func:`scores`.
    """
    return _single("margin", x, input, layout, backend, check_finite, prob_tol)


def least_confidence(
    x: Any, *, input: str = "logits", layout: str = "NTC", backend: str = "auto",
    check_finite: bool = True, prob_tol: float | None = None,
) -> Any:
    """Least confidence: ``1 - max_c pbar_c`` (large = uncertain).

    Arguments as in :func:`scores`.
    """
    return _single("least_confidence", x, input, layout, backend, check_finite, prob_tol)
