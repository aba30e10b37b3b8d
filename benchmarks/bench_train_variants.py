"""Training-step variants of the paper's CNN (1 thread, CPU seconds per Adam step, batch 128):
eager, eager + fused Adam, torch.compile, both. Interleaved repeats, median; prints ratios to eager.

    python benchmarks/bench_train_variants.py [--repeats 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastbald.models import BayesianCNN


def make_step(x: torch.Tensor, y: torch.Tensor, compiled: bool, fused: bool) -> Callable[[int], None]:
    """One Adam step on minibatch ``i`` (128 images) of a freshly initialised BayesianCNN."""
    torch.manual_seed(0)
    model = BayesianCNN().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    f = torch.compile(model) if compiled else model

    def step(i: int) -> None:
        s = i * 128 % (x.shape[0] - 128)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(f(x[s : s + 128]), y[s : s + 128])
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1020, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (1020,), generator=g)
    variants = {
        "eager": make_step(x, y, False, False),
        "eager + Adam(fused=True)": make_step(x, y, False, True),
        "torch.compile": make_step(x, y, True, False),
        "torch.compile + Adam(fused=True)": make_step(x, y, True, True),
    }
    for name, step in variants.items():
        c0 = time.process_time()
        step(0)
        step(1)
        print(f"{name}: warm-up (compile) {time.process_time() - c0:.1f} CPU s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            c0 = time.process_time()
            for i in range(args.steps):
                step(i)
            times[name].append((time.process_time() - c0) / args.steps)
    base = statistics.median(times["eager"])
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{name:34s} {m * 1000:7.1f} CPU ms/step  {base / m:.2f}x")


if __name__ == "__main__":
    main()
