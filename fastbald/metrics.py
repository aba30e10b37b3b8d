"""The one table of fastbald's metrics and acquisition functions.

Every fact about a metric lives here: its name, its bit in the native op's ``metrics`` mask (which
is also its row in the op's [7, N] output), whether a *small* value means an uncertain item, how
the paper and the report name it, and the other spellings accepted for it. The op schema
(``csrc/ops.cpp``) and the kernels use the same bit order; ``tests/test_scores.py`` checks it.

*Acquisition functions* are a second, separate table: each one names the per-item metric it ranks
by (or ``None``) and the *rule* that turns scores into picked items. That way functions that are
not a per-item metric fit in the same table:

* ``"top_k"``: the ``k`` items with the most uncertain score of ``metric`` (BALD, Max Entropy, ...);
* ``"uniform"``: a uniform random draw, no scores (Random);
* other rules (e.g. a stochastic power-sampling of ``metric``'s scores, or a joint batch
  criterion with ``metric=None``) are added by giving a new rule name here and implementing it
  where acquisitions are executed (:func:`fastbald.acquire.acquire` and the loop's acquisition
  step); the loop, the command line and the report pick new rows up from this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ACQUISITIONS",
    "ACQUISITION_TABLE",
    "ALIASES",
    "ALL_METRICS_MASK",
    "DISPLAY_NAMES",
    "METRICS",
    "METRIC_TABLE",
    "N_METRICS",
    "Acquisition",
    "Metric",
    "acquisition",
    "canonical_acquisition",
    "metric",
    "metrics_mask",
    "parse_metrics",
]


@dataclass(frozen=True)
class Metric:
    """One per-item score computed by the fused op.

    Attributes:
        name: canonical name (a field of :class:`fastbald.PoolScores`).
        bit: bit in the op's ``metrics`` mask and row of the op's output.
        ascending: ``True`` when a *small* value means an uncertain (informative) item.
        display: the name the paper and the report use.
        definition: one-line definition (in nats).
        aliases: other accepted spellings (lower case, ``_`` for spaces and dashes).
    """

    name: str
    bit: int
    ascending: bool
    display: str
    definition: str
    aliases: tuple[str, ...] = ()


#: The metrics in bit order (= the op's output rows).
METRIC_TABLE: tuple[Metric, ...] = (
    Metric("entropy", 0, False, "Max Entropy",
           "entropy of the mean prediction, H[pbar]",
           ("max_entropy", "maxentropy", "predictive_entropy")),
    Metric("expected_entropy", 1, False, "Expected entropy",
           "mean entropy of the T sampled predictions, E_t H[p_t]"),
    Metric("bald", 2, False, "BALD",
           "mutual information between prediction and weights, (1/T) sum_t KL(p_t || pbar)"),
    Metric("variation_ratio", 3, False, "Var Ratios",
           "1 - (count of the modal sampled class) / T",
           ("var_ratios", "variation_ratios", "varratios")),
    Metric("mean_std", 4, False, "Mean STD",
           "mean over classes of the standard deviation over samples of p_tc",
           ("meanstd", "mean_stddev")),
    Metric("margin", 5, True, "Margin",
           "top-1 minus top-2 of pbar (small = uncertain)"),
    Metric("least_confidence", 6, False, "Least confidence",
           "1 - max_c pbar_c"),
)

#: Metric names in bit order.
METRICS: tuple[str, ...] = tuple(m.name for m in METRIC_TABLE)
#: Rows of the op's output.
N_METRICS: int = len(METRIC_TABLE)
#: The op's mask asking for every metric.
ALL_METRICS_MASK: int = (1 << N_METRICS) - 1

_BY_NAME: dict[str, Metric] = {m.name: m for m in METRIC_TABLE}
assert [m.bit for m in METRIC_TABLE] == list(range(N_METRICS)), "METRIC_TABLE must be in bit order"


def metric(name: str) -> Metric:
    """The :class:`Metric` called ``name`` (canonical name only); ValueError listing the valid ones."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; choose from {METRICS}") from None


def parse_metrics(
    metrics: str | Iterable[str] | None, *, default: Iterable[str] = METRICS
) -> tuple[str, ...]:
    """A metric list as canonical names in bit order, without repeats.

    ``None`` gives ``default``; ``"all"`` every metric; a single name or an iterable of names.
    Raises ValueError for an unknown name (listing the valid ones) or an empty list.
    """
    if metrics is None:
        metrics = default
    elif isinstance(metrics, str):
        metrics = METRICS if metrics == "all" else (metrics,)
    names = set()
    for m in metrics:
        names.add(metric(m).name)
    if not names:
        raise ValueError("metrics must name at least one metric")
    return tuple(m for m in METRICS if m in names)


def metrics_mask(metrics: str | Iterable[str] | None) -> int:
    """The op's ``metrics`` bit mask of a metric list (parsed by :func:`parse_metrics`)."""
    mask = 0
    for m in parse_metrics(metrics):
        mask |= 1 << _BY_NAME[m].bit
    return mask


@dataclass(frozen=True)
class Acquisition:
    """One acquisition function (what the loop, the command line and the report offer).

    Attributes:
        name: canonical name (also the stem of a run's files: ``<name>_seed<k>.csv``).
        display: the name the paper and the report use.
        metric: the per-item metric it scores the pool with, or ``None`` when it needs no
            per-item scores (``random``) or is not a function of them (a joint batch criterion).
        rule: how items are picked: ``"top_k"`` (most uncertain ``metric`` first),
            ``"uniform"`` (random draw); new rules are implemented where acquisitions run.
        aliases: other accepted spellings (lower case, ``_`` for spaces and dashes).
    """

    name: str
    display: str
    metric: str | None
    rule: str = "top_k"
    aliases: tuple[str, ...] = ()

    @property
    def ascending(self) -> bool:
        """Whether a small ``metric`` value means an uncertain item."""
        return self.metric is not None and _BY_NAME[self.metric].ascending


def _from_metric(name: str) -> Acquisition:
    m = _BY_NAME[name]
    return Acquisition(m.name, m.display, m.name, "top_k", m.aliases)


#: The acquisition functions, in the paper's order (then the extra metrics, then the baselines).
ACQUISITION_TABLE: tuple[Acquisition, ...] = (
    _from_metric("bald"),
    _from_metric("variation_ratio"),
    _from_metric("entropy"),
    _from_metric("mean_std"),
    _from_metric("margin"),
    _from_metric("least_confidence"),
    Acquisition("random", "Random", None, "uniform", ("uniform",)),
    # Stochastic batch acquisition (Kirsch et al., TMLR 2023; fastbald.stochastic): draw the batch
    # with p ~ BALD^beta, beta = 1, instead of its top-k.
    Acquisition("power_bald", "PowerBALD", "bald", "power", ("powerbald",)),
    # Greedy BatchBALD (Kirsch et al., NeurIPS 2019; fastbald.batchbald): a joint batch criterion
    # on the pool's MC log-probabilities, not a per-item score.
    Acquisition("batchbald", "BatchBALD", None, "batchbald", ("batch_bald",)),
)

#: Acquisition function names, in table order.
ACQUISITIONS: tuple[str, ...] = tuple(a.name for a in ACQUISITION_TABLE)
#: Other spellings of acquisition functions -> canonical name.
ALIASES: dict[str, str] = {al: a.name for a in ACQUISITION_TABLE for al in a.aliases}
#: Display name of every acquisition function and metric.
DISPLAY_NAMES: dict[str, str] = {
    **{m.name: m.display for m in METRIC_TABLE},
    **{a.name: a.display for a in ACQUISITION_TABLE},
}
_ACQ_BY_NAME: dict[str, Acquisition] = {a.name: a for a in ACQUISITION_TABLE}
assert len(_ACQ_BY_NAME) == len(ACQUISITION_TABLE), "duplicate acquisition name"
assert len(ALIASES) == sum(len(a.aliases) for a in ACQUISITION_TABLE), "duplicate alias"
assert all(a.metric is None or a.metric in _BY_NAME for a in ACQUISITION_TABLE)


def canonical_acquisition(name: str) -> str:
    """The canonical name of an acquisition function (``"Max Entropy"`` -> ``"entropy"``).

    Case, spaces and dashes are ignored. Raises ValueError for unknown names, listing the valid
    ones.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in _ACQ_BY_NAME:
        raise ValueError(
            f"unknown acquisition function {name!r}; choose from {', '.join(ACQUISITIONS)} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return key


def acquisition(name: str) -> Acquisition:
    """The :class:`Acquisition` of ``name`` (any accepted spelling)."""
    return _ACQ_BY_NAME[canonical_acquisition(name)]
