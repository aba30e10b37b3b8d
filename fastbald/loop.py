"""The active-learning loop of Gal, Islam & Ghahramani (2017), resumable and deterministic.

One *round* ``r`` of :class:`ActiveLearningLoop`:

1. ``r > 0``: score the remaining pool with the model of round ``r - 1`` (MC dropout through
   :func:`fastbald.score_pool`, or one deterministic pass for a deterministic model; the whole
   pool, or a random ``pool_subset`` of it as in the authors' code) and move the ``per_round``
   best items to the labelled set (``random``: a uniform draw, nothing is scored);
2. re-initialise the model and train it from scratch on the labelled set (Adam, batch 128,
   ``epochs`` epochs, L2 weight decay ``2 c / N_train`` on the dense layer, see
   :func:`fastbald.models.paper_weight_decay`);
3. evaluate it on the test set (dropout off) and on the held-out validation set.

Round 0 trains on the initial labelled set (nothing acquired). After ``rounds`` rounds,
``rounds * per_round`` images have been acquired.

Every random draw is seeded from ``(seed, round, purpose)`` alone, so a round's result does not
depend on what ran before it in the process. After every round the state (protocol, labelled
indices in acquisition order, per-round metrics) is committed atomically by :class:`RunStore`:
the last model's weights first (only while the next round needs them to score the pool), then
``state.json`` (temporary file + ``os.replace``), which is the commit point, then the per-round
CSV. A run killed at any moment and restarted with
the same protocol resumes at the first uncommitted round and produces exactly what an
uninterrupted run would have (same labelled indices, same test errors; timings differ).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import DirectoryLock, DirectoryLockedError, atomic_torch_save, atomic_write_bytes
from .mc import mix_seed
from .metrics import ACQUISITIONS, ALIASES, DISPLAY_NAMES, acquisition, canonical_acquisition
from .models import BayesianCNN, paper_weight_decay

__all__ = [
    "ACQUISITIONS",
    "ALIASES",
    "CSV_COLUMNS",
    "DISPLAY_NAMES",
    "ActiveLearningLoop",
    "LabelledPool",
    "LoopProtocol",
    "RoundRecord",
    "RunStore",
    "StateLockedError",
    "StateMismatchError",
    "canonical_acquisition",
    "read_csv",
    "train_from_scratch",
]

#: Columns of the per-round CSV.
CSV_COLUMNS: tuple[str, ...] = (
    "round",
    "labelled",
    "acquired",
    "test_error",
    "train_seconds",
    "score_seconds",
)

STATE_VERSION = 1
_STATE_JSON = "state.json"

# Purposes of the per-round seeds (mixed with the protocol seed and the round number).
_SEED_SPLIT, _SEED_TRAIN, _SEED_SCORE, _SEED_SUBSET, _SEED_RANDOM, _SEED_TEST = range(6)
_SEED_STOCHASTIC = 6  # the draw of a stochastic acquisition (power_bald)


#: Raised when another process runs on the same state directory (see :meth:`RunStore.lock`).
StateLockedError = DirectoryLockedError


class StateMismatchError(RuntimeError):
    """A state directory holds a run with a different protocol or different data."""


class PoolData(TypingProtocol):
    """What the loop needs from a dataset (e.g. :class:`fastbald.data.MNISTData`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


# ------------------------------------------------------------------------------------------------
# Protocol and records
# ------------------------------------------------------------------------------------------------
#: Minimum of each integer field of :class:`LoopProtocol` but ``seed``, ``pool_subset`` and
#: ``test_subset`` (the command line's bounds too).
PROTOCOL_INT_MIN: dict[str, int] = {
    "initial": 1,
    "validation": 0,
    "per_round": 1,
    "rounds": 0,
    "epochs": 1,
    "batch_size": 1,
    "T": 1,
    "score_block_size": 1,
}
#: Values of :attr:`LoopProtocol.weight_decay_scope`.
WEIGHT_DECAY_SCOPES: tuple[str, ...] = ("paper", "dense")


@dataclass(frozen=True)
class LoopProtocol:
    """Everything that fixes a run's result (the defaults are the paper's MNIST protocol).

    Attributes:
        acquisition: one of :data:`ACQUISITIONS` (aliases are normalised).
        seed: base seed; every random draw of round ``r`` is seeded from ``(seed, r, purpose)``.
        initial: size of the initial labelled set (20).
        balanced_initial: draw the initial set class-balanced (2 per class for 20 and MNIST).
        validation: held-out validation images (100): never trained on or acquired; their
            error is recorded in the state only.
        per_round: images acquired per round (10).
        rounds: acquisition rounds (100): ``rounds * per_round`` images acquired in the end.
        epochs: training epochs per round, from scratch (50).
        batch_size: training batch size (128).
        lr: Adam learning rate (1e-3, Keras' default as in the authors' code).
        weight_decay_c: ``c`` of the authors' ``l2(c / N_train)`` (3.5); the PyTorch
            coefficient is :func:`fastbald.models.paper_weight_decay` ``(N_train, c)``.
        weight_decay_scope: ``"paper"`` (the 128-unit dense layer's weight only) or ``"dense"``.
        T: MC-dropout samples per pool item (100, as in the authors' code).
        pool_subset: score only this many random pool items per round (the authors' code used
            2000); ``None`` scores the whole remaining pool.
        deterministic_model: acquire with one deterministic (dropout-off) pass instead of MC
            dropout (the paper's Bayesian-vs-deterministic comparison).
        score_block_size: items per MC-dropout compute block (part of the scores' seed key).
        test_subset: evaluate on this many test images only (a fixed random subset, the same
            for every seed; for quick demos); ``None`` uses the whole test set.
        train_bf16: train under bfloat16 autocast (forward and backward matmuls and
            convolutions in bf16, weights, optimiser and loss in float32): 1.4-1.8x less CPU time
            per training on CPUs with AVX512-BF16/AMX; mean paired test-error differences to
            float32 training within 0.4 points from 20 to 1,020 labels over 6 repeats
            (``benchmarks/mnist_init.py --variants torch bf16``). Off by default: the paper
            trained in float32.
        equal_batches: split each epoch into ``ceil(n / batch_size)`` minibatches of equal size
            (within one image) instead of full minibatches of ``batch_size`` and the remainder.
            The paper's Keras training (the default, off) ends every epoch on the remainder: at
            130 labelled images half of all Adam steps follow 2 images, and the committed
            active runs' 130-image sets test at 38-44% error instead of 20-27% with two
            minibatches of 65 (``benchmarks/minibatch_study.py``, 4 training seeds each).
    """

    acquisition: str = "bald"
    seed: int = 0
    initial: int = 20
    balanced_initial: bool = True
    validation: int = 100
    per_round: int = 10
    rounds: int = 100
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay_c: float = 3.5
    weight_decay_scope: str = "paper"
    T: int = 100
    pool_subset: int | None = None
    deterministic_model: bool = False
    score_block_size: int = 256
    test_subset: int | None = None
    train_bf16: bool = False
    equal_batches: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "acquisition", canonical_acquisition(self.acquisition))
        for name, lo in PROTOCOL_INT_MIN.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.pool_subset is not None and (
            isinstance(self.pool_subset, bool)
            or not isinstance(self.pool_subset, int)
            or self.pool_subset < self.per_round
        ):
            raise ValueError(
                f"pool_subset must be None or an integer >= per_round ({self.per_round}), "
                f"got {self.pool_subset!r}"
            )
        if self.test_subset is not None and (
            isinstance(self.test_subset, bool)
            or not isinstance(self.test_subset, int)
            or self.test_subset < 1
        ):
            raise ValueError(f"test_subset must be None or an integer >= 1, got {self.test_subset!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not (self.weight_decay_c >= 0 and math.isfinite(self.weight_decay_c)):
            raise ValueError(f"weight_decay_c must be >= 0, got {self.weight_decay_c!r}")
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise ValueError(
                f"weight_decay_scope must be 'paper' or 'dense', got {self.weight_decay_scope!r}"
            )

    @property
    def name(self) -> str:
        """``<acquisition>_seed<seed>``: the stem of the run's CSV and state directory."""
        return f"{self.acquisition}_seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopProtocol:
        """Inverse of :meth:`to_dict` (unknown keys raise)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown protocol fields: {sorted(unknown)}")
        return cls(**d)

    def differences(self, other: LoopProtocol, *, ignore: Iterable[str] = ("rounds",)) -> list[str]:
        """``"field: mine != other"`` for every differing field except ``ignore``."""
        skip = set(ignore)
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in skip and a[k] != b[k]]


@dataclass
class RoundRecord:
    """The outcome of one round.

    Attributes:
        round: round number (0 = the initial labelled set).
        labelled: labelled images the model was trained on.
        acquired: images acquired so far (``labelled - initial``).
        test_error: error rate on the test set, in [0, 1] (dropout off).
        val_error: error rate on the held-out validation set (None when it is empty).
        train_loss: mean training loss of the last epoch.
        train_seconds: wall time of training (from scratch).
        score_seconds: wall time of scoring the pool and choosing this round's acquisitions.
        eval_seconds: wall time of the test and validation evaluation.
        new_indices: training-set indices acquired this round, best first.
        pool_size: pool items left to choose from (before this round's acquisition).
        scored: pool items scored this round (0 for round 0 and for ``random``).
    """

    round: int
    labelled: int
    acquired: int
    test_error: float
    val_error: float | None
    train_loss: float
    train_seconds: float
    score_seconds: float
    eval_seconds: float
    new_indices: list[int] = field(default_factory=list)
    pool_size: int = 0
    scored: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def csv_row(self) -> list[str]:
        """The row of the per-round CSV (:data:`CSV_COLUMNS`)."""
        return [
            str(self.round),
            str(self.labelled),
            str(self.acquired),
            f"{self.test_error:.6f}",
            f"{self.train_seconds:.3f}",
            f"{self.score_seconds:.3f}",
        ]


# ------------------------------------------------------------------------------------------------
# The per-round CSV
# ------------------------------------------------------------------------------------------------
def write_csv(path: str | os.PathLike[str], records: Sequence[RoundRecord]) -> None:
    """Write the per-round CSV (:data:`CSV_COLUMNS`) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in records:
        w.writerow(r.csv_row())
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def read_csv(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a per-round CSV into ``{column: array}`` (ints for round/labelled/acquired).

    Raises ValueError naming the file when a required column is missing or a value is bad.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing CSV column(s) {missing}; expected {CSV_COLUMNS}")
        rows = list(reader)
    out: dict[str, np.ndarray] = {}
    try:
        for c in CSV_COLUMNS:
            kind = int if c in ("round", "labelled", "acquired") else float
            out[c] = np.array([kind(r[c]) for r in rows], dtype=np.int64 if kind is int else float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad value in column {c!r}: {e}") from e
    return out


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def data_fingerprint(data: PoolData) -> dict[str, Any]:
    """Shapes and a sha256 of the labels and of a slice of the images: enough to refuse resuming
    a run on different data."""
    h = hashlib.sha256()
    for t in (data.y_train, data.y_test):
        h.update(t.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    for t in (data.x_train, data.x_test):
        sl = t[: min(256, t.shape[0])].detach().cpu().to(torch.float32).contiguous()
        h.update(sl.numpy().tobytes())
    return {
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "image_shape": [int(s) for s in data.x_train.shape[1:]],
        "sha256": h.hexdigest(),
    }


def split_initial(
    y: torch.Tensor, protocol: LoopProtocol, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(initial, validation)`` training-set indices for ``protocol`` (seeded by its seed).

    The validation images are a uniform draw; the initial set is drawn from the rest, with
    ``initial // num_classes`` per class (the remainder to randomly chosen classes) when
    ``balanced_initial``, else uniformly.
    """
    n = int(y.shape[0])
    need = protocol.initial + protocol.validation + protocol.per_round * protocol.rounds
    if need > n:
        raise ValueError(
            f"the training set has {n} images, fewer than initial + validation + "
            f"rounds x per_round = {need}"
        )
    g = _generator(protocol.seed, _SEED_SPLIT)
    perm = torch.randperm(n, generator=g)
    val = perm[: protocol.validation]
    rest = perm[protocol.validation :]
    if not protocol.balanced_initial:
        return rest[: protocol.initial].clone(), val.clone()
    y_rest = y.cpu()[rest]
    counts = torch.bincount(y_rest, minlength=num_classes)
    per, extra = divmod(protocol.initial, num_classes)
    quota = torch.full((num_classes,), per, dtype=torch.int64)
    quota[torch.randperm(num_classes, generator=g)[:extra]] += 1
    short = [c for c in range(num_classes) if int(counts[c]) < int(quota[c])]
    if short:
        raise ValueError(
            f"cannot draw a balanced initial set of {protocol.initial}: class(es) {short} have "
            "too few training images (use balanced_initial=False)"
        )
    chosen: list[torch.Tensor] = []
    for c in range(num_classes):
        idx = rest[y_rest == c]  # in the order of the random permutation
        chosen.append(idx[: int(quota[c])])
    initial = torch.cat(chosen)
    # Interleave randomly so that the labelled order carries no class structure.
    initial = initial[torch.randperm(initial.numel(), generator=g)]
    return initial, val.clone()


def _error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    if x.shape[0] == 0:
        return float("nan")
    was = model.training
    model.eval()
    wrong = 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            pred = model(x[s : s + batch]).argmax(1)
            wrong += int((pred != y[s : s + batch]).sum())
    model.train(was)
    return wrong / x.shape[0]


RoundCallback = Callable[["ActiveLearningLoop", RoundRecord], None]
ModelFactory = Callable[[LoopProtocol, int], nn.Module]


def default_model_factory(protocol: LoopProtocol, num_classes: int) -> nn.Module:
    """The paper's Bayesian CNN (deterministic at acquisition if the protocol says so)."""
    return BayesianCNN(num_classes, deterministic=protocol.deterministic_model)


@contextlib.contextmanager
def _deterministic_algorithms(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside (if ``on``), restored after."""
    if not on:
        yield
        return
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _train_autocast(protocol: LoopProtocol, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass when ``protocol.train_bf16``, else a no-op."""
    if not protocol.train_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def epoch_batches(n: int, batch_size: int, equal: bool = False) -> list[int]:
    """Minibatch boundaries of one epoch over ``n`` images: full minibatches of ``batch_size``
    and the remainder last, or (``equal``) ``ceil(n / batch_size)`` minibatches whose sizes
    differ by at most one."""
    if n <= 0:
        return [0]
    if not equal:
        return [*range(0, n, batch_size), n]
    k = -(-n // batch_size)
    return [(i * n) // k for i in range(k + 1)]


def train_from_scratch(
    model_factory: ModelFactory,
    protocol: LoopProtocol,
    num_classes: int,
    x: torch.Tensor,
    y: torch.Tensor,
    round_: int,
) -> tuple[nn.Module, float]:
    """A new model trained on ``(x, y)`` as round ``round_`` of ``protocol`` prescribes.

    Seeds torch's global RNG from ``(seed, round_)`` right before building the model (its
    initialisation and the training dropout) and draws the minibatch order from its own
    generator, so the result depends only on the arguments (on one machine, software and number
    of threads). Adam (``protocol.lr``), ``protocol.epochs`` epochs of shuffled minibatches of
    ``protocol.batch_size`` (or of equal size, ``protocol.equal_batches``; see
    :func:`epoch_batches`), L2 weight decay :func:`fastbald.models.paper_weight_decay`
    ``(len(x), c)`` (on the dense layer for models with ``param_groups``); the forward pass under
    bf16 autocast when ``protocol.train_bf16`` (the loss in float32).

    Returns:
        ``(model in eval mode, on x's device; mean training loss of the last epoch)``. Raises
        FloatingPointError when that loss is not finite.
    """
    p = protocol
    torch.manual_seed(mix_seed(p.seed, round_, _SEED_TRAIN))  # init and training dropout
    model = model_factory(p, num_classes).to(x.device)
    n = int(x.shape[0])
    wd = paper_weight_decay(n, p.weight_decay_c) if p.weight_decay_c > 0 else 0.0
    groups = getattr(model, "param_groups", None)
    params: Any = (
        groups(wd, scope=p.weight_decay_scope)
        if callable(groups)
        else [{"params": list(model.parameters()), "weight_decay": wd}]
    )
    opt = torch.optim.Adam(params, lr=p.lr)
    g = _generator(p.seed, round_, _SEED_TRAIN, 1)
    model.train()
    last = float("nan")
    bounds = epoch_batches(n, p.batch_size, p.equal_batches)
    for _ in range(p.epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        total, seen = 0.0, 0
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            b = perm[s:e]
            opt.zero_grad(set_to_none=True)
            with _train_autocast(p, x.device):
                logits = model(x[b])
            loss = F.cross_entropy(logits.float(), y[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.numel()
            seen += b.numel()
        last = total / max(seen, 1)
    if not math.isfinite(last):
        raise FloatingPointError(f"round {round_}: the training loss diverged ({last})")
    model.eval()
    return model, last


# ------------------------------------------------------------------------------------------------
# The labelled set and the pool
# ------------------------------------------------------------------------------------------------
class LabelledPool:
    """How a run splits the training set: the labelled images (in acquisition order), the
    held-out validation images (never labelled), and the pool (all the others).

    Args:
        n: training-set size.
        initial: the initial labelled indices.
        validation: the validation indices.
    """

    def __init__(self, n: int, initial: Sequence[int], validation: Sequence[int]) -> None:
        self.n = int(n)
        self.initial: list[int] = [int(i) for i in initial]
        self.validation: list[int] = [int(i) for i in validation]
        self.labelled: list[int] = list(self.initial)

    def pool_indices(self) -> torch.Tensor:
        """Training-set indices still in the pool (neither labelled nor validation), ascending."""
        taken = torch.zeros(self.n, dtype=torch.bool)
        for idx in (self.labelled, self.validation):
            if idx:
                taken[torch.tensor(idx, dtype=torch.int64)] = True
        return (~taken).nonzero().reshape(-1)

    def extended(self, new: Sequence[int]) -> list[int]:
        """The labelled indices with ``new`` appended (``self`` is not changed); ValueError if
        one of them is already labelled or held out for validation."""
        out = self.labelled + [int(i) for i in new]
        clash = set(new) & set(self.validation)
        if len(set(out)) != len(out) or clash:  # pragma: no cover - a bug if it happens
            raise ValueError(f"acquired images {sorted(new)} overlap the labelled or validation set")
        return out


# ------------------------------------------------------------------------------------------------
# The run store: state.json, the model checkpoint while it is needed, the CSV
# ------------------------------------------------------------------------------------------------
class RunStore:
    """Where a run is committed after every round (both paths optional).

    * ``state_dir/state.json``: protocol, data fingerprint, split, labelled indices and every
      round's record; written atomically, it is the commit point.
    * ``state_dir/round_XXXX.pt``: the weights of the last round's model, written (before
      ``state.json``) only while the next round needs them to score the pool, and deleted when
      the run is complete: a finished run's state is ``state.json`` alone. A resume that needs a
      model whose checkpoint is gone retrains it (see :class:`ActiveLearningLoop`).
    * ``csv_path``: the per-round CSV (:data:`CSV_COLUMNS`), rewritten after the commit.

    One process at a time: :meth:`lock` (held by :meth:`ActiveLearningLoop.run` and
    :meth:`ActiveLearningLoop.step`) makes a second process on the same state directory fail at
    once with :data:`StateLockedError`, and :meth:`commit` refuses to write over a state that
    moved on since this process read it.
    """

    def __init__(
        self, state_dir: str | os.PathLike[str] | None, csv_path: str | os.PathLike[str] | None
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self._lock = DirectoryLock(self.state_dir, "run state directory") if self.state_dir else None

    def lock(self) -> contextlib.AbstractContextManager:
        """Hold the state directory against other processes (re-entrant; a no-op without a
        state directory). Raises :data:`StateLockedError`, naming the holder, when another
        process holds it; the kernel releases it when the holder dies, however it dies."""
        return self._lock if self._lock is not None else contextlib.nullcontext()

    @property
    def state_path(self) -> Path | None:
        """``state_dir/state.json`` (None without a state directory)."""
        return self.state_dir / _STATE_JSON if self.state_dir is not None else None

    def exists(self) -> bool:
        """Whether a committed state is there."""
        return self.state_path is not None and self.state_path.exists()

    def checkpoint_path(self, round_: int) -> Path:
        """The model checkpoint of round ``round_``."""
        assert self.state_dir is not None
        return self.state_dir / f"round_{round_:04d}.pt"

    def clear(self) -> None:
        """Delete the committed state (``state.json`` and checkpoints)."""
        if self.state_dir is not None:
            for f in [self.state_dir / _STATE_JSON, *self.state_dir.glob("round_*.pt")]:
                f.unlink(missing_ok=True)

    def read(self) -> dict[str, Any]:
        """The committed state; StateMismatchError if unreadable or of another version."""
        path = self.state_path
        assert path is not None
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StateMismatchError(f"cannot read the state {path}: {e}") from e
        if st.get("version") != STATE_VERSION:
            raise StateMismatchError(f"{path}: state version {st.get('version')!r} is not supported")
        return st

    def rounds_on_disk(self) -> int:
        """Rounds the committed state holds (0 without one)."""
        return int(self.read()["rounds_done"]) if self.exists() else 0

    def read_model(self, name: str | None, round_: int) -> dict[str, torch.Tensor] | None:
        """The model weights saved for round ``round_`` in checkpoint ``name``; None when there
        is none (finished runs, trimmed states); StateMismatchError when it is unreadable or of
        another round."""
        if self.state_dir is None or not name or not (self.state_dir / name).exists():
            return None
        ckpt = self.state_dir / name
        try:
            blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:
            raise StateMismatchError(f"cannot read the checkpoint {ckpt}: {e}") from e
        if blob.get("round") != round_:
            raise StateMismatchError(f"{ckpt} is for round {blob.get('round')}, not {round_}")
        return blob["model"]

    def commit(
        self, state: dict[str, Any], records: Sequence[RoundRecord], model: nn.Module | None
    ) -> None:
        """Commit one round: the checkpoint of ``model`` (if given), then ``state.json`` (with
        ``state["checkpoint"]`` set), then the CSV; other checkpoints are deleted afterwards."""
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            r = int(state["rounds_done"]) - 1
            on_disk = self.rounds_on_disk()
            if on_disk != r:
                raise StateMismatchError(
                    f"{self.state_path} holds {on_disk} round(s), but this run read it at {r}: "
                    f"another process changed it meanwhile; round {r} is not saved (run again to "
                    "resume from the state on disk)"
                )
            keep = self.checkpoint_path(r).name if model is not None else None
            if model is not None:
                weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                atomic_torch_save({"round": r, "model": weights}, self.checkpoint_path(r))
            state = {**state, "checkpoint": keep}
            blob = json.dumps(state, indent=1).encode()
            atomic_write_bytes(self.state_dir / _STATE_JSON, blob)  # the commit point
            for old in self.state_dir.glob("round_*.pt"):
                if old.name != keep:
                    with contextlib.suppress(OSError):
                        old.unlink()
        self.write_csv(records)

    def write_csv(self, records: Sequence[RoundRecord]) -> None:
        """Rewrite the per-round CSV (if there is one)."""
        if self.csv_path is not None:
            write_csv(self.csv_path, records)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class ActiveLearningLoop:
    """A resumable active-learning run: a labelled set grown from a pool, one round at a time.

    Args:
        data: ``x_train``/``y_train`` (labelled set, validation and pool are drawn from it) and
            ``x_test``/``y_test`` (e.g. :class:`fastbald.data.MNISTData`).
        protocol: the run's settings (:class:`LoopProtocol`; the paper's by default).
        state_dir: where the state is committed after every round (``None``: in memory only;
            see :class:`RunStore`). An existing state with the same protocol (``rounds`` may
            differ) and data is resumed; a different one raises :class:`StateMismatchError`
            unless ``restart``.
        csv_path: also write the per-round CSV there after every round (atomically).
        restart: discard an existing state in ``state_dir`` and start over.
        num_classes: number of classes (default: ``data.num_classes`` or ``max(y) + 1``).
        model_factory: ``(protocol, num_classes) -> nn.Module`` building an untrained model
            (default: :class:`fastbald.models.BayesianCNN`). Called once per round right after
            the round's training seed is set, so its initialisation is reproducible. Models with
            ``param_groups(wd, scope=...)`` get the paper's dense-layer-only weight decay.
        device: where to train and score (default CPU).
        callbacks: called as ``cb(loop, record)`` after each round is committed (progress
            displays; raising from one stops the run with that round safely saved).
        score_progress: show :func:`fastbald.score_pool`'s progress bar while scoring.
        deterministic: call ``torch.use_deterministic_algorithms(True, warn_only=True)`` while
            running (restored afterwards).

    Every round seeds its own draws (:func:`train_from_scratch`), so results do not depend on
    torch's global RNG state and are bit-for-bit reproducible on the same machine, software and
    number of threads (``torch.set_num_threads``): keep those fixed across restarts. A resume
    that needs the last round's model (to score the next round's pool) loads its checkpoint, or,
    when the checkpoint is gone (a finished run whose ``rounds`` is raised), retrains it from the
    saved labelled set and warns if it does not reproduce the recorded loss and test error.
    ``model`` is the last round's model (None after a resume that does not need it). The state
    records the environment (:meth:`environment`) each round ran in; resuming under another one
    warns.
    """

    def __init__(
        self,
        data: PoolData,
        protocol: LoopProtocol | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        csv_path: str | os.PathLike[str] | None = None,
        restart: bool = False,
        num_classes: int | None = None,
        model_factory: ModelFactory | None = None,
        device: str | torch.device | None = None,
        callbacks: Sequence[RoundCallback] = (),
        score_progress: bool = False,
        deterministic: bool = True,
    ) -> None:
        self.protocol = protocol if protocol is not None else LoopProtocol()
        self.acquisition = acquisition(self.protocol.acquisition)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.store = RunStore(state_dir, csv_path)
        self.model_factory = model_factory or default_model_factory
        self.callbacks = list(callbacks)
        self.score_progress = bool(score_progress)
        self.deterministic = bool(deterministic)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            if not isinstance(getattr(data, name, None), torch.Tensor):
                raise TypeError(f"data.{name} must be a torch.Tensor")
        if data.x_train.shape[0] != data.y_train.shape[0]:
            raise ValueError("data.x_train and data.y_train differ in length")
        if data.x_test.shape[0] != data.y_test.shape[0]:
            raise ValueError("data.x_test and data.y_test differ in length")
        for name in ("x_train", "x_test"):
            if not getattr(data, name).is_floating_point():
                raise TypeError(f"data.{name} must hold floating-point images, got {getattr(data, name).dtype}")
        if data.x_test.dtype != data.x_train.dtype:
            raise TypeError(
                f"data.x_train ({data.x_train.dtype}) and data.x_test ({data.x_test.dtype}) differ in dtype"
            )
        if model_factory is None and data.x_train.dtype != torch.float32:
            raise TypeError(
                f"the default model (BayesianCNN, float32 weights) needs float32 images, data.x_train "
                f"is {data.x_train.dtype}: convert the images with .float() or pass a model_factory"
            )
        for name in ("y_train", "y_test"):
            y = getattr(data, name)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"data.{name} must hold integer class labels, got {y.dtype}")
            if y.dim() != 1:
                raise ValueError(f"data.{name} must be 1-D (one label per image), got shape {tuple(y.shape)}")
        if num_classes is None:
            num_classes = getattr(data, "num_classes", None) or int(data.y_train.max()) + 1
        self.num_classes = int(num_classes)
        for name in ("y_train", "y_test"):
            y = getattr(data, name)
            bad = torch.nonzero((y < 0) | (y >= self.num_classes)).flatten()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"data.{name}[{i}] = {int(y[i])} is not a class label in [0, {self.num_classes}) "
                    f"({bad.numel()} such labels)"
                )
        self.fingerprint = data_fingerprint(data)
        self.x_train = data.x_train.to(self.device)
        self.y_train = data.y_train.to(self.device, torch.int64)
        x_test, y_test = data.x_test, data.y_test
        ts = self.protocol.test_subset
        if ts is not None and ts < x_test.shape[0]:
            keep = torch.randperm(x_test.shape[0], generator=_generator(0, _SEED_TEST))[:ts]
            x_test, y_test = x_test[keep.sort().values], y_test[keep.sort().values]
        self.x_test = x_test.to(self.device)
        self.y_test = y_test.to(self.device, torch.int64)

        self.records: list[RoundRecord] = []
        self.environments: list[dict[str, Any]] = []
        self.model: nn.Module | None = None
        initial, val = split_initial(data.y_train, self.protocol, self.num_classes)
        self.split = LabelledPool(int(data.x_train.shape[0]), initial.tolist(), val.tolist())
        if restart:
            with self.store.lock():
                self.store.clear()
        elif self.store.exists():
            self._resume()

    # -- views -----------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path | None:
        """The state directory (None: in memory only)."""
        return self.store.state_dir

    @property
    def csv_path(self) -> Path | None:
        """The per-round CSV (None: none)."""
        return self.store.csv_path

    @property
    def labelled_indices(self) -> list[int]:
        """Labelled training-set indices, in acquisition order (the initial set first)."""
        return self.split.labelled

    @property
    def initial_indices(self) -> list[int]:
        """The initial labelled set."""
        return self.split.initial

    @property
    def validation_indices(self) -> list[int]:
        """The held-out validation images (never labelled)."""
        return self.split.validation

    @property
    def next_round(self) -> int:
        """The round :meth:`step` runs next (= rounds completed)."""
        return len(self.records)

    @property
    def done(self) -> bool:
        """Whether every round of the protocol has run."""
        return self.next_round > self.protocol.rounds

    def pool_indices(self) -> torch.Tensor:
        """Training-set indices still in the pool (neither labelled nor validation), ascending."""
        return self.split.pool_indices()

    def round_seed(self, round_: int, purpose: int) -> int:
        """The seed of one purpose (train, score, subset, random) in round ``round_``."""
        return mix_seed(self.protocol.seed, round_, purpose)

    def _needs_model(self, round_: int) -> bool:
        """Whether round ``round_`` scores the pool with the previous round's model."""
        return 1 <= round_ <= self.protocol.rounds and self.acquisition.rule != "uniform"

    # -- one round -------------------------------------------------------------------------------
    def _acquire(self, round_: int) -> tuple[list[int], float, int, int]:
        """``(new indices best first, seconds, pool size, items scored)`` of round ``round_``."""
        p, acq = self.protocol, self.acquisition
        t0 = time.perf_counter()
        pool = self.pool_indices()
        if round_ == 0:
            return [], 0.0, int(pool.numel()), 0
        if pool.numel() < p.per_round:
            raise RuntimeError(
                f"round {round_}: the pool has {pool.numel()} images left, fewer than "
                f"per_round = {p.per_round}"
            )
        if acq.rule == "uniform":
            g = _generator(p.seed, round_, _SEED_RANDOM)
            new = pool[torch.randperm(pool.numel(), generator=g)[: p.per_round]]
            return new.tolist(), time.perf_counter() - t0, int(pool.numel()), 0
        from .stochastic import MODES, stochastic_acquire  # imported lazily, as score_pool below

        stochastic = acq.rule in MODES  # a stochastic batch acquisition, beta = 1
        if acq.rule == "batchbald":
            return self._acquire_batchbald(round_, pool, t0)
        if (acq.rule != "top_k" and not stochastic) or acq.metric is None:  # pragma: no cover
            raise NotImplementedError(f"the loop does not implement the {acq.rule!r} rule of {acq.name!r}")
        cand = self._candidates(round_, pool)
        from .pool import score_pool  # imported lazily: the loop itself does not need it

        res = score_pool(
            self.model,
            self.x_train[cand.to(self.device)],
            T=p.T,
            method=acq.metric,
            k=None if stochastic else p.per_round,
            block_size=p.score_block_size,
            batch_size=p.score_block_size,
            seed=self.round_seed(round_, _SEED_SCORE),
            progress=self.score_progress,
        )
        if stochastic:
            picked = stochastic_acquire(res.scores.cpu(), p.per_round, acq.rule, 1.0, acq.metric,
                                        seed=self.round_seed(round_, _SEED_STOCHASTIC))
            return cand[picked].tolist(), time.perf_counter() - t0, int(pool.numel()), int(cand.numel())
        assert res.topk is not None
        new = cand[res.topk.cpu()]
        return new.tolist(), time.perf_counter() - t0, int(pool.numel()), int(cand.numel())

    def _candidates(self, round_: int, pool: torch.Tensor) -> torch.Tensor:
        """The pool indices scored this round: the whole pool, or its seeded random ``pool_subset``
        (sorted); raises when there is no trained model to score them with."""
        p = self.protocol
        cand = pool
        if p.pool_subset is not None and p.pool_subset < pool.numel():
            g = _generator(p.seed, round_, _SEED_SUBSET)
            cand = pool[torch.randperm(pool.numel(), generator=g)[: p.pool_subset]].sort().values
        if self.model is None:
            raise RuntimeError("no trained model to score the pool with")
        return cand

    def _acquire_batchbald(self, round_: int, pool: torch.Tensor, t0: float) -> tuple[list[int], float, int, int]:
        """Greedy BatchBALD (fastbald.batchbald_batch, 10,000 sampled configurations beyond the exact
        regime) on T MC-dropout log-probabilities of the pool (or its random ``pool_subset``)."""
        from .batchbald import batchbald_batch
        from .mc import mc_logits

        p = self.protocol
        cand = self._candidates(round_, pool)
        logits = mc_logits(self.model, self.x_train[cand.to(self.device)], p.T,
                           seed=self.round_seed(round_, _SEED_SCORE))
        lp = torch.log_softmax(logits.float(), -1).cpu().contiguous()
        r = batchbald_batch(lp, p.per_round, num_samples=max(10_000, p.T),
                            seed=self.round_seed(round_, _SEED_STOCHASTIC) % 2**62)
        return cand[r.indices].tolist(), time.perf_counter() - t0, int(pool.numel()), int(cand.numel())

    def _train(self, round_: int, labelled: Sequence[int]) -> tuple[nn.Module, float]:
        idx = torch.tensor(list(labelled), dtype=torch.int64, device=self.device)
        return train_from_scratch(
            self.model_factory, self.protocol, self.num_classes,
            self.x_train[idx], self.y_train[idx], round_,
        )

    def _evaluate(self, model: nn.Module) -> tuple[float, float | None]:
        """``(test error, validation error or None)`` of ``model`` (dropout off)."""
        test_err = _error_rate(model, self.x_test, self.y_test)
        vidx = torch.tensor(self.validation_indices, dtype=torch.int64, device=self.device)
        val_err = _error_rate(model, self.x_train[vidx], self.y_train[vidx]) if vidx.numel() else None
        return test_err, val_err

    def environment(self) -> dict[str, Any]:
        """What besides the protocol and data decides a round's numbers: the torch and fastbald
        versions, torch's thread count and CPU capability (its kernels' instruction set), the
        device."""
        from . import __version__

        return {
            "torch": torch.__version__,
            "fastbald": __version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(self.device),
        }

    def _last_environment(self) -> dict[str, Any] | None:
        """The environment recorded last (without its ``from_round``), None if none."""
        if not self.environments:
            return None
        return {k: v for k, v in self.environments[-1].items() if k != "from_round"}

    def _note_environment(self, round_: int) -> None:
        """Record the environment from ``round_`` on in the state when it changed."""
        env = self.environment()
        if self._last_environment() != env:
            self.environments.append({"from_round": round_, **env})

    def step(self) -> RoundRecord:
        """Run the next round, commit the state and call the callbacks; returns its record.

        Holds the state directory's lock (:meth:`RunStore.lock`) meanwhile."""
        with self.store.lock():
            return self._step()

    def _step(self) -> RoundRecord:
        r, p = self.next_round, self.protocol
        if r > p.rounds:
            raise RuntimeError(f"the run is complete ({p.rounds} rounds)")
        self._note_environment(r)
        with _deterministic_algorithms(self.deterministic):
            new, score_s, pool_size, scored = self._acquire(r)
            labelled = self.split.extended(new)
            t0 = time.perf_counter()
            model, loss = self._train(r, labelled)
            t1 = time.perf_counter()
            test_err, val_err = self._evaluate(model)
            eval_s = time.perf_counter() - t1
        rec = RoundRecord(
            round=r, labelled=len(labelled), acquired=len(labelled) - p.initial,
            test_error=test_err, val_error=val_err, train_loss=loss, train_seconds=t1 - t0,
            score_seconds=score_s, eval_seconds=eval_s, new_indices=[int(i) for i in new],
            pool_size=pool_size, scored=scored,
        )
        before = (self.split.labelled, self.model, list(self.environments))
        self.split.labelled, self.model = labelled, model
        self.records.append(rec)
        keep = model if self.store.state_dir is not None and self._needs_model(r + 1) else None
        try:
            self.store.commit(self.state_dict(), self.records, keep)
        except BaseException:
            # Not committed (a full disk, Ctrl-C while writing): this loop stays at round r, so
            # that a retry runs the round again instead of finding the state "moved on".
            try:
                committed = self.store.state_dir is not None and self.store.rounds_on_disk() == r + 1
            except Exception:  # an unreadable state: keep the original error, assume not committed
                committed = False
            if not committed:
                self.records.pop()
                self.split.labelled, self.model, self.environments = before
            raise
        for cb in self.callbacks:
            cb(self, rec)
        return rec

    def run(self, rounds: int | None = None) -> list[RoundRecord]:
        """Run until round ``rounds`` (default: the protocol's) is done; returns all records.

        Resumed runs continue where the state left off; a finished run returns at once.
        """
        last = self.protocol.rounds if rounds is None else min(int(rounds), self.protocol.rounds)
        if self.next_round > last:  # nothing to run (a finished run): no lock, no writes
            return list(self.records)
        with self.store.lock():
            while self.next_round <= last:
                self.step()
        return list(self.records)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the state (``checkpoint`` is filled in by :meth:`RunStore.commit`)."""
        return {
            "version": STATE_VERSION,
            "protocol": self.protocol.to_dict(),
            "data": self.fingerprint,
            "num_classes": self.num_classes,
            "initial_indices": self.initial_indices,
            "validation_indices": self.validation_indices,
            "labelled_indices": self.labelled_indices,
            "rounds_done": self.next_round,
            "checkpoint": None,
            "records": [r.to_dict() for r in self.records],
            "environments": list(self.environments),
        }

    def _resume(self) -> None:
        st = self.store.read()
        path = self.store.state_path
        diff = self.protocol.differences(LoopProtocol.from_dict(st["protocol"]))
        if diff:
            raise StateMismatchError(
                f"{path} holds a run with a different protocol ({'; '.join(diff)}): use another "
                "output directory, the same settings, or restart it"
            )
        if st["data"] != self.fingerprint:
            raise StateMismatchError(
                f"{path} was run on different data ({st['data']} vs {self.fingerprint})"
            )
        if st["initial_indices"] != self.initial_indices or st["validation_indices"] != self.validation_indices:
            raise StateMismatchError(f"{path}: the initial split does not match the seed")
        self.records = [RoundRecord.from_dict(d) for d in st["records"]]
        self.split.labelled = [int(i) for i in st["labelled_indices"]]
        self.environments = list(st.get("environments", []))  # states before 2026-12-03: none
        last = self._last_environment()
        if last is not None and not self.done:
            now = self.environment()
            diff = [f"{k} {last.get(k)!r} -> {now[k]!r}" for k in now if last.get(k) != now[k]]
            if diff:
                warnings.warn(
                    f"{path}: resuming at round {self.next_round} with {'; '.join(diff)}: the "
                    "rounds from here on may differ from an uninterrupted run (the state records "
                    "each environment and the round it started at)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if self.records and self._needs_model(self.next_round):
            weights = self.store.read_model(st.get("checkpoint"), self.next_round - 1)
            if weights is not None:
                model = self.model_factory(self.protocol, self.num_classes)
                model.load_state_dict(weights)
                self.model = model.to(self.device).eval()
            else:
                self.model = self._retrain_last_model()
        # The CSV may lag the state by one round after a kill; a process running on this state
        # keeps its own CSV, and rewriting it from here could put back a round-old copy.
        with contextlib.suppress(StateLockedError, OSError), self.store.lock():  # OSError: read-only
            self.store.write_csv(self.records)

    def _retrain_last_model(self) -> nn.Module:
        """The last committed round's model, trained again (its checkpoint is not kept)."""
        rec = self.records[-1]
        with _deterministic_algorithms(self.deterministic):
            model, loss = self._train(rec.round, self.labelled_indices[: rec.labelled])
            test_err, _ = self._evaluate(model)
        if (loss, test_err) != (rec.train_loss, rec.test_error):
            warnings.warn(
                f"round {rec.round} retrained on resume gives loss {loss!r} and test error "
                f"{test_err!r}, not the recorded {rec.train_loss!r} and {rec.test_error!r} (another "
                "machine, torch version or thread count?): the resumed rounds may differ from an "
                "uninterrupted run",
                RuntimeWarning,
                stacklevel=3,
            )
        return model
