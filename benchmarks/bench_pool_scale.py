"""Pool-scoring throughput and peak memory for 10^4, 10^5 and 10^6 synthetic 28x28 images.

Usage::

    python benchmarks/bench_pool_scale.py [--sizes 10000 100000 1000000] [--T 20]
        [--block-size 256] [--batch-size 256] [--workers 0] [--out benchmarks/results/pool_scale.md]

Each size runs in a fresh subprocess, so its peak RSS is its own: ``baseline`` is the process'
resident memory after importing torch and fastbald and building the paper's CNN (before any
forward pass), ``peak`` its high-water mark (VmHWM) over the whole run, DataLoader workers
(``--workers``) excluded. The pool is :class:`fastbald.pool.SyntheticPool` (images generated on
the fly, deterministically), scored with :func:`fastbald.score_pool` (BALD, top-10). Writes a
markdown table to stdout and, atomically, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from fastbald._io import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(n: int, T: int, block_size: int, batch_size: int, workers: int, threads: int) -> None:
    """Score one pool of n images; print one JSON line of measurements."""
    import warnings

    sys.path.insert(0, ROOT)
    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="fastbald: using the pure-PyTorch backend")
    import fastbald
    from fastbald.models import BayesianCNN
    from fastbald.pool import SyntheticPool, score_pool

    torch.manual_seed(0)
    model = BayesianCNN()
    baseline = _status_kb("VmRSS")
    t0 = time.perf_counter()
    r = score_pool(model, SyntheticPool(n), T=T, k=10, batch_size=batch_size,
                   block_size=block_size, num_workers=workers, progress=False)
    wall = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({
        "n": n, "T": T, "wall_s": wall, "images_per_s": n / wall,
        "baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
        "delta_mb": (peak - baseline) / 1024, "threads": torch.get_num_threads(),
        "backend": fastbald.backends().get("cpu-native", "?"),
        "top1": int(r.topk[0]), "bald_mean": float(r.scores.double().mean()),
    }))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _write_atomic(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pool_scale.md"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child, args.T, args.block_size, args.batch_size, args.workers, args.threads)
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--T", str(args.T),
               "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"n={n:,}: {row['images_per_s']:,.0f} images/s, peak RSS {row['peak_mb']:.0f} MB "
              f"(baseline {row['baseline_mb']:.0f} MB, +{row['delta_mb']:.0f} MB)", file=sys.stderr)
    import torch

    lines = [
        "# Pool scoring at scale (synthetic 1x28x28 pool, paper CNN)",
        "",
        f"`python benchmarks/bench_pool_scale.py --sizes {' '.join(map(str, args.sizes))} "
        f"--T {args.T} --block-size {args.block_size} --batch-size {args.batch_size} "
        f"--workers {args.workers}`",
        "",
        f"score_pool(BayesianCNN(), SyntheticPool(n), T={args.T}, method='bald', k=10): trunk "
        f"once + head T times, fused scores, running top-k; {args.workers} DataLoader workers; "
        f"torch {torch.__version__}, {rows[0]['threads']} threads, {_cpu_name()}; scoring "
        f"backend: {rows[0]['backend']}. Each size in a fresh process; baseline = RSS after "
        "imports and model construction, peak = VmHWM of the whole run.",
        "",
        "| pool size | wall time (s) | images/s | baseline RSS (MB) | peak RSS (MB) | "
        "peak - baseline (MB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['wall_s']:.1f} | {r['images_per_s']:,.0f} | "
            f"{r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        _write_atomic(args.out, text)


if __name__ == "__main__":
    main()
