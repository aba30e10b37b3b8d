"""Trunk once + head T times vs T full passes, on the paper's CNN (1x28x28 input, T=20).

Usage::

    python benchmarks/bench_mc.py [--T 20] [--items 256] [--batch 64] [--repeats 7]

Times, for the same images, the median over ``--repeats`` rounds (after one warm-up; the methods
interleaved within each round, so load changes on a shared machine hit all alike) of:

* ``baal-style repeat``: the batch repeated T times through the whole network in train mode with
  torch's own dropout (what baal's MC-dropout wrapper does);
* ``fastbald, T full passes``: ``mc_logits(model, x, T, trunk_head=False)`` (fastbald's masks, no
  split);
* ``fastbald, trunk once + head T``: ``mc_logits(model, x, T)`` (the model's ``split()``);
* ``score_pool`` end to end (trunk/head + fused scores + top-k), for reference.

Prints a markdown table with images/s and the speedup over the baal-style repeat.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbald.mc import mc_logits  # noqa: E402
from fastbald.models import BayesianCNN  # noqa: E402
from fastbald.pool import SyntheticPool, score_pool  # noqa: E402


def _interleaved_times(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times of each function, ``repeats`` rounds, the functions interleaved within each
    round (so that a change in the machine's load hits all of them alike); one warm-up each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--items", type=int, default=256, help="images per timed run")
    ap.add_argument("--batch", type=int, default=64, help="items per forward call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="fastbald: using the pure-PyTorch backend")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BayesianCNN().eval()
    x = torch.stack(SyntheticPool(args.items).__getitems__(range(args.items)))
    T, B = args.T, args.batch

    def baal_style() -> None:
        model.train()
        with torch.no_grad():
            for s in range(0, len(x), B):
                xb = x[s : s + B]
                model(xb.repeat_interleave(T, 0)).reshape(xb.shape[0], T, -1)
        model.eval()

    def full() -> None:
        for s in range(0, len(x), B):
            mc_logits(model, x[s : s + B], T, seed=0, trunk_head=False)

    def split() -> None:
        for s in range(0, len(x), B):
            mc_logits(model, x[s : s + B], T, seed=0)

    def pool() -> None:
        score_pool(model, x, T=T, k=10, block_size=B, progress=False)

    # Same masks, same numbers: the split changes the cost, not the result.
    same = torch.equal(mc_logits(model, x[:B], T, seed=0),
                       mc_logits(model, x[:B], T, seed=0, trunk_head=False))
    rows = [
        ("baal-style repeat (train-mode dropout, T full passes)", baal_style),
        ("fastbald mc_logits, T full passes (trunk_head=False)", full),
        ("fastbald mc_logits, trunk once + head T times", split),
        ("fastbald score_pool (trunk/head + fused scores + top-k)", pool),
    ]
    times = _interleaved_times([fn for _, fn in rows], args.repeats)
    results = [(name, statistics.median(ts), ts) for (name, _), ts in zip(rows, times, strict=True)]
    base = results[0][1]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# MC dropout on the paper's CNN: T={T}, {args.items} images of 1x28x28, "
          f"{B} items per forward, median of {args.repeats} interleaved runs")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print(f"trunk/head logits bit-identical to T full passes with the same masks: {same}\n")
    print("| method | median time (s) | images/s (median) | min time (s) | "
          "speedup vs baal-style (median of per-round ratios) | runs (s) |")
    print("|---|---:|---:|---:|---:|---|")
    base_ts = times[0]
    for name, med, ts in results:
        ratio = statistics.median(b / t for b, t in zip(base_ts, ts, strict=True))
        print(f"| {name} | {med:.3f} | {args.items / med:,.0f} | {min(ts):.3f} | {ratio:.1f}x | "
              + ", ".join(f"{t:.3f}" for t in ts) + " |")
    per_round = statistics.median(f / s for f, s in zip(times[1], times[2], strict=True))
    per_round_baal = statistics.median(f / s for f, s in zip(times[0], times[2], strict=True))
    print(f"\nspeedup of trunk once + head T over T full passes (median of per-round ratios): "
          f"{per_round:.1f}x vs fastbald's own full passes, {per_round_baal:.1f}x vs the "
          f"baal-style repeat; from the medians: {results[1][1] / results[2][1]:.1f}x and "
          f"{base / results[2][1]:.1f}x; from the minimum times: "
          f"{min(times[1]) / min(times[2]):.1f}x and {min(times[0]) / min(times[2]):.1f}x")


if __name__ == "__main__":
    main()
