"""CPU benchmark of the fused scoring op (issue 2): speed, accuracy, memory.

Everything is measured side by side in one run, as the median of repeats, and reported as ratios
(this machine is shared and noisy):

* floors: one read pass over x (``x.sum()``) and the machine's exp throughput (``torch.exp``);
* fastbald's CPU kernel (all seven outputs), its torch backend, and a straightforward PyTorch
  computation of BALD alone (log_softmax, exp, mean, entropies);
* accuracy of every output against float64, float32 input, logit scales 0.01..50, C up to 10,000;
* peak extra memory (RSS) of the kernel, in a fresh subprocess per size;
* the same kernel when its input sits in the L2 cache (the arithmetic alone, no DRAM traffic), in
  ns per logit per thread, which splits the time into compute and memory;
* every CPU build this machine can run (AVX-512, AVX2, portable), each in a fresh process with
  FASTBALD_CPU_KERNEL set (what a CPU without AVX-512 or AVX2 gets), against x.sum() in that process;
  with ``--baseline DIR`` (a copy of an earlier build's ``fastbald/_cpu_*.so``), that build too,
  the two interleaved, and the ratio of their times: the side-by-side check of a kernel change.

The numbers go to ``--out`` as JSON (``scores_cpu.json``) and the tables are rendered from it
(``scores_cpu.md``; ``python -m fastbald.benchtools render`` redoes them without a run).

Usage: python benchmarks/bench_scores.py [--quick] [--parts speed,builds,accuracy,memory]
           [--baseline DIR] [--out benchmarks/results/scores_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import fastbald
from fastbald import _ops
from fastbald.bench import naive_bald
from fastbald.benchtools import machine_info, median_time, write_results
from fastbald.reference import METRICS, reference_scores
from fastbald.scores import pool_scores_op


def speed(sizes, repeats: int) -> list[dict]:
    rows = []
    for N, T, C in sizes:
        x = torch.randn(N, T, C) * 3
        gb = x.numel() * 4 / 1e9
        y = torch.empty_like(x)
        t_sum = median_time(lambda: x.sum(), repeats)
        t_exp = median_time(lambda: torch.exp(x, out=y), repeats)
        t_fb = median_time(lambda: pool_scores_op(x), repeats)
        t_fb_bald = median_time(lambda: pool_scores_op(x, metrics=["bald"]), repeats)
        t_naive = median_time(lambda: naive_bald(x), max(3, repeats // 2))
        # The arithmetic alone: a slice that fits in L2, called many times, one thread.
        n_small = max(16, (1 << 20) // (T * C * 4))
        xs = x[:n_small].clone()
        inner = max(1, 20_000_000 // xs.numel())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t_small = median_time(
                lambda: [pool_scores_op(xs) for _ in range(inner)],
                repeats)
            t_fb_1t = median_time(lambda: pool_scores_op(x), repeats)
        finally:
            torch.set_num_threads(threads)
        t_torch = median_time(lambda: fastbald.scores(x, backend="torch"), max(3, repeats // 2))
        rows.append(
            dict(N=N, T=T, C=C, gb=gb, sum_ms=t_sum * 1e3, exp_ms=t_exp * 1e3,
                 fastbald_ms=t_fb * 1e3, fastbald_bald_only_ms=t_fb_bald * 1e3,
                 naive_bald_ms=t_naive * 1e3, torch_backend_ms=t_torch * 1e3,
                 incache_ns_per_logit=t_small / inner / xs.numel() * 1e9,
                 one_thread_ns_per_logit=t_fb_1t / x.numel() * 1e9,
                 read_gbps=gb / t_sum, exp_gps=x.numel() / t_exp / 1e9)
        )
        r = rows[-1]
        print(f"  ({N}, {T}, {C}): sum {r['sum_ms']:.1f} ms, fastbald {r['fastbald_ms']:.1f} ms "
              f"({r['fastbald_ms'] / r['sum_ms']:.2f}x sum), naive BALD {r['naive_bald_ms']:.1f} ms "
              f"({r['naive_bald_ms'] / r['fastbald_ms']:.1f}x slower)", flush=True)
    return rows


def accuracy() -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for C, N, T in [(2, 2000, 20), (10, 2000, 20), (100, 500, 20), (1000, 100, 20), (10000, 20, 10)]:
        for scale in (0.01, 0.1, 1.0, 10.0, 50.0):
            x = torch.randn(N, T, C, generator=g) * scale
            out = pool_scores_op(x).double()
            ref = reference_scores(x.double(), dtype=torch.float64)
            err = (out - ref).abs().max(1).values
            rows.append(dict(C=C, scale=scale, **{m: float(e) for m, e in zip(METRICS, err, strict=True)},
                             neg_bald=int((out[METRICS.index("bald")] < 0).sum())))
        # All samples equal: BALD must be ~0.
        one = torch.randn(N, 1, C, generator=g) * 5
        b = pool_scores_op(one.expand(N, T, C), metrics=["bald"])[METRICS.index("bald")]
        rows[-1]["bald_equal_samples"] = float(b.abs().max())
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(2000, 20, 10, generator=g) * 3).to(dtype)
        out = pool_scores_op(x, prob_tol=1e-2).double()
        ref = reference_scores(x.double(), dtype=torch.float64)
        err = (out - ref).abs().max(1).values
        rows.append(dict(C=10, scale=3.0, dtype=str(dtype), **{m: float(e) for m, e in zip(METRICS, err, strict=True)}))
    return rows


_MEM_CHILD = """
import sys, torch
from fastbald import _ops
from fastbald.benchtools import PeakRSS
from fastbald.scores import pool_scores_op
_ops.load()
N, T, C = map(int, sys.argv[1:4])
x = torch.empty(N, T, C)
x.normal_()  # in place: no temporary
pool_scores_op(x[:64])
with PeakRSS() as mem:  # peak RSS above the RSS just before the call
    out = pool_scores_op(x)
    out.fill_(0)  # touch every page of the output
print(mem.extra_mb, out.numel() * 4 / 2**20)
"""


def memory(sizes) -> list[dict]:
    rows = []
    for N, T, C in sizes:
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(N), str(T), str(C)],
                             capture_output=True, text=True, check=True)
        extra, out_mb = map(float, res.stdout.split())
        rows.append(dict(N=N, T=T, C=C, input_mb=N * T * C * 4 / 2**20, peak_extra_mb=extra,
                         output_mb=out_mb))
    return rows


_BUILD_CHILD = r"""
import statistics, sys, torch, fastbald
from fastbald import _ops
from fastbald.benchtools import median_time
from fastbald.scores import pool_scores_op
N, T, C, repeats = map(int, sys.argv[1:5])
if len(sys.argv) > 5:  # the extension files of another build (--baseline) come first
    fastbald.__path__.insert(0, sys.argv[5])
kernel = _ops.load()["cpu"]
lib = sys.modules[f"fastbald._cpu_{kernel}"].__file__
assert len(sys.argv) == 5 or lib.startswith(sys.argv[5]), lib
x = torch.randn(N, T, C) * 3
ratios, sums, fbs = [], [], []
for _ in range(3):  # interleaved, so both see the same machine load
    s = median_time(lambda: x.sum(), repeats); f = median_time(lambda: pool_scores_op(x), repeats)
    sums.append(s); fbs.append(f); ratios.append(f / s)
print(kernel, statistics.median(sums), statistics.median(fbs), statistics.median(ratios))
"""


def _build_child(variant: str, size, repeats: int, lib_dir: str | None) -> dict:
    env = dict(os.environ, FASTBALD_CPU_KERNEL=variant)
    extra = [os.path.abspath(lib_dir)] if lib_dir else []
    res = subprocess.run([sys.executable, "-c", _BUILD_CHILD, *map(str, size), str(repeats), *extra],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return dict(kernel=variant, error=res.stderr.strip().splitlines()[-1])
    name, t_sum, t_fb, ratio = res.stdout.split()
    return dict(kernel=name, N=size[0], T=size[1], C=size[2], sum_ms=float(t_sum) * 1e3,
                fastbald_ms=float(t_fb) * 1e3, ratio=float(ratio))


def builds(size, repeats: int, baseline: str | None = None, rounds: int = 3,
           kernels: list[str] | None = None) -> list[dict]:
    """Each CPU build this machine can run, in a fresh process, against x.sum() in that process.
    With ``baseline`` (a directory with another build's fastbald/_cpu_*.so files): that build as well,
    ``rounds`` times, this build and the baseline alternating (each round swaps who goes first);
    the row then holds the medians over the rounds and ``vs_baseline`` = this build's × sum over
    the baseline's (< 1: faster)."""
    cap = torch.backends.cpu.get_cpu_capability()
    runnable = {"AVX512": ["avx512", "avx2", "base"], "AVX2": ["avx2", "base"]}.get(cap, ["base"])
    rows = []
    for variant in [k for k in runnable if kernels is None or k in kernels]:
        if baseline is None:
            row = _build_child(variant, size, repeats, None)
        else:
            runs: dict[str, list[dict]] = {"this": [], "baseline": []}
            for r in range(rounds):
                for who in (("this", "baseline") if r % 2 == 0 else ("baseline", "this")):
                    runs[who].append(_build_child(variant, size, repeats, baseline if who == "baseline" else None))
            bad = [x for xs in runs.values() for x in xs if "error" in x]
            if bad:
                rows.append(bad[0])
                continue
            med = {who: {k: statistics.median(x[k] for x in xs) for k in ("sum_ms", "fastbald_ms", "ratio")}
                   for who, xs in runs.items()}
            row = dict(runs["this"][0], **med["this"], rounds=rounds,
                       baseline_fastbald_ms=med["baseline"]["fastbald_ms"],
                       baseline_ratio=med["baseline"]["ratio"],
                       vs_baseline=med["this"]["ratio"] / med["baseline"]["ratio"])
        rows.append(row)
        if "error" in row:
            print(f"  {variant}: failed: {row['error']}", flush=True)
            continue
        print(f"  {row['kernel']}: {row['fastbald_ms']:.1f} ms, {row['ratio']:.2f}x sum"
              + (f"; baseline {row['baseline_ratio']:.2f}x sum, this / baseline {row['vs_baseline']:.3f}"
                 if "vs_baseline" in row else ""), flush=True)
    return rows


def to_markdown(res: dict) -> str:
    m = res["machine"]
    load = (f", 1-min load average {m['load_average']} at the start (shared machine)"
            if m.get("load_average") is not None else "")
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), "
        f"kernel `{m['kernel']}` (CPU capability {m['capability']}){load}. Command: `{res['command']}`.",
        "",
        "### Speed (median of repeats; float32 logits, all seven outputs)",
        "",
        "| N, T, C | x.sum() (read floor) | torch.exp(x) | fastbald, 7 outputs | × sum | fastbald, BALD only "
        "| naive PyTorch BALD | naive / fastbald | fastbald torch backend | 1 thread, ns/logit "
        "| same, input in L2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["speed"]:
        lines.append(
            f"| {r['N']:,}, {r['T']}, {r['C']} | {r['sum_ms']:.1f} ms ({r['read_gbps']:.1f} GB/s) "
            f"| {r['exp_ms']:.1f} ms ({r['exp_gps']:.2f} G exp/s) | {r['fastbald_ms']:.1f} ms "
            f"| {r['fastbald_ms'] / r['sum_ms']:.2f}× | {r['fastbald_bald_only_ms']:.1f} ms "
            f"| {r['naive_bald_ms']:.1f} ms | **{r['naive_bald_ms'] / r['fastbald_ms']:.1f}×** "
            f"| {r['torch_backend_ms']:.1f} ms | {r.get('one_thread_ns_per_logit', float('nan')):.3f} "
            f"| {r.get('incache_ns_per_logit', float('nan')):.3f} |"
        )
    if res.get("builds"):
        lines += ["", "### Every CPU build on this machine (fresh process each, all seven outputs)", "",
                  "| build | N, T, C | x.sum() | fastbald | × sum (median of 3 interleaved) |",
                  "|---|---|---|---|---|"]
        for r in res["builds"]:
            if "error" in r:
                lines.append(f"| {r['kernel']} | | | failed: {r['error']} | |")
            else:
                lines.append(f"| `{r['kernel']}` | {r['N']:,}, {r['T']}, {r['C']} | {r['sum_ms']:.1f} ms "
                             f"| {r['fastbald_ms']:.1f} ms | {r['ratio']:.2f}× |")
        with_base = [r for r in res["builds"] if "vs_baseline" in r]
        if with_base:
            lines += ["", f"Against the baseline build `{res.get('baseline')}` (the two alternating, "
                      f"{with_base[0]['rounds']} rounds, medians over the rounds):", "",
                      "| build | this: × sum | baseline: × sum | this / baseline | this | baseline |",
                      "|---|---|---|---|---|---|"]
            for r in with_base:
                lines.append(f"| `{r['kernel']}` | {r['ratio']:.2f}× | {r['baseline_ratio']:.2f}× "
                             f"| **{r['vs_baseline']:.3f}** | {r['fastbald_ms']:.1f} ms "
                             f"| {r['baseline_fastbald_ms']:.1f} ms |")
    lines += ["", "### Accuracy: max abs error vs float64 (nats)", "",
              "| C | logit scale | dtype | " + " | ".join(METRICS) + " | BALD < 0 | BALD, equal samples |",
              "|---|---|---|" + "---|" * (len(METRICS) + 2)]
    for r in res["accuracy"]:
        lines.append(
            f"| {r['C']} | {r['scale']} | {r.get('dtype', 'torch.float32')} | "
            + " | ".join(f"{r[mm]:.1e}" for mm in METRICS)
            + f" | {r.get('neg_bald', '')} | {r.get('bald_equal_samples', '') and format(r['bald_equal_samples'], '.1e')} |"
        )
    lines += ["", "### Peak extra memory of one call (RSS, fresh process per size)", "",
              "| N, T, C | input | peak extra | output [7, N] |", "|---|---|---|---|"]
    for r in res["memory"]:
        lines.append(f"| {r['N']:,}, {r['T']}, {r['C']} | {r['input_mb']:.0f} MB | "
                     f"{r['peak_extra_mb']:.1f} MB | {r['output_mb']:.1f} MB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI smoke)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/scores_cpu.json",
                   help="the data file (.json); the tables go beside it (.md)")
    p.add_argument("--parts", default="speed,builds,accuracy,memory",
                   help="comma-separated subset of speed,builds,accuracy,memory to run")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="a directory with another build's CPU kernels (fastbald/_cpu_*.so copied "
                   "there before a change): the builds part runs it too, side by side")
    p.add_argument("--rounds", type=int, default=3, help="with --baseline: alternations per build")
    p.add_argument("--kernels", default=None,
                   help="builds part: comma-separated subset of avx512,avx2,base (default: all this CPU runs)")
    args = p.parse_args(argv)
    if not _ops.native_available(torch.device("cpu")):
        print("the native CPU kernel is not built: run `make build`", file=sys.stderr)
        return 1
    if args.quick:
        sizes, mem_sizes, repeats = [(20_000, 20, 10), (2_000, 20, 100)], [(20_000, 20, 10)], 3
    else:
        sizes = [(1_000_000, 20, 10), (100_000, 20, 100), (10_000, 50, 1000)]
        mem_sizes = [(100_000, 20, 10), (1_000_000, 20, 10), (100_000, 20, 100), (10_000, 50, 1000)]
        repeats = args.repeats
    cmd = "python benchmarks/bench_scores.py " + " ".join(sys.argv[1:] if argv is None else argv)
    parts = set(args.parts.split(","))
    if args.baseline is not None and not list(Path(args.baseline).glob("_cpu_*.so")):
        p.error(f"--baseline {args.baseline}: no _cpu_*.so files there")
    res = dict(benchmark="scores_cpu", machine=machine_info(), command=cmd.strip(),
               baseline=args.baseline, speed=[], builds=[], accuracy=[], memory=[])
    if "speed" in parts:
        print("speed:", flush=True)
        res["speed"] = speed(sizes, repeats)
    if "builds" in parts:
        print("CPU builds:", flush=True)
        res["builds"] = builds(sizes[0], repeats, args.baseline, args.rounds,
                               args.kernels.split(",") if args.kernels else None)
    if "accuracy" in parts:
        print("accuracy...", flush=True)
        res["accuracy"] = accuracy()
    if "memory" in parts:
        print("memory...", flush=True)
        res["memory"] = memory(mem_sizes)
    out = Path(args.out).with_suffix(".json")
    print(write_results(res, out, to_markdown))
    print(f"written {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
