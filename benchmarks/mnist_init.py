"""Does the paper CNN learn as fast from a few MNIST labels under another training variant?

Variants: ``torch``, the experiment's own training (:class:`~fastbald.models.BayesianCNN` with
PyTorch's default initialisation, Kaiming-uniform with ``a=sqrt(5)`` and uniform biases, float32);
``keras``, the authors' Keras 1 initialisation (Glorot-uniform weights, zero biases); ``bf16``,
PyTorch init trained under bfloat16 autocast (``LoopProtocol(train_bf16=True)``). This script
trains the model exactly as one round of ``fastbald experiment mnist`` does
(:func:`fastbald.loop.train_from_scratch`: 50 epochs of Adam, batch 128, L2 ``3.5 / N`` on the
dense layer) on random labelled sets of ``n`` images (2 per class, then uniformly random: what
Random acquisition sees after ``n - 20`` acquisitions) and prints the test error (the official
10,000 test images) per variant, on the same labelled set and training seed per repeat, so the
differences to the first variant are paired; and the median CPU seconds per training (measured
side by side, interleaved).

    python benchmarks/mnist_init.py --n 20 70 120 170 270 420 --repeats 6 [--out FILE.md]
    python benchmarks/mnist_init.py --variants torch bf16 --n 20 120 270 520 1020 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastbald.data import load_mnist
from fastbald.loop import LoopProtocol, _error_rate, default_model_factory, train_from_scratch


def keras_init_factory(protocol: LoopProtocol, num_classes: int) -> nn.Module:
    """The paper CNN with Keras 1's initialisation: Glorot-uniform weights, zero biases."""
    model = default_model_factory(protocol, num_classes)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


#: variant -> (model factory, LoopProtocol overrides)
VARIANTS: dict[str, tuple[Callable[[LoopProtocol, int], nn.Module], dict[str, Any]]] = {
    "torch": (default_model_factory, {}),
    "keras": (keras_init_factory, {}),
    "bf16": (default_model_factory, {"train_bf16": True}),
}


def labelled_set(y: torch.Tensor, n: int, repeat: int, num_classes: int = 10) -> torch.Tensor:
    """2 random images per class, then ``n - 2 * num_classes`` uniformly random others."""
    g = torch.Generator().manual_seed(1000 + repeat)
    first = torch.cat(
        [
            torch.nonzero(y == k).flatten()[torch.randperm(int((y == k).sum()), generator=g)[:2]]
            for k in range(num_classes)
        ]
    )
    rest = torch.randperm(y.numel(), generator=g)
    rest = rest[~torch.isin(rest, first)][: n - first.numel()]
    return torch.cat([first, rest])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[20, 70, 120, 170, 270, 420],
        help="labelled-set sizes (>= 20)",
    )
    ap.add_argument("--repeats", type=int, default=6, help="labelled sets (and seeds) per size")
    ap.add_argument(
        "--variants",
        "--init",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["torch", "keras"],
        help="training variants; the first is the baseline of the paired differences",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    a = ap.parse_args(argv)
    if min(a.n) < 20 or a.repeats < 2 or len(set(a.variants)) != len(a.variants):
        ap.error("--n must be >= 20, --repeats >= 2 and the variants distinct")
    torch.set_num_threads(a.threads)
    d = load_mnist()
    base, others = a.variants[0], a.variants[1:]
    head = (
        [f"{v}: test error % (mean ± sd)" for v in a.variants]
        + [f"{base} - {v}, paired (mean ± sd)" for v in others]
        + ["CPU s per training (median): " + " / ".join(a.variants)]
    )
    lines = ["| labelled n | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    print(lines[0], lines[1], sep="\n", flush=True)
    for n in a.n:
        errs: dict[str, list[float]] = {v: [] for v in a.variants}
        cpu: dict[str, list[float]] = {v: [] for v in a.variants}
        t0 = time.perf_counter()
        for rep in range(a.repeats):
            idx = labelled_set(d.y_train, n, rep)
            for v in a.variants:
                factory, overrides = VARIANTS[v]
                p = LoopProtocol(acquisition="random", seed=rep, **overrides)
                c0 = time.process_time()
                model, _ = train_from_scratch(
                    factory, p, d.num_classes, d.x_train[idx], d.y_train[idx], 1
                )
                cpu[v].append(time.process_time() - c0)
                errs[v].append(100 * _error_rate(model, d.x_test, d.y_test))
        cells = [f"{np.mean(e):.2f} ± {np.std(e, ddof=1):.2f}" for e in errs.values()]
        for v in others:
            diff = np.array(errs[base]) - np.array(errs[v])
            cells.append(f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}")
        cells.append(" / ".join(f"{statistics.median(cpu[v]):.1f}" for v in a.variants))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
        print(
            lines[-1],
            f"  ({time.perf_counter() - t0:.0f} s;",
            "; ".join(f"{k}: {np.round(v, 1).tolist()}" for k, v in errs.items()) + ")",
            flush=True,
        )
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
