"""baal's heuristics, computed by fastbald: swap them in with one import.

.. code-block:: python

    # from baal.active.heuristics import BALD, Entropy, Variance, Margin, Certainty
    from fastbald.integrations.baal import BALD, Entropy, Variance, Margin, Certainty

Each class here subclasses baal's class of the same name (``isinstance(h, baal...BALD)`` holds),
keeps its constructor (``shuffle_prop``, ``reduction``), its ``reverse`` direction, ``get_ranks``,
``__call__`` and generator support, and returns the same scores as baal on the same input, up to
float32 rounding, hence the same ranking. What changes is how the scores are computed:

* ``BALD`` runs fastbald's fused kernel straight on baal's ``[N, C, T]`` array (read through its
  strides, no copy, no ``N x C x T`` temporaries), in the mean-KL form (no cancellation, never
  negative: baal's ``H[pbar] - E_t H[p_t]`` in float32 loses about 1e-6 and can go below 0).
* ``Entropy`` and ``Margin`` (baal averages the T samples first) take one mean over T, then score
  the mean prediction with the kernel; ``Certainty`` and ``Variance`` are a single torch reduction.
* Inputs can be numpy arrays or torch tensors, on the CPU or (with fastbald's CUDA kernels) a GPU;
  baal itself converts tensors with ``.numpy()``, so it takes CPU tensors only.

Like baal, the heuristics accept probabilities or logits: an input that does not look like
probabilities (baal's ``to_prob`` test: values in [0, 1] that sum to 1 over classes within
``np.allclose``'s tolerance, over the whole array) is soft-maxed over classes. fastbald folds that
test into the kernel's own input check, so it costs no extra pass. Pass ``input="probs"`` or
``input="logits"`` to the constructor to skip the test. Extra axes (``[N, C, ..., T]``, e.g.
segmentation) are supported as in baal: the score has shape ``[N, ...]`` and the heuristic's
``reduction`` turns it into ``[N]``.

Also: ``EPIG`` (by :func:`fastbald.epig`, chunked, flat memory) and baal's stochastic heuristics
``PowerSampling``, ``GibbsSampling``, ``RankBasedSampling`` and the aliases ``PowerBALD`` /
``PowerEntropy`` (drawn by :func:`fastbald.stochastic_acquire`: same distribution, seedable; see
``_FastbaldStochastic`` for where they differ from baal).

Differences from baal: NaN or +inf in the predictions raise fastbald's ``ValueError`` (naming the
pool item) where baal warns and scores the item 0 or 10000. Single-output predictions (C = 1,
baal's sigmoid case) are handed to baal's own code. Extras not in baal: ``MeanSTD`` (the Mean STD
of Gal et al. 2017: mean over classes of the standard deviation, where baal's ``Variance`` averages
variances) and ``VariationRatio``.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any

import numpy as np
import torch

try:
    from baal.active.heuristics import heuristics as _bh
    from baal.active.heuristics import stochastics as _bs
except ImportError as e:  # pragma: no cover - exercised only without baal
    raise ImportError(
        "fastbald.integrations.baal mirrors baal's heuristics and needs baal installed "
        "(pip install --no-deps baal==2.1.0 plus scipy, scikit-learn, structlog<23, torchmetrics; "
        "see the README section 'Use fastbald from baal / batchbald_redux')"
    ) from e

from ..epig import epig as _fb_epig
from ..scores import scores as _fb_scores
from ..stochastic import sampling_probabilities as _fb_probs
from ..stochastic import stochastic_acquire as _fb_stochastic

__all__ = [
    "BALD",
    "BatchBALD",
    "Certainty",
    "EPIG",
    "Entropy",
    "GibbsSampling",
    "Margin",
    "MeanSTD",
    "PowerBALD",
    "PowerEntropy",
    "PowerSampling",
    "RankBasedSampling",
    "Variance",
    "VariationRatio",
]

# baal's to_prob test is np.allclose(p.sum(1), 1): |s - 1| <= atol + rtol * 1.
_ALLCLOSE_TOL = 1e-8 + 1e-5
_INPUTS = ("auto", "probs", "logits", "log_probs")


def _single(predictions: Any) -> Any:
    """baal's ``require_single_item``: a list/tuple of one array is that array."""
    if isinstance(predictions, (list, tuple)):
        if len(predictions) == 1:
            return predictions[0]
        raise ValueError(
            "This heuristic accepts a single array with shape [n_sample, n_classes, ..., "
            "n_iterations]. For multi-output models use baal.active.heuristics.CombineHeuristics."
        )
    return predictions


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.asarray(x))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _check_input(input: str) -> str:
    if input not in _INPUTS:
        raise ValueError(f"input must be one of {_INPUTS}, got {input!r}")
    return input


def _kernel(x_N_T_C: torch.Tensor, metric: str, input: str) -> torch.Tensor:
    """One metric of [N, T, C] (any strides) via fastbald, input 'probs', 'logits' or 'log_probs'."""
    tol = _ALLCLOSE_TOL if input == "probs" else None
    out = _fb_scores(x_N_T_C, input=input, layout="NTC", metrics=[metric], prob_tol=tol)
    return getattr(out, metric)


def _with_baal_to_prob(score_all, input: str) -> torch.Tensor:
    """Run ``score_all(kind)`` with baal's probabilities-or-logits decision.

    ``input="auto"``: try the input as probabilities; fastbald's kernel rejects the whole call as
    soon as it meets a negative value or a row whose sum is off by more than np.allclose's
    tolerance (for logits that is the first item: the failed try costs next to nothing), and then
    the input is scored as logits, which is what baal's ``to_prob`` does (softmax over classes).
    """
    if input != "auto":
        return score_all(input)
    try:
        return score_all("probs")
    except ValueError:
        return score_all("logits")


def _score_N_C_E_T(x: torch.Tensor, metric: str, input: str) -> torch.Tensor:
    """A per-item metric of baal's predictions [N, C, *E, T] -> [N, *E], without copying x."""
    N, C, T = x.shape[0], x.shape[1], x.shape[-1]
    extra = tuple(x.shape[2:-1])
    if not extra:
        return _with_baal_to_prob(lambda k: _kernel(x.permute(0, 2, 1), metric, k), input)
    D = math.prod(extra)
    x4 = x.reshape(N, C, D, T)  # a view for contiguous x

    def score_all(kind: str) -> torch.Tensor:
        # Items are (n, d) pairs, which no single stride spans: loop over the shorter axis, each
        # call a strided [items, T, C] view of x.
        if N <= D:
            return torch.stack([_kernel(x4[n].permute(1, 2, 0), metric, kind) for n in range(N)])
        return torch.stack([_kernel(x4[:, :, d].permute(0, 2, 1), metric, kind) for d in range(D)], 1)

    return _with_baal_to_prob(score_all, input).reshape(N, *extra)


def _score_mean_N_C_E(m: torch.Tensor, metric: str, input: str) -> torch.Tensor:
    """A metric of the mean prediction m [N, C, *E] (scored as T = 1) -> [N, *E]."""
    N, C = m.shape[0], m.shape[1]
    extra = tuple(m.shape[2:])
    items = m.movedim(1, -1).reshape(-1, 1, C)
    return _with_baal_to_prob(lambda k: _kernel(items, metric, k), input).reshape(N, *extra)


def _mean_over_T(x: torch.Tensor) -> torch.Tensor:
    """baal's ``singlepass``: average the MC samples (last axis) when there is one."""
    return x.mean(-1) if x.dim() >= 3 else x


class _FastbaldHeuristic:
    """Mixin: baal's ``get_uncertainties`` without its ``tensor.numpy()`` conversion (so CUDA and
    requires-grad tensors work), with baal's reduction and non-finite handling."""

    def get_uncertainties(self, predictions, target_predictions=None):
        scores = self.compute_score(predictions, target_predictions=target_predictions)
        scores = self.reduction(scores)
        if not np.all(np.isfinite(scores)):
            # Same as baal (the kernel itself raises on NaN/inf inputs before this is reached).
            fixed = 0.0 if self.reversed else 10000
            warnings.warn(f"Invalid value in the score, will be put to {fixed}", UserWarning, stacklevel=2)
            scores[~np.isfinite(scores)] = fixed
        return scores


class BALD(_FastbaldHeuristic, _bh.BALD):
    """BALD (mutual information), highest first: baal's ``BALD`` computed by fastbald's kernel.

    Args:
        shuffle_prop: deprecated in baal; kept for its signature.
        reduction: how scores with extra axes [N, ...] become [N] (baal's, default ``"none"``).
        input: ``"auto"`` (baal's test: probabilities if they look like them, else logits),
            ``"probs"``, ``"logits"`` or ``"log_probs"``.
    """

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        if x.dim() < 3:
            raise ValueError(f"BALD needs predictions [N, C, ..., T], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:  # baal's single-output (sigmoid) case: baal's own code
            return _bh.BALD.compute_score(self, _to_numpy(x))
        return _to_numpy(_score_N_C_E_T(x, "bald", self.input))


class Entropy(_FastbaldHeuristic, _bh.Entropy):
    """Entropy of the mean prediction (Max Entropy), highest first: baal's ``Entropy``.

    As in baal, the T samples are averaged first and the mean is then taken as probabilities or
    (if it does not look like probabilities) as logits to soft-max.
    """

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        m = _mean_over_T(x)
        if m.dim() < 2 or m.shape[1] == 1:
            return _bh.Entropy.compute_score(self, _to_numpy(x))
        return _to_numpy(_score_mean_N_C_E(m, "entropy", self.input))


class Margin(_FastbaldHeuristic, _bh.Margin):
    """Top-1 minus top-2 of the mean prediction, lowest first: baal's ``Margin``."""

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        m = _mean_over_T(x)
        if m.dim() < 2 or m.shape[1] == 1:
            return _bh.Margin.compute_score(self, _to_numpy(x))
        # The kernel normalises probabilities; baal does not. Both agree within np.allclose's
        # tolerance, which the 'probs' decision already requires.
        return _to_numpy(_score_mean_N_C_E(m, "margin", self.input))


class Certainty(_FastbaldHeuristic, _bh.Certainty):
    """Largest mean class score, lowest first: baal's ``Certainty``.

    Like baal, no soft-max: the maximum over classes of the mean over samples of the raw input
    (probabilities, or logits as they are). One torch reduction, no kernel needed.
    """

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        return _to_numpy(_mean_over_T(x).amax(1))


class Variance(_FastbaldHeuristic, _bh.Variance):
    """Variance over the T samples of each class score, reduced over classes (baal's default
    ``reduction="mean"``), highest first: baal's ``Variance``.

    Like baal, on the raw input (no soft-max) and per class; the ``reduction`` averages the
    variances. This is not the paper's Mean STD (an average of standard deviations, of
    probabilities): for that use :class:`MeanSTD`.
    """

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        if x.dim() < 3:
            raise ValueError(f"Variance needs predictions [N, C, ..., T], got shape {tuple(x.shape)}")
        return _to_numpy(torch.var(x, dim=-1, correction=0))


class MeanSTD(_FastbaldHeuristic, _bh.AbstractHeuristic):
    """Mean STD of Gal, Islam & Ghahramani (2017), highest first (not in baal):
    ``(1/C) sum_c sqrt(E_t p_tc^2 - pbar_c^2)`` of the probabilities, by fastbald's kernel.

    Same arguments as :class:`BALD`; inputs that do not look like probabilities are soft-maxed.
    """

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reverse=True, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        if x.dim() < 3:
            raise ValueError(f"MeanSTD needs predictions [N, C, ..., T], got shape {tuple(x.shape)}")
        return _to_numpy(_score_N_C_E_T(x, "mean_std", self.input))


class VariationRatio(_FastbaldHeuristic, _bh.AbstractHeuristic):
    """Variation ratio of Gal et al. (2017), highest first (not in baal): one minus the share of
    the T samples that predict the modal class. Same arguments as :class:`BALD`."""

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reverse=True, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        x = _as_tensor(_single(predictions))
        if x.dim() < 3:
            raise ValueError(
                f"VariationRatio needs predictions [N, C, ..., T], got shape {tuple(x.shape)}"
            )
        return _to_numpy(_score_N_C_E_T(x, "variation_ratio", self.input))


# ------------------------------------------------------------------------------------------------
# EPIG (baal.active.heuristics.EPIG)
# ------------------------------------------------------------------------------------------------
def _looks_like_probs(x: torch.Tensor) -> bool:
    """baal's ``to_prob`` test over the whole array: values in [0, 1] summing to 1 over axis 1."""
    if x.numel() == 0:
        return True
    if float(x.min()) < 0 or float(x.max()) > 1:
        return False
    return x.shape[1] == 1 or bool(torch.allclose(x.sum(1).double(), torch.ones((), dtype=torch.float64)))


class EPIG(_FastbaldHeuristic, _bh.EPIG):
    """Expected predictive information gain, highest first: baal's ``EPIG`` computed by
    :func:`fastbald.epig` (chunked: never the ``[N_p, C, N_t * C]`` joint baal materialises; no
    cancellation between entropies; clamped to ``[0, log C]``).

    ``get_uncertainties(predictions, target_predictions)`` with baal's ``[N_p, C, K]`` and
    ``[N_t, C, K]`` arrays (probabilities, or logits that are soft-maxed over classes, decided as
    baal's ``to_prob`` does), numpy or torch. Scores are float32, as baal's.
    """

    def __init__(self, shuffle_prop=_bh.DEPRECATED, reverse=False, reduction="none", *, input: str = "auto"):
        super().__init__(shuffle_prop=shuffle_prop, reverse=reverse, reduction=reduction)
        self.input = _check_input(input)

    def compute_score(self, predictions, target_predictions=None):
        if target_predictions is None:
            raise ValueError("EPIG needs target_predictions [N_t, C, K] (predictions on target inputs)")
        x = _as_tensor(_single(predictions))
        t = _as_tensor(_single(target_predictions))
        if x.dim() != 3 or t.dim() != 3:
            raise ValueError(
                f"EPIG only supports classification: predictions [N_p, C, K] and target_predictions "
                f"[N_t, C, K], got shapes {tuple(x.shape)} and {tuple(t.shape)}"
            )
        kinds = []
        for a in (x, t):
            kind = self.input
            if kind == "auto":
                kind = "probs" if _looks_like_probs(a) else "logits"
            kinds.append(kind)
        # fastbald.epig takes one input kind: bring probabilities to log space when they differ.
        if kinds[0] != kinds[1]:
            x, t = (a.clamp_min(0).log() if k == "probs" else a for a, k in zip((x, t), kinds, strict=True))
            kinds = ["logits", "logits"]
        out = _fb_epig(x.permute(0, 2, 1), t.permute(0, 2, 1), input=kinds[0])
        return _to_numpy(out.float())


# ------------------------------------------------------------------------------------------------
# Stochastic batch acquisition (baal.active.heuristics.stochastics)
# ------------------------------------------------------------------------------------------------
class _FastbaldStochastic:
    """Mixin: baal's stochastic heuristics drawn by :func:`fastbald.stochastic_acquire`.

    Same constructor (``base_heuristic``, ``query_size``, ``temperature``: beta = 1/temperature) and
    the same ``get_ranks(predictions) -> (indices, distribution)``, with:

    * the draw seeded: ``seed=`` (keyword), else one number drawn from numpy's global generator,
      so ``np.random.seed`` makes it reproducible as it does baal's ``np.random.choice``;
    * the direction of the base heuristic respected (baal ignores it, "TODO handle reverse"):
      for a heuristic that ranks ascending (``Margin``, ``Certainty``) softmax and rank sampling
      use the negated score, and power sampling, which needs large = informative, raises;
    * power weights ``max(s, 0)^beta`` (baal: ``s^beta``, NaN for a negative BALD);
    * fewer items of positive weight than ``query_size``: those first, then the rest uniformly
      (baal: the whole query uniformly).
    """

    _mode = ""

    def __init__(self, base_heuristic, query_size, temperature=1.0, *, seed: int | None = None):
        super().__init__(base_heuristic=base_heuristic, query_size=query_size, temperature=temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (beta = 1 / temperature), got {temperature}")
        self.seed = seed

    def _oriented(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores)
        if scores.ndim != 1:
            raise ValueError(f"scores must be [N] (set the base heuristic's reduction), got {scores.shape}")
        if getattr(self._bh, "reversed", True):
            return scores
        if self._mode == "power":
            raise ValueError(
                f"power sampling needs a score where large = informative; {type(self._bh).__name__} "
                "ranks ascending (small = informative): use GibbsSampling or RankBasedSampling"
            )
        return -scores

    def _make_distribution(self, scores: np.ndarray) -> np.ndarray:
        s = torch.from_numpy(np.ascontiguousarray(self._oriented(scores)))
        return _fb_probs(s, self._mode, 1.0 / self.temperature).numpy()

    def get_ranks(self, predictions, target_predictions=None):
        scores = self.get_scores(predictions)
        s = torch.from_numpy(np.ascontiguousarray(self._oriented(scores)))
        seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**62, dtype=np.int64))
        beta = 1.0 / self.temperature
        idx = _fb_stochastic(s, int(self.query_size), self._mode, beta, seed=seed)
        return idx.numpy(), _fb_probs(s, self._mode, beta).numpy()


class PowerSampling(_FastbaldStochastic, _bs.PowerSampling):
    """baal's ``PowerSampling``: p ~ score^(1/temperature) (PowerBALD with a BALD base)."""

    _mode = "power"


class GibbsSampling(_FastbaldStochastic, _bs.GibbsSampling):
    """baal's ``GibbsSampling``: p ~ exp(score / temperature) (softmax sampling)."""

    _mode = "softmax"


class RankBasedSampling(_FastbaldStochastic, _bs.RankBasedSampling):
    """baal's ``RankBasedSampling``: p ~ rank^(-1/temperature), rank 1 = most informative
    (average ranks for ties, as baal's ``rankdata``)."""

    _mode = "softrank"


def PowerBALD(query_size: int, temperature: float = 1.0, reduction="none", *, seed: int | None = None):
    """baal's ``PowerBALD``: :class:`PowerSampling` over fastbald's :class:`BALD`."""
    return PowerSampling(BALD(reduction=reduction), query_size=query_size, temperature=temperature, seed=seed)


def PowerEntropy(query_size: int, temperature: float = 1.0, reduction="none", *, seed: int | None = None):
    """baal's ``PowerEntropy``: :class:`PowerSampling` over fastbald's :class:`Entropy`."""
    return PowerSampling(Entropy(reduction=reduction), query_size=query_size, temperature=temperature, seed=seed)


# ------------------------------------------------------------------------------------------------
# BatchBALD (baal.active.heuristics.BatchBALD)
# ------------------------------------------------------------------------------------------------
class BatchBALD(_FastbaldHeuristic, _bh.BatchBALD):
    """baal's ``BatchBALD`` computed by :func:`fastbald.batchbald_batch` (native greedy BatchBALD:
    exact joint entropy while ``C**n <= num_draw``, ``num_draw`` sampled configurations beyond,
    never re-sampled; no ``N x num_draw x C`` float64 temporary).

    Same constructor (``num_samples``: the batch size, ``num_draw``: Monte-Carlo configurations,
    raised to K if smaller) and ``get_ranks(predictions)`` on baal's ``[N, C, K]`` (probabilities,
    or logits to soft-max). Differences: exactly ``num_samples`` items are chosen (baal picks its
    BALD argmax and then ``num_samples`` more), ``get_ranks`` lists them in the order chosen, then
    the rest of the pool by BALD; ``compute_score`` gives each chosen item its gain in joint mutual
    information (0 elsewhere); ``seed=`` (keyword) makes the sampled regime reproducible.
    """

    def __init__(self, num_samples, num_draw=500, shuffle_prop=_bh.DEPRECATED, reduction="none", *,
                 input: str = "auto", seed: int = 0):
        super().__init__(num_samples, num_draw=num_draw, shuffle_prop=shuffle_prop, reduction=reduction)
        self.input = _check_input(input)
        self.seed = int(seed)
        self._order: np.ndarray | None = None

    def _log_probs_N_K_C(self, predictions) -> torch.Tensor:
        x = _as_tensor(_single(predictions))
        if x.dim() != 3:
            raise ValueError(
                "BatchBALD only works on classification: predictions [N, C, K], got shape "
                f"{tuple(x.shape)}"
            )
        kind = self.input
        if kind == "auto":
            kind = "probs" if _looks_like_probs(x) else "logits"
        x = x.permute(0, 2, 1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if kind == "probs":
            return x.clamp_min(0).log()
        return torch.log_softmax(x, -1)

    def compute_score(self, predictions, target_predictions=None):
        from ..batchbald import batchbald_batch

        lp = self._log_probs_N_K_C(predictions).cpu()
        N, K = lp.shape[0], lp.shape[1]
        b = min(int(self.num_samples), N)
        out = np.zeros(N, dtype=np.float64)
        if b == 0:
            self._order = np.zeros(0, dtype=np.int64)
            return out
        r = batchbald_batch(lp.contiguous(), b, num_samples=max(int(self.num_draw), K), seed=self.seed,
                            dtype=torch.float64 if lp.dtype == torch.float64 else torch.float32)
        idx = r.indices.numpy()
        gains = np.diff(np.concatenate([[0.0], r.scores.numpy()]))
        out[idx] = np.maximum(gains, np.finfo(np.float64).tiny)  # chosen items rank above the rest
        self._order = idx
        return out

    def get_ranks(self, predictions, target_predictions=None):
        if isinstance(predictions, types.GeneratorType):
            raise ValueError("BatchBALD doesn't support generators.")
        scores = self.get_uncertainties(predictions)
        order = self._order if self._order is not None else np.zeros(0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(scores.shape[0]), order)
        bald = BALD(input=self.input).get_uncertainties(predictions)[rest]
        rest = rest[np.argsort(-bald, kind="stable")]
        return np.concatenate([order, rest]).astype(np.int64), scores
