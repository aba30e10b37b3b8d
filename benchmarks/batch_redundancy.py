"""How redundant are the acquired batches of an MNIST active-learning run?

Reads the ``state.json`` of finished or running experiment runs (``fastbald experiment mnist
--state-dir DIR``) and, for each run and each range of rounds, measures its acquired batches of
``per_round`` images against the same number of random batches of the pool:

- ``classes``: distinct true labels in a batch (random batches of 10 from MNIST: ~6.5);
- ``largest``: images of the most frequent label in a batch (random: ~2.8);
- ``nn cos``: mean over the batch's images of the cosine similarity (raw pixels) to the most
  similar other image of the same batch (random: ~0.59). Near-duplicates push it up.

A batch that spends several labels on one class, on images that look alike, carries less
information than its size: the redundancy that BatchBALD and stochastic acquisition address.

    python benchmarks/batch_redundancy.py benchmarks/results/mnist_full/state/*/ \\
        benchmarks/results/mnist/state/*/ [--rounds 1-10 1-40 41-100] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fastbald.data import load_mnist


def parse_range(text: str) -> tuple[int, int]:
    """``"a-b"`` -> ``(a, b)``, rounds counted from 1, both ends included."""
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a round range is FIRST-LAST, e.g. 1-10; got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"a round range needs 1 <= FIRST <= LAST; got {text!r}")
    return a, b


def acquired_batches(state: dict) -> list[list[int]]:
    """The acquired batches of a run, in acquisition order (the initial images left out)."""
    proto = state["protocol"]
    acquired = state["labelled_indices"][proto["initial"] :]
    b = proto["per_round"]
    return [acquired[i : i + b] for i in range(0, len(acquired), b)]


def load_states(paths: list[Path], ap: argparse.ArgumentParser) -> list[tuple[str, dict]]:
    """``(name, state)`` of each run state directory (or ``state.json``), named
    ``<results dir>/<run>``; a path without a state is a usage error of ``ap``."""
    states = []
    for p in paths:
        f = p / "state.json" if p.is_dir() else p
        if not f.is_file():
            ap.error(f"{p}: no state.json there")
        states.append((f"{f.parent.parent.parent.name}/{f.parent.name}", json.loads(f.read_text())))
    return states


def batches_by_range(states: list[tuple[str, dict]], ranges: list[tuple[int, int]]):
    """``(name, first, last, batches)`` for each round range ``(first, last)`` and each run
    with batches in it (a run stopped earlier has fewer than ``last - first + 1``)."""
    for a, b in ranges:
        for name, st in states:
            bs = acquired_batches(st)[a - 1 : b]
            if bs:
                yield name, a, b, bs


def emit(text: str, out: Path | None) -> None:
    """Print the table, and write it to ``out`` when given."""
    sys.stdout.write(text)
    if out:
        out.write_text(text)


def batch_stats(batches: list, labels: np.ndarray, unit_rows: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean distinct labels, mean size of the largest label and mean nearest-neighbour cosine
    of ``batches`` (each a list of row indices of ``unit_rows``, rows of unit norm)."""
    classes, largest, nn = [], [], []
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        y = labels[idx]
        classes.append(len(np.unique(y)))
        largest.append(int(np.bincount(y, minlength=num_classes).max()))
        if len(idx) > 1:
            g = unit_rows[idx] @ unit_rows[idx].T
            np.fill_diagonal(g, -np.inf)
            nn.append(float(g.max(axis=1).mean()))
    return {
        "batches": len(batches),
        "classes": float(np.mean(classes)),
        "largest": float(np.mean(largest)),
        "nn_cos": float(np.mean(nn)) if nn else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run state directories (or their state.json)")
    ap.add_argument("--rounds", nargs="+", type=parse_range, default=[(1, 10), (1, 40), (41, 100)],
                    help="round ranges FIRST-LAST (from 1), default 1-10 1-40 41-100")
    ap.add_argument("--random-batches", type=int, default=2000, help="random batches for the baseline row")
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)

    states = load_states(args.runs, ap)

    data = load_mnist()
    labels = data.y_train.numpy()
    rows = data.x_train.reshape(data.x_train.shape[0], -1).numpy().astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    k = states[0][1]["protocol"]["per_round"]
    rng = np.random.default_rng(0)
    rand = [rng.choice(len(labels), k, replace=False) for _ in range(args.random_batches)]
    base = batch_stats(rand, labels, unit, data.num_classes)

    lines = [
        "| run | rounds | batches | classes per batch | largest class | nearest-neighbour cosine |",
        "|---|---|---|---|---|---|",
        f"| random batches of {k} | - | {base['batches']} | {base['classes']:.2f} | {base['largest']:.2f} "
        f"| {base['nn_cos']:.3f} |",
    ]
    for name, a, b, bs in batches_by_range(states, args.rounds):
        s = batch_stats(bs, labels, unit, data.num_classes)
        lines.append(f"| {name} | {a}-{b} | {s['batches']} | {s['classes']:.2f} "
                     f"| {s['largest']:.2f} | {s['nn_cos']:.3f} |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
