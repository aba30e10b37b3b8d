"""``fastbald bench batch``: batch acquisition beyond top-k, fastbald against what users would
otherwise run, side by side in one run, for 1 and 2 torch threads.

Stochastic batch acquisition (``fastbald.stochastic_acquire``, power / softmax / softrank,
beta = 1) of k items from N scores (BALD-like float32 in [0, log 10]), against ``torch.topk`` of
the same scores (what it replaces), ``fastbald.acquire`` (top-k with ties by lowest index: a topk,
then the tied items) and baal's ``PowerSampling`` over precomputed scores (``np.random.choice`` without
replacement). In-process, the methods interleaved within each repeat, median of repeats. Where
the native kernel runs AVX-512 loops, power and softrank are also timed with its scalar loops
forced, and softrank with its AVX2 loops (what CPUs without AVX-512 run).

EPIG of N_p pool items against N_t target items (K posterior samples, C classes; MC-dropout-like
log-probabilities, seed 0), each method fed the input it takes: ``fastbald.epig`` (log-probs
[N, K, C]), baal's ``EPIG().get_uncertainties`` (probabilities [N, C, K], numpy; the conversion is
not timed), and the epig repository's ``epig_from_logprobs_using_matmul`` (reproduced in
``fastbald.bench_peers_batch``, with its provenance), on the whole pool in one call and per pool
minibatch of 1,000 as its trainers call it. One fresh process per method and thread count: time
(median of repeats within a budget), peak resident memory above the process with its input
loaded, and the largest error against EPIG by its definition in float64 on the first pool items.

Usage::

    fastbald bench batch [--quick] [--threads 1,2] [--stochastic-n 1000000] [--k 10]
                         [--epig-size 60000x100x100x10] [--out benchmarks/results/batch_acquisition.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastbald.benchtools import (
    PeakRSS,
    fmt_ms,
    interleaved_wall_cpu_times,
    loadavg,
    machine_info,
    median_time,
    write_results,
)

_TAG = "FASTBALD_BATCH_RESULT "
EPIG_METHODS = ("fastbald", "baal", "epig_repo", "epig_repo_minibatch")
EPIG_LABELS = {
    "fastbald": ("fastbald.epig", "log-probs [N, K, C]"),
    "baal": ("baal EPIG", "probs [N, C, K] numpy"),
    "epig_repo": ("epig repo, whole pool", "log-probs [N, K, C]"),
    "epig_repo_minibatch": ("epig repo, minibatches of 1,000", "log-probs [N, K, C]"),
}


# ------------------------------------------------------------------------------------------------
# Stochastic acquisition
# ------------------------------------------------------------------------------------------------
def bald_like_scores(N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, generator=g) ** 3 * math.log(10)).float()


def _stochastic_native() -> Any:
    """The native stochastic extension module (``vectorized()``, ``_force_kernel()``), or None."""
    from fastbald import stochastic as st

    if st._native_op() is None:
        return None
    import importlib

    return importlib.import_module("fastbald._stochastic_cpu")


def stochastic_kernel() -> str:
    """Which loops the native stochastic kernel runs here: "avx512", "avx2", "scalar" or "not built"."""
    native = _stochastic_native()
    return "not built" if native is None else native.kernel()


def bench_stochastic(N: int, k: int, threads: Sequence[int], repeats: int, seed: int = 0) -> list[dict]:
    import fastbald

    s = bald_like_scores(N, seed)
    s_np = s.numpy()
    methods: list[tuple[str, Callable[[], Any]]] = [
        ("torch.topk", lambda: torch.topk(s, k)),
        ("fastbald.acquire (top-k)", lambda: fastbald.acquire(s, k)),
        ("stochastic power", lambda: fastbald.stochastic_acquire(s, k, "power", 1.0, seed=1)),
        ("stochastic softmax", lambda: fastbald.stochastic_acquire(s, k, "softmax", 1.0, seed=1)),
        ("stochastic softrank", lambda: fastbald.stochastic_acquire(s, k, "softrank", 1.0, seed=1)),
    ]
    native = _stochastic_native()
    if native is not None and native.vectorized():
        # The AVX2 and the portable scalar loops (what CPUs without AVX-512 run), forced per call.
        def forced(mode: str, kernel: int) -> Callable[[], Any]:
            def run() -> Any:
                native._force_kernel(kernel)
                try:
                    return fastbald.stochastic_acquire(s, k, mode, 1.0, seed=1)
                finally:
                    native._force_kernel(-1)

            return run

        methods += [("stochastic power, scalar loops", forced("power", 0)),
                    ("stochastic softrank, scalar loops", forced("softrank", 0))]
        native._force_kernel(2)
        has_avx2 = native.kernel() == "avx2"
        native._force_kernel(-1)
        if has_avx2:
            methods.append(("stochastic softrank, AVX2 loops", forced("softrank", 2)))
    try:
        from baal.active.heuristics import Precomputed
        from baal.active.heuristics.stochastics import PowerSampling

        h = PowerSampling(Precomputed(), query_size=k, temperature=1.0)
        methods.append(("baal PowerSampling", lambda: h.get_ranks(s_np)))
    except ImportError:
        pass
    rows = []
    prev = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            times, cpu = interleaved_wall_cpu_times([f for _, f in methods], repeats, warmup=1)
            meds = [float(np.median(ts)) * 1e3 for ts in times]
            cmeds = [float(np.median(ts)) * 1e3 for ts in cpu]
            for (name, _), ms, cms in zip(methods, meds, cmeds, strict=True):
                rows.append(dict(threads=t, method=name, time_ms=ms, x_topk=ms / meds[0], cpu_ms=cms,
                                 cpu_x_topk=cms / cmeds[0]))
    finally:
        torch.set_num_threads(prev)
    return rows


# ------------------------------------------------------------------------------------------------
# EPIG (one process per method and thread count)
# ------------------------------------------------------------------------------------------------
def epig_inputs(Np: int, Nt: int, K: int, C: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout-like log-probs: ``3 m[n, c] + s[n] e[n, k, c]``, s log-uniform in [0.1, 3]."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        m = torch.randn(n, 1, C, generator=g) * 3
        spread = torch.exp(torch.empty(n, 1, 1).uniform_(math.log(0.1), math.log(3.0), generator=g))
        return torch.log_softmax(m + spread * torch.randn(n, K, C, generator=g), -1)

    return make(Np), make(Nt)


def _epig_fn(method: str, pool: torch.Tensor, targ: torch.Tensor) -> tuple[Callable[[], Any], Any]:
    if method == "fastbald":
        from fastbald.epig import epig

        return (lambda: epig(pool, targ)), pool
    if method == "baal":
        from baal.active.heuristics import EPIG

        pb = pool.exp().permute(0, 2, 1).contiguous().numpy()
        tb = targ.exp().permute(0, 2, 1).contiguous().numpy()
        h = EPIG()
        return (lambda: h.get_uncertainties(pb, target_predictions=tb)), pb
    from fastbald.bench_peers_batch import (
        epig_repo_from_logprobs_using_matmul,
        epig_repo_minibatched,
    )

    if method == "epig_repo":
        return (lambda: epig_repo_from_logprobs_using_matmul(pool, targ)), pool
    if method == "epig_repo_minibatch":
        return (lambda: epig_repo_minibatched(pool, targ, 1000)), pool
    raise ValueError(f"unknown EPIG method {method!r}")


def _child(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fastbald.bench_batch --child")
    p.add_argument("method", choices=EPIG_METHODS)
    p.add_argument("size", help="NpxNtxKxC")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--save", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    Np, Nt, K, C = (int(v) for v in a.size.split("x"))
    pool, targ = epig_inputs(Np, Nt, K, C)
    small, _ = _epig_fn(a.method, pool[:64].clone(), targ)
    small()  # warm-up: imports, thread pool
    fn, inp = _epig_fn(a.method, pool, targ)
    if a.method == "baal":
        del pool
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
    reps = 1 if first * 2 > a.budget else max(1, min(a.repeats, int(a.budget / max(first, 1e-6))))
    t = first if reps == 1 else median_time(fn, reps, warmup=0)
    out_np = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    np.save(a.save, out_np)
    nbytes = inp.nbytes if isinstance(inp, np.ndarray) else inp.numel() * inp.element_size()
    print(_TAG + json.dumps(dict(time_ms=t * 1e3, repeats=reps, peak_extra_mb=mem.extra_mb,
                                 input_mb=nbytes / 2**20)), flush=True)
    return 0


def bench_epig(size: tuple[int, int, int, int], threads: Sequence[int], methods: Sequence[str],
               repeats: int, budget: float, timeout: float, acc_items: int = 1000) -> list[dict]:
    from fastbald.epig import epig_reference

    Np, Nt, K, C = size
    pool, targ = epig_inputs(Np, Nt, K, C)
    n_acc = min(acc_items, Np)
    oracle = epig_reference(pool[:n_acc], targ).numpy()
    del pool
    rows = []
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [v for v in [os.environ.get("PYTHONPATH")] if v]))
    with tempfile.TemporaryDirectory(prefix="fastbald-bench-batch-") as tmp:
        for t in threads:
            for m in methods:
                save = os.path.join(tmp, f"{m}_{t}.npy")
                cmd = [sys.executable, "-m", "fastbald.bench_batch", "--child", m, "x".join(map(str, size)),
                       "--threads", str(t), "--repeats", str(repeats), "--budget", str(budget), "--save", save]
                print(f"  EPIG {m}, {t} thread(s) ...", file=sys.stderr, flush=True)
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                       env=dict(env, OMP_NUM_THREADS=str(t)))
                except subprocess.TimeoutExpired:
                    rows.append(dict(threads=t, method=m, status=f"timed out after {timeout:.0f} s"))
                    continue
                line = next((x for x in r.stdout.splitlines() if x.startswith(_TAG)), None)
                if line is None:
                    tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
                    rows.append(dict(threads=t, method=m, status=f"failed (exit {r.returncode}): {tail}"))
                    continue
                row = dict(threads=t, method=m, status="ok", **json.loads(line[len(_TAG):]))
                out = np.load(save)
                row["max_abs_err"] = float(np.abs(out[:n_acc].astype(np.float64) - oracle).max())
                row["min_score"] = float(out.min())
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "numpy", "baal"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def to_markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, fastbald kernel `{m['kernel']}`, {m['date']}, "
        f"1-min load average {res['load_average'][0]} at the start and {res['load_average'][1]} at "
        f"the end (a shared machine: read the ratios, measured side by side). Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
        + f". Command: `{res['command']}`.",
        "",
    ]
    st = res.get("stochastic")
    if st:
        threads = sorted({r["threads"] for r in st["rows"]})
        out += [
            f"### Stochastic batch acquisition: k = {st['k']} of N = {st['N']:,} scores, beta = 1 "
            f"(median of {st['repeats']} interleaved repeats; × = time / torch.topk; CPU: the same for "
            f"the process CPU time; native stochastic kernel: {st.get('kernel', 'not recorded')})",
            "",
            "| method | " + " | ".join(f"{t} thread" + ("s" if t > 1 else "") for t in threads) + " |",
            "|---|" + "---|" * len(threads),
        ]
        for name in dict.fromkeys(r["method"] for r in st["rows"]):
            cells = []
            for t in threads:
                r = next((r for r in st["rows"] if r["method"] == name and r["threads"] == t), None)
                cpu = f"; CPU {r['cpu_x_topk']:.2f}×" if r and "cpu_x_topk" in r else ""
                cells.append(f"{fmt_ms(r['time_ms'])} ({r['x_topk']:.2f}×{cpu})" if r else "-")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    ep = res.get("epig")
    if ep:
        Np, Nt, K, C = ep["size"]
        threads = sorted({r["threads"] for r in ep["rows"]})
        out += [
            f"### EPIG: N_p = {Np:,} pool items, N_t = {Nt:,} targets, K = {K}, C = {C} "
            "(median of repeats; × = time / fastbald.epig; fresh process per cell)",
            "",
            "| method | input | " + " | ".join(f"{t} thread" + ("s" if t > 1 else "") for t in threads)
            + " | peak extra memory | max abs error (float64 definition) |",
            "|---|---|" + "---|" * len(threads) + "---|---|",
        ]
        for meth in dict.fromkeys(r["method"] for r in ep["rows"]):
            label, inp = EPIG_LABELS.get(meth, (meth, ""))
            cells, mem, err = [], [], None
            for t in threads:
                r = next((r for r in ep["rows"] if r["method"] == meth and r["threads"] == t), None)
                base = next((b for b in ep["rows"] if b["method"] == "fastbald" and b["threads"] == t
                             and b.get("status") == "ok"), None)
                if r is None:
                    cells.append("-")
                elif r.get("status") != "ok":
                    cells.append(r["status"])
                else:
                    x = f" ({r['time_ms'] / base['time_ms']:.1f}×)" if base else ""
                    cells.append(fmt_ms(r["time_ms"]) + x)
                    if r.get("peak_extra_mb") is not None:
                        mem.append(r["peak_extra_mb"])
                    err = r.get("max_abs_err", err)
            mem_s = f"{max(mem):,.0f} MB" if mem else "-"
            err_s = f"{err:.1e}" if err is not None else "-"
            out.append(f"| {label} | {inp} | " + " | ".join(cells) + f" | {mem_s} | {err_s} |")
        out.append("")
        out.append(f"Accuracy on the first {ep['acc_items']:,} pool items against "
                   "`fastbald.epig.epig_reference` (the float64 definition, full joint). Peak memory: "
                   "the largest over the thread counts, above the process with its input loaded.")
    return "\n".join(out) + "\n"


def _parse_threads(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``fastbald bench batch``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    p = argparse.ArgumentParser(prog="fastbald bench batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--threads", type=_parse_threads, default=[1, 2], help="comma-separated (default 1,2)")
    p.add_argument("--stochastic-n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15, help="stochastic: interleaved repeats")
    p.add_argument("--epig-size", default="60000x100x100x10", help="NpxNtxKxC")
    p.add_argument("--epig-methods", default=",".join(EPIG_METHODS))
    p.add_argument("--epig-repeats", type=int, default=3)
    p.add_argument("--epig-budget", type=float, default=60.0, help="seconds of timed calls per cell")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per EPIG cell")
    p.add_argument("--skip", default="", help="comma-separated: stochastic, epig")
    p.add_argument("--out", type=Path, default=None, help="write .json and .md here")
    a = p.parse_args(argv)
    if a.quick:
        a.stochastic_n, a.repeats, a.epig_size, a.epig_repeats = 100_000, 5, "2000x20x20x10", 1
    skip = set(a.skip.split(","))
    res: dict[str, Any] = dict(
        benchmark="batch_acquisition",
        command="fastbald bench batch " + " ".join(argv) if argv else "fastbald bench batch",
        machine=machine_info(), versions=_versions(),
    )
    load0 = loadavg()
    if "stochastic" not in skip:
        print(f"stochastic acquisition, N={a.stochastic_n:,}, k={a.k} ...", file=sys.stderr, flush=True)
        res["stochastic"] = dict(N=a.stochastic_n, k=a.k, repeats=a.repeats, kernel=stochastic_kernel(),
                                 rows=bench_stochastic(a.stochastic_n, a.k, a.threads, a.repeats))
    if "epig" not in skip:
        size = tuple(int(v) for v in a.epig_size.split("x"))
        methods = [m for m in a.epig_methods.split(",") if m]
        res["epig"] = dict(size=size, acc_items=min(1000, size[0]),
                           rows=bench_epig(size, a.threads, methods, a.epig_repeats, a.epig_budget, a.timeout))
    res["load_average"] = [load0, loadavg()]
    if a.out is not None:
        md = write_results(res, a.out, render=to_markdown)
        print(f"written: {a.out.with_suffix('.json')}, {a.out.with_suffix('.md')}", file=sys.stderr)
    else:
        md = to_markdown(res)
    print(md)
    bad = [r for r in res.get("epig", {}).get("rows", []) if r.get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
