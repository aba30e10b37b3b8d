"""Pool-scoring throughput and peak memory for 10^4, 10^5 and 10^6 synthetic 28x28 images.

Usage::

    python benchmarks/bench_pool_scale.py [--sizes 10000 100000 1000000] [--T 20]
        [--block-size 256] [--batch-size 256] [--workers 0] [--out benchmarks/results/pool_scale.md]

Each size runs in a fresh subprocess, so its peak RSS is its own: ``baseline`` is the process'
resident memory after importing torch and fastbald and building the paper's CNN (before any
forward pass), ``peak`` its high-water mark (VmHWM) over the whole run, DataLoader workers
(``--workers``) excluded. The pool is :class:`fastbald.pool.SyntheticPool` (images generated on
the fly, deterministically), scored with :func:`fastbald.score_pool` (BALD, top-10). Writes the
numbers to ``--out`` (JSON) and the markdown table, rendered from them, beside it (``.md``) and to
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this checkout's fastbald

from fastbald.benchtools import machine_info, proc_status_mb, write_results  # noqa: E402


def _rss_mb(field: str) -> float:
    mb = proc_status_mb(field)
    if mb is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return mb


def child(n: int, T: int, block_size: int, batch_size: int, workers: int, threads: int) -> None:
    """Score one pool of n images; print one JSON line of measurements."""
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="fastbald: using the pure-PyTorch backend")
    import fastbald
    from fastbald.models import BayesianCNN
    from fastbald.pool import SyntheticPool, score_pool

    torch.manual_seed(0)
    model = BayesianCNN()
    baseline = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    r = score_pool(model, SyntheticPool(n), T=T, k=10, batch_size=batch_size,
                   block_size=block_size, num_workers=workers, progress=False)
    wall = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    print(json.dumps({
        "n": n, "T": T, "wall_s": wall, "images_per_s": n / wall,
        "baseline_mb": baseline, "peak_mb": peak,
        "delta_mb": peak - baseline, "threads": torch.get_num_threads(),
        "backend": fastbald.backends().get("cpu-native", "?"),
        "top1": int(r.topk[0]), "bald_mean": float(r.scores.double().mean()),
    }))


def to_markdown(res: dict) -> str:
    """The table of a result (benchmarks/results/pool_scale.json)."""
    a, m, rows = res["args"], res["machine"], res["rows"]
    lines = [
        "# Pool scoring at scale (synthetic 1x28x28 pool, paper CNN)",
        "",
        f"`{res['command']}`",
        "",
        f"score_pool(BayesianCNN(), SyntheticPool(n), T={a['T']}, method='bald', k=10): trunk "
        f"once + head T times, fused scores, running top-k; {a['workers']} DataLoader workers; "
        f"torch {m['torch']}, {rows[0]['threads']} threads, {m['cpu']}; scoring "
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pool_scale.json"),
                    help="the data file (.json); the table goes beside it (.md)")
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
    command = (f"python benchmarks/bench_pool_scale.py --sizes {' '.join(map(str, args.sizes))} "
               f"--T {args.T} --block-size {args.block_size} --batch-size {args.batch_size} "
               f"--workers {args.workers}")
    res = dict(benchmark="pool_scale", command=command, machine=machine_info(args.threads or None),
               args=dict(sizes=args.sizes, T=args.T, block_size=args.block_size,
                         batch_size=args.batch_size, workers=args.workers, threads=args.threads),
               rows=rows)
    if args.out:
        print(write_results(res, args.out, to_markdown))
    else:
        print(to_markdown(res))


if __name__ == "__main__":
    main()
