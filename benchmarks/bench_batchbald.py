"""BatchBALD: fastbald.batchbald_batch against batchbald_redux's get_batchbald_batch and baal's
BatchBALD heuristic, side by side in one run.

Pool: ``fastbald.bench.make_logits(N, K, C, seed=0)`` (MC-dropout-like logits: item means plus
per-sample noise of a log-uniform scale), ``log_softmax`` in float32; batch ``b``, ``M`` =
``num_samples`` (batchbald_redux) = ``K * num_draw`` (baal). Every measurement runs in a fresh
subprocess with ``torch.set_num_threads(t)`` (and ``OMP_NUM_THREADS=t`` for numpy), its peak extra
resident memory is VmHWM (reset through /proc/self/clear_refs just before the call) minus VmRSS.

What is timed:

* ``fastbald``: ``batchbald_batch(lp, b, M)`` (lazy greedy, float32 inner products) on the whole
  pool, median of ``--repeats``;
* ``fastbald (lazy=False)``: every candidate evaluated at every step, as the peers do;
* ``batchbald_redux``: ``get_batchbald_batch(lp, b, M)`` (float32);
* ``baal``: ``BatchBALD(b, num_draw=M // K).compute_score(probs[N, C, K])`` (float64 numpy).

The last three cost ~N per greedy step and are too slow for the whole pool here: each is run on
pools of n1 and n2 items (same generator and seed) and its time at N is EXTRAPOLATED by the line through
the two points (marked "extrapolated" in the table, with the sizes). baal's BatchBALD materialises
``exp_y = selected @ predictions`` as [N, M, C] float64, so at the full pool it cannot run at all
on this machine: the table gives the memory that array alone needs.

Usage::

    python benchmarks/bench_batchbald.py [--configs 60000x100x10,1000000x20x10] [--threads 1,2]
        [--repeats 3] [--no-peers] [--out benchmarks/results/batchbald.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_TAG = "FASTBALD_BB_RESULT "
ROOT = Path(__file__).resolve().parents[1]

# (N, K, C) -> subset sizes (n1, n2) for the methods timed on subsets
SUBSETS = {
    "fastbald_full": {100: (512, 1024), 20: (2048, 4096)},
    "redux": {100: (512, 1024), 20: (1024, 2048)},
    "baal": {100: (256, 512), 20: (256, 512)},
}
DISPLAY = {
    "fastbald": "fastbald",
    "fastbald_full": "fastbald (lazy=False)",
    "redux": "batchbald_redux",
    "baal": "baal BatchBALD",
}

_CHILD = r"""
import json, os, statistics, sys, time
import torch
method, N, K, C, b, M, threads, repeats = sys.argv[1], *map(int, sys.argv[2:9])
torch.set_num_threads(threads)
from fastbald.bench import make_logits
from fastbald.benchtools import PeakRSS
lp = torch.log_softmax(make_logits(N, K, C, 0), -1)
out = {}
if method in ("fastbald", "fastbald_full"):
    from fastbald.batchbald import batchbald_batch
    def run():
        r = batchbald_batch(lp, b, M, lazy=method == "fastbald")
        out.update(indices=r.indices.tolist(), scores=r.scores.tolist(), evaluated=r.num_evaluated.tolist())
    batchbald_batch(lp[:256], 2, M)  # warm-up (library loading)
elif method == "redux":
    os.environ["TQDM_DISABLE"] = "1"
    from batchbald_redux.batchbald import get_batchbald_batch
    def run():
        r = get_batchbald_batch(lp, b, M)
        out.update(indices=list(r.indices), scores=list(r.scores))
elif method == "baal":
    from baal.active.heuristics import BatchBALD
    probs = lp.exp().permute(0, 2, 1).contiguous().double().numpy()  # [N, C, K], as baal wants
    def run():
        s = BatchBALD(b, num_draw=M // K).compute_score(probs)
        out.update(indices=[int(i) for i in s.argsort()[::-1][:b]])
times, peaks = [], []
for _ in range(repeats):
    with PeakRSS() as mem:
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    peaks.append(mem.extra_mb)
print("%s%s" % (sys.argv[9], json.dumps(dict(out, times=times, time_s=statistics.median(times), peak_extra_mb=max(p or 0 for p in peaks)))))
"""


def child(method: str, N: int, K: int, C: int, b: int, M: int, threads: int, repeats: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    args = [sys.executable, "-c", _CHILD, method, str(N), str(K), str(C), str(b), str(M), str(threads),
            str(repeats), _TAG]
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG):])
    raise RuntimeError(f"{method} N={N} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def measure(N: int, K: int, C: int, b: int, M: int, threads: list[int], repeats: int, peers: bool) -> dict:
    rows = []
    methods = ["fastbald", "fastbald_full"] + (["redux", "baal"] if peers else [])
    for t in threads:
        for m in methods:
            t0 = time.time()
            if m == "fastbald":
                r = child(m, N, K, C, b, M, t, repeats)
                row = dict(method=m, threads=t, time_s=r["time_s"], times=r["times"], extrapolated=False,
                           peak_extra_mb=r["peak_extra_mb"], evaluated=r["evaluated"], indices=r["indices"],
                           scores=r["scores"])
            else:
                n1, n2 = SUBSETS[m].get(K, (1024, 2048))
                r1 = child(m, n1, K, C, b, M, t, 1)
                r2 = child(m, n2, K, C, b, M, t, 1)
                slope = (r2["time_s"] - r1["time_s"]) / (n2 - n1)
                est = r2["time_s"] + slope * (N - n2)
                row = dict(method=m, threads=t, time_s=est, extrapolated=True, subset_sizes=[n1, n2],
                           subset_times=[r1["time_s"], r2["time_s"]], peak_extra_mb_at_n2=r2["peak_extra_mb"])
                if m == "baal":
                    row["exp_y_gb"] = N * M * C * 8 / 1e9
            print(f"  {DISPLAY[m]:24s} threads={t} {row['time_s']:10.3f} s"
                  f"{' (extrapolated)' if row['extrapolated'] else ''}  [{time.time() - t0:.0f} s]", flush=True)
            rows.append(row)
    return dict(N=N, K=K, C=C, b=b, M=M, rows=rows)


def to_markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "# BatchBALD: fastbald vs batchbald_redux and baal",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average at the start "
        f"{m['load_average']}; {res['date']}. Command: `{res['command']}`.",
        "",
        "Pool: `fastbald.bench.make_logits(N, K, C, 0)`, log_softmax float32. fastbald: "
        "`batchbald_batch(lp, b, M)` (lazy greedy, float32 inner products), median of repeats. Rows "
        "marked *extrapolated* ran on pools of n1 and n2 items (same generator; one run each) and give "
        "the line through those two times at N. Peak extra memory: VmHWM - VmRSS of the call "
        "(fresh process); for the extrapolated rows it is measured at n2.",
        "",
    ]
    for cfg in res["configs"]:
        N, K, C, b, M = cfg["N"], cfg["K"], cfg["C"], cfg["b"], cfg["M"]
        out += [f"## N = {N:,}, K = {K}, C = {C}, b = {b}, M = {M:,}", "",
                "| method | threads | time (s) | how | peak extra MB | fastbald speed-up |",
                "|---|---:|---:|---|---:|---:|"]
        fb = {r["threads"]: r["time_s"] for r in cfg["rows"] if r["method"] == "fastbald"}
        for r in cfg["rows"]:
            if r["extrapolated"]:
                how = (f"extrapolated from n = {r['subset_sizes'][0]:,} ({r['subset_times'][0]:.2f} s) and "
                       f"{r['subset_sizes'][1]:,} ({r['subset_times'][1]:.2f} s)")
                if "exp_y_gb" in r:
                    how += f"; cannot run at N: exp_y [N, M, C] float64 alone is {r['exp_y_gb']:.0f} GB"
                mem = r["peak_extra_mb_at_n2"]
            else:
                how = f"measured, median of {len(r['times'])}; evaluated per step {r['evaluated']}"
                mem = r["peak_extra_mb"]
            sp = "" if r["method"] == "fastbald" else f"{r['time_s'] / fb[r['threads']]:.0f}x"
            out.append(f"| {DISPLAY[r['method']]} | {r['threads']} | {r['time_s']:.3f} | {how} | {mem:.0f} | {sp} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="60000x100x10,1000000x20x10", help="NxKxC,...")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--num-samples", type=int, default=10_000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=None, help="write JSON + markdown (e.g. benchmarks/results/batchbald.json)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fastbald.benchtools import machine_info, write_results

    res: dict[str, Any] = dict(benchmark="batchbald", machine=machine_info(), date=time.strftime("%Y-%m-%d %H:%M"),
                               command="python benchmarks/bench_batchbald.py " + " ".join(argv or sys.argv[1:]),
                               configs=[])
    threads = [int(t) for t in a.threads.split(",")]
    for spec in a.configs.split(","):
        N, K, C = map(int, spec.split("x"))
        print(f"N={N} K={K} C={C} b={a.batch} M={a.num_samples}", flush=True)
        res["configs"].append(measure(N, K, C, a.batch, a.num_samples, threads, a.repeats, not a.no_peers))
    if a.out:
        md = write_results(res, a.out, render=to_markdown)
    else:
        md = to_markdown(res)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
