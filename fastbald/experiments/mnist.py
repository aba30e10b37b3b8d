"""The paper's MNIST experiment (Gal, Islam & Ghahramani 2017, Section 5.1, Table 1, Figure 1).

Protocol (the defaults, :data:`PAPER_PROTOCOL`): 20 class-balanced initial labelled images,
100 held-out validation images, the official 10,000 test images, the rest of the 60,000 training
images as the pool; 100 rounds of 10 acquisitions (1,000 acquired images); after each, the
Bayesian CNN is re-initialised and trained from scratch for 50 epochs (Adam, batch 128, L2
``3.5 / N_train`` on the dense layer); MC dropout with T = 100 samples, as in the authors' code.
Unlike the authors' code, the whole remaining pool is scored each round (``pool_subset=None``);
the ``"authors"`` preset scores a random 2,000-image subset as they did.

Outputs, under ``out``: ``<acquisition>_seed<k>.csv`` (one row per round: round, labelled,
acquired, test_error, train_seconds, score_seconds; rewritten atomically after every round) and
``state/<acquisition>_seed<k>/`` (the resumable state: ``state.json`` with the labelled indices,
all per-round metrics and the software each round ran with, and, while the run is part-way and
its next round scores the pool, the last round's model checkpoint; ``state_root`` puts it
elsewhere).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..loop import (
    ActiveLearningLoop,
    LoopProtocol,
    PoolData,
    RoundCallback,
    RoundRecord,
)
from ..metrics import DISPLAY_NAMES, canonical_acquisition

__all__ = [
    "DEFAULT_OUT",
    "PAPER_PROTOCOL",
    "PAPER_ACQUISITIONS",
    "PRESETS",
    "ProgressPrinter",
    "csv_path",
    "make_protocol",
    "run_mnist",
    "state_dir",
]

#: Where the real runs write (relative to the working directory).
DEFAULT_OUT = Path("benchmarks/results/mnist")

#: The paper's protocol (acquisition and seed are per run).
PAPER_PROTOCOL = LoopProtocol()

#: The five acquisition functions of the paper's Table 1, in its order.
PAPER_ACQUISITIONS: tuple[str, ...] = ("bald", "variation_ratio", "entropy", "mean_std", "random")

#: Named sets of protocol overrides (``acquisitions`` and ``out`` are defaults for the CLI).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's protocol, whole pool scored: the defaults.
    "paper": {},
    # The authors' code: only a random 2,000-image subset of the pool is scored each round.
    "authors": {"pool_subset": 2000},
    # A short run on real MNIST for `make demo` (about 2 minutes on 2 CPU cores): BALD against
    # random acquisition, 10 rounds of 20, the paper's 50 epochs (with 20 epochs the tiny models
    # are too under-trained for their uncertainty to help), T = 20, 2,000 pool items scored and
    # 2,000 test images.
    "demo": {
        "acquisitions": ("bald", "random"),
        "out": "fastbald-demo",
        "rounds": 10,
        "per_round": 20,
        "epochs": 50,
        "T": 20,
        "pool_subset": 2000,
        "test_subset": 2000,
    },
}

_PROTOCOL_FIELDS = {f.name for f in dataclasses.fields(LoopProtocol)}


def make_protocol(
    acquisition: str = "bald", seed: int = 0, preset: str = "paper", **overrides: Any
) -> LoopProtocol:
    """The protocol of one run: the paper's, then ``preset``'s overrides, then ``overrides``
    (``None`` values are ignored, so unset CLI options keep the preset's values)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    fields: dict[str, Any] = {
        k: v for k, v in PRESETS[preset].items() if k in _PROTOCOL_FIELDS
    }
    for k, v in overrides.items():
        if k not in _PROTOCOL_FIELDS:
            raise TypeError(f"unknown protocol setting {k!r}")
        if v is not None:
            fields[k] = v
    fields["acquisition"] = canonical_acquisition(acquisition)
    fields["seed"] = seed
    return dataclasses.replace(PAPER_PROTOCOL, **fields)


def csv_path(out: str | os.PathLike[str], acquisition: str, seed: int) -> Path:
    """``<out>/<acquisition>_seed<seed>.csv``."""
    return Path(out) / f"{canonical_acquisition(acquisition)}_seed{seed}.csv"


def state_dir(
    out: str | os.PathLike[str],
    acquisition: str,
    seed: int,
    state_root: str | os.PathLike[str] | None = None,
) -> Path:
    """``<state_root>/<acquisition>_seed<seed>`` (``state_root`` defaults to ``<out>/state``):
    the resumable state of one run."""
    root = Path(state_root) if state_root is not None else Path(out) / "state"
    return root / f"{canonical_acquisition(acquisition)}_seed{seed}"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class ProgressPrinter:
    """A per-round progress line: labelled count, test error, train/score time, elapsed, ETA.

    Use as a loop callback (``ActiveLearningLoop(..., callbacks=[ProgressPrinter()])``).
    """

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.prefix = prefix
        self._t0 = time.perf_counter()
        self._times: list[float] = []

    def __call__(self, loop: ActiveLearningLoop, rec: RoundRecord) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        p = loop.protocol
        total = rec.train_seconds + rec.score_seconds + rec.eval_seconds
        self._times.append(total)
        recent = self._times[-5:]
        eta = sum(recent) / len(recent) * (p.rounds - rec.round) * self._growth(loop, rec)
        scored = f" ({rec.scored} scored)" if rec.scored else ""
        print(
            f"{self.prefix}round {rec.round:>{len(str(p.rounds))}}/{p.rounds}  "
            f"labelled {rec.labelled:>5}  acquired {rec.acquired:>5}  "
            f"test error {100 * rec.test_error:6.2f}%  "
            f"train {rec.train_seconds:6.1f}s  score {rec.score_seconds:6.1f}s{scored}  "
            f"eval {rec.eval_seconds:4.1f}s  "
            f"elapsed {_fmt_s(time.perf_counter() - self._t0)}  eta {_fmt_s(eta)}",
            file=stream,
            flush=True,
        )

    @staticmethod
    def _growth(loop: ActiveLearningLoop, rec: RoundRecord) -> float:
        # Training time grows with the labelled set; scale the ETA by the mean remaining size.
        p = loop.protocol
        if rec.round >= p.rounds:
            return 1.0
        mean_left = rec.labelled + p.per_round * (p.rounds - rec.round + 1) / 2
        frac_train = rec.train_seconds / max(
            rec.train_seconds + rec.score_seconds + rec.eval_seconds, 1e-9
        )
        return (1 - frac_train) + frac_train * mean_left / max(rec.labelled, 1)


def run_mnist(
    acquisition: str = "bald",
    seed: int = 0,
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    protocol: LoopProtocol | None = None,
    data: PoolData | None = None,
    data_root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    state_root: str | os.PathLike[str] | None = None,
    restart: bool = False,
    stop_after: int | None = None,
    progress: bool | Callable[[ActiveLearningLoop, RoundRecord], None] = True,
    callbacks: Sequence[RoundCallback] = (),
    score_progress: bool = False,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> list[RoundRecord]:
    """Run (or resume) one MNIST active-learning run and return its per-round records.

    Args:
        acquisition: ``bald``, ``variation_ratio``, ``entropy`` (Max Entropy), ``mean_std``,
            ``margin``, ``least_confidence`` or ``random`` (aliases accepted).
        seed: the run's seed (initial set, training, dropout masks, subsets).
        out: output directory: the CSV and ``state/`` go there.
        protocol: the full protocol (default: :func:`make_protocol` with ``overrides``); its
            acquisition and seed are replaced by the arguments.
        data: the dataset (default: :func:`fastbald.data.load_mnist` ``(data_root, cache_dir)``).
        state_root: where the runs' states live (default ``<out>/state``); the state of this
            run is ``<state_root>/<acquisition>_seed<seed>``.
        restart: discard an existing state of this run instead of resuming it.
        stop_after: stop after this round this time (default: run all the protocol's rounds);
            the state keeps the full protocol, so a later call continues.
        progress: print a line per round (True), nothing (False), or a callback of your own.
        callbacks: more ``cb(loop, record)`` callbacks, called after each committed round.
        score_progress: show the pool-scoring progress bar.
        device: where to train and score (default CPU).
        **overrides: protocol settings (``epochs=``, ``T=``, ``pool_subset=``, ...;
            ``preset=`` picks a :data:`PRESETS` entry first).
    """
    if protocol is None:
        protocol = make_protocol(acquisition, seed, **overrides)
    else:
        if overrides:
            raise TypeError("pass either protocol= or protocol overrides, not both")
        protocol = dataclasses.replace(
            protocol, acquisition=canonical_acquisition(acquisition), seed=seed
        )
    if data is None:
        from ..data import load_mnist

        data = load_mnist(data_root, cache_dir)
    cbs: list[RoundCallback] = []
    if progress is True:
        cbs.append(ProgressPrinter(prefix=f"[{DISPLAY_NAMES[protocol.acquisition]} seed {seed}] "))
    elif callable(progress):
        cbs.append(progress)
    cbs.extend(callbacks)
    loop = ActiveLearningLoop(
        data,
        protocol,
        state_dir=state_dir(out, protocol.acquisition, seed, state_root),
        csv_path=csv_path(out, protocol.acquisition, seed),
        restart=restart,
        device=device,
        callbacks=cbs,
        score_progress=score_progress,
    )
    with loop.store.lock():  # a run another process holds fails here, before "resuming"
        if progress is True and loop.next_round > 0:
            what = "complete" if loop.done else f"resuming at round {loop.next_round}"
            print(
                f"[{DISPLAY_NAMES[protocol.acquisition]} seed {seed}] {what} "
                f"({loop.next_round} round(s) saved in {loop.state_dir})",
                flush=True,
            )
        return loop.run(stop_after)
