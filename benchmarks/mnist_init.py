"""Does the paper CNN learn faster from a few MNIST labels with Keras 1's initialisation?

fastbald's :class:`~fastbald.models.BayesianCNN` uses PyTorch's default initialisation
(Kaiming-uniform with ``a=sqrt(5)``, uniform biases); the authors' Keras 1 code got Glorot-uniform
weights and zero biases. This script trains the model exactly as one round of ``fastbald
experiment mnist`` does (:func:`fastbald.loop.train_from_scratch`: 50 epochs of Adam, batch 128,
L2 ``3.5 / N`` on the dense layer) on random labelled sets of ``n`` images (2 per class, then
uniformly random: what Random acquisition sees after ``n - 20`` acquisitions) and prints the test
error (the official 10,000 test images) for both initialisations, on the same labelled set and
training seed per repeat, so the per-repeat difference is paired.

    python benchmarks/mnist_init.py --n 20 70 120 170 270 420 --repeats 6 [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


FACTORIES = {"torch": default_model_factory, "keras": keras_init_factory}


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
    ap.add_argument("--init", nargs="+", choices=sorted(FACTORIES), default=["torch", "keras"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    a = ap.parse_args(argv)
    if min(a.n) < 20 or a.repeats < 2:
        ap.error("--n must be >= 20 and --repeats >= 2")
    torch.set_num_threads(a.threads)
    d = load_mnist()
    lines = [
        "| labelled n | "
        + " | ".join(f"{i} init: test error % (mean ± sd)" for i in a.init)
        + (" | torch - keras, paired (mean ± sd) |" if a.init == ["torch", "keras"] else " |"),
        "|---" * (len(a.init) + 1 + (a.init == ["torch", "keras"])) + "|",
    ]
    print(lines[0], lines[1], sep="\n", flush=True)
    for n in a.n:
        errs: dict[str, list[float]] = {i: [] for i in a.init}
        t0 = time.perf_counter()
        for rep in range(a.repeats):
            idx = labelled_set(d.y_train, n, rep)
            p = LoopProtocol(acquisition="random", seed=rep)
            for init in a.init:
                model, _ = train_from_scratch(
                    FACTORIES[init], p, d.num_classes, d.x_train[idx], d.y_train[idx], 1
                )
                errs[init].append(100 * _error_rate(model, d.x_test, d.y_test))
        cells = [f"{np.mean(e):.2f} ± {np.std(e, ddof=1):.2f}" for e in errs.values()]
        if a.init == ["torch", "keras"]:
            diff = np.array(errs["torch"]) - np.array(errs["keras"])
            cells.append(f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f}")
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
