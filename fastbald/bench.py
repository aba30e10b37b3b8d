"""``fastbald bench``: BALD scoring, fastbald against the libraries a user would otherwise use.

For each pool size (N items, T MC samples, C classes), every method scores the same random logits
(MC-dropout-like, see ``make_logits``; seed fixed), each fed the input it wants:

==================  ======================================================  ====================
method              what runs                                               its input
==================  ======================================================  ====================
fastbald            ``fastbald.scores(x, metrics=["bald"])``, CPU kernel    logits [N, T, C]
fastbald (7)        the same, all seven scores in the one pass              logits [N, T, C]
fastbald torch      ``fastbald.scores(..., backend="torch")`` (chunked)     logits [N, T, C]
PyTorch (naive)     log_softmax, exp, mean, two entropies                   logits [N, T, C]
baal                ``baal...BALD().get_uncertainties(probs)`` (numpy)      probs [N, C, T] numpy
fastbald for baal   ``fastbald.integrations.baal.BALD()``, same call        probs [N, C, T] numpy
batchbald_redux     ``compute_entropy - compute_conditional_entropy``       log-probs [N, K, C]
                    (the scoring of ``get_bald_batch``)
fastbald for bbr    ``fastbald.integrations.batchbald.get_bald_scores``     log-probs [N, K, C]
==================  ======================================================  ====================

Reported per method and size: the median time of repeated calls (and ms per million pool items),
the time to convert the logits into the method's input (softmax + transpose for baal, log_softmax
for batchbald_redux; reported separately, not added), the peak extra resident memory of one call
(fresh subprocess per method and size; peak RSS reset through /proc/self/clear_refs), and the
accuracy of the BALD values against a float64 evaluation of the same input
(``fastbald.reference.reference_scores``, on the first items, at most ``--acc-elems`` numbers) and
the number of negative BALD values (over the whole pool).

Usage::

    fastbald bench [--quick] [--sizes 100000x20x10,...] [--methods fastbald,baal,...]
                   [--threads N] [--out benchmarks/results/peers.md]
    fastbald bench batch [...]   batch acquisition (stochastic, EPIG): fastbald.bench_batch

``--out NAME.md`` writes ``NAME.json`` (all numbers), ``NAME.md`` (the tables, rendered from the
JSON by ``to_markdown``; ``--from-json`` or ``python -m fastbald.benchtools render`` redo them
without a run) and ``NAME.png`` (bar chart); without it the tables are only printed. The peers are optional: a method whose library
is not installed is listed as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastbald.benchtools import PeakRSS, fmt_ms, loadavg, machine_info, median_time, write_results

FULL_SIZES = [(100_000, 20, 10), (1_000_000, 20, 10), (100_000, 20, 100), (10_000, 50, 1000)]
QUICK_SIZES = [(20_000, 20, 10), (2_000, 20, 100)]
LOGIT_SCALE = 4.0
_RESULT_TAG = "FASTBALD_BENCH_RESULT "


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------
def naive_bald(x: torch.Tensor) -> torch.Tensor:
    """A straightforward PyTorch float32 BALD of logits [N, T, C]: what most code does."""
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    pbar = p.mean(1)
    h_mean = -(pbar * torch.log(pbar)).sum(-1)
    e_h = -(p * logp).sum(-1).mean(-1)
    return h_mean - e_h


def _to_baal_probs(x: torch.Tensor) -> np.ndarray:
    """Logits [N, T, C] -> what baal's heuristics take: probabilities [N, C, T], numpy."""
    return torch.softmax(x, dim=-1).transpose(1, 2).contiguous().numpy()


def _to_log_probs(x: torch.Tensor) -> torch.Tensor:
    """Logits [N, T, C] -> what batchbald_redux takes: log-probabilities [N, K, C]."""
    return torch.log_softmax(x, dim=-1)


# input kind -> (conversion from logits [N, T, C], description, how the oracle reads it)
_INPUTS: dict[str, tuple[Callable[[torch.Tensor], Any] | None, str]] = {
    "logits": (None, "logits [N, T, C] (torch)"),
    "probs_nct": (_to_baal_probs, "probs [N, C, T] (numpy)"),
    "log_probs": (_to_log_probs, "log-probs [N, K, C] (torch)"),
}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    input: str  # key of _INPUTS
    needs: str | None  # module that must be importable (a peer), or "native"
    make: Callable[[], Callable[[Any], Any]]  # returns the scoring function (input -> BALD [N])


def _make_fastbald(all_metrics: bool) -> Callable[[Any], Any]:
    import fastbald

    metrics = None if all_metrics else ["bald"]
    return lambda x: fastbald.scores(x, metrics=metrics, backend="native").bald


def _make_fastbald_torch() -> Callable[[Any], Any]:
    import fastbald

    return lambda x: fastbald.scores(x, metrics=["bald"], backend="torch").bald


def _make_baal() -> Callable[[Any], Any]:
    from baal.active.heuristics import BALD

    h = BALD()
    return h.get_uncertainties


def _make_fastbald_baal() -> Callable[[Any], Any]:
    from fastbald.integrations.baal import BALD

    h = BALD()
    return h.get_uncertainties


def _make_bbr() -> Callable[[Any], Any]:
    from batchbald_redux.batchbald import compute_conditional_entropy, compute_entropy

    # Exactly the scoring of batchbald_redux.batchbald.get_bald_batch (before its top-k).
    def f(lp: torch.Tensor) -> torch.Tensor:
        scores_N = -compute_conditional_entropy(lp)
        scores_N += compute_entropy(lp)
        return scores_N

    return f


def _make_fastbald_bbr() -> Callable[[Any], Any]:
    from fastbald.integrations.batchbald import get_bald_scores

    return get_bald_scores


METHODS: dict[str, Method] = {
    m.key: m
    for m in [
        Method("fastbald", "fastbald (CPU kernel)", "logits", "native", lambda: _make_fastbald(False)),
        Method("fastbald_all", "fastbald, all 7 scores", "logits", "native", lambda: _make_fastbald(True)),
        Method("fastbald_torch", "fastbald torch backend", "logits", None, _make_fastbald_torch),
        Method("naive", "PyTorch (naive)", "logits", None, lambda: naive_bald),
        Method("baal", "baal BALD", "probs_nct", "baal", _make_baal),
        Method("fastbald_baal", "fastbald.integrations.baal.BALD", "probs_nct", "baal", _make_fastbald_baal),
        Method("batchbald_redux", "batchbald_redux BALD", "log_probs", "batchbald_redux", _make_bbr),
        Method("fastbald_bbr", "fastbald.integrations.batchbald", "log_probs", None, _make_fastbald_bbr),
    ]
}
PEER_KEYS = ("baal", "batchbald_redux", "naive")


def make_logits(N: int, T: int, C: int, seed: int) -> torch.Tensor:
    """MC-dropout-like logits [N, T, C]: ``4 m[n, c] + s[n] e[n, t, c]`` with m, e standard normal
    and s log-uniform in [1e-3, 1]: the T samples of an item scatter around the item's mean, from
    near-identical (BALD ~ 1e-7, where a difference of two float32 entropies can come out < 0) to
    widely spread (BALD ~ 0.3)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(N, 1, C, generator=g) * LOGIT_SCALE
    s = torch.pow(10.0, -3.0 * torch.rand(N, 1, 1, generator=g))
    return torch.randn(N, T, C, generator=g).mul_(s).add_(m)


def _unavailable(m: Method) -> str | None:
    """Why method m cannot run here, or None."""
    if m.needs == "native":
        from fastbald import _ops

        if not _ops.native_available(torch.device("cpu")):
            return "native CPU kernel not built"
        return None
    if m.needs is not None:
        import importlib.util

        if importlib.util.find_spec(m.needs) is None:
            return f"{m.needs} not installed"
    return None


# ------------------------------------------------------------------------------------------------
# Child process: one method, one size
# ------------------------------------------------------------------------------------------------
def _nbytes(a: Any) -> int:
    return a.numel() * a.element_size() if isinstance(a, torch.Tensor) else int(a.nbytes)


def _child(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fastbald.bench --child")
    p.add_argument("method")
    p.add_argument("N", type=int)
    p.add_argument("T", type=int)
    p.add_argument("C", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls, at most")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--save", required=True)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    m = METHODS[a.method]
    convert = _INPUTS[m.input][0]
    fn = m.make()

    x = make_logits(a.N, a.T, a.C, a.seed)
    small = x[: min(256, a.N)].clone()
    fn(convert(small) if convert else small)  # warm-up: imports, lazy init, thread pool
    convert_ms = None
    if convert is not None:
        convert(small)
        reps = max(1, min(3, a.repeats))
        convert_ms = median_time(lambda: convert(x), reps, warmup=0) * 1e3
        inp = convert(x)
        del x
    else:
        inp = x
    del small
    gc.collect()

    # Peak extra memory of one call, above what the process holds (input included) before it.
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn(inp)
        first = time.perf_counter() - t0

    # Timed calls: up to `repeats` within the time budget. A call slower than half the budget is
    # timed once: the first call (made after the warm-up on a small slice) is that time.
    if first * 2 > a.budget:
        reps, t = 1, first
    else:
        reps = max(1, min(a.repeats, int(a.budget / max(first, 1e-6))))
        t = median_time(lambda: fn(inp), reps, warmup=0)
    out_np = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    np.save(a.save, out_np)
    res = dict(time_ms=t * 1e3, first_ms=first * 1e3, repeats=reps, convert_ms=convert_ms,
               peak_extra_mb=mem.extra_mb, input_mb=_nbytes(inp) / 2**20,
               out_dtype=str(out_np.dtype))
    print(_RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Parent: run the children, accuracy against float64, tables, chart
# ------------------------------------------------------------------------------------------------
def _run_child(key: str, size: tuple[int, int, int], args: argparse.Namespace, save: str) -> dict:
    N, T, C = size
    cmd = [sys.executable, "-m", "fastbald.bench", "--child", key, str(N), str(T), str(C),
           "--seed", str(args.seed), "--repeats", str(args.repeats), "--budget", str(args.budget),
           "--threads", str(args.threads), "--save", save]
    env = dict(os.environ, TQDM_DISABLE="1")
    # The child imports the same fastbald as this process, installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(status=f"timed out after {args.timeout} s")
    for line in r.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return dict(status="ok", **json.loads(line[len(_RESULT_TAG):]))
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(status=f"failed (exit {r.returncode}): {tail[:200]}")


def _oracle(x_sub: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 BALD of the first items of the input method-kind `kind` received."""
    from fastbald.reference import METRICS, reference_scores

    i = METRICS.index("bald")
    if kind == "logits":
        return reference_scores(x_sub, "logits", dtype=torch.float64)[i]
    if kind == "probs_nct":
        p = torch.from_numpy(_to_baal_probs(x_sub)).transpose(1, 2)  # the float32 numbers baal got
        return reference_scores(p, "probs", dtype=torch.float64)[i]
    return reference_scores(_to_log_probs(x_sub), "log_probs", dtype=torch.float64)[i]


def run(args: argparse.Namespace) -> dict:
    from fastbald import __version__ as fb_version

    results = []
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="fastbald-bench-") as tmp:
        for size in args.sizes:
            N, T, C = size
            print(f"N={N:,} T={T} C={C} ({N * T * C * 4 / 2**20:.0f} MB of float32 logits)", flush=True)
            rows = []
            for key in args.methods:
                m = METHODS[key]
                row: dict[str, Any] = dict(method=key, label=m.label, input=_INPUTS[m.input][1],
                                           N=N, T=T, C=C)
                why = _unavailable(m)
                if why:
                    row["status"] = f"skipped: {why}"
                    print(f"  {m.label:34s} {row['status']}", flush=True)
                    rows.append(row)
                    continue
                save = os.path.join(tmp, f"{key}.npy")
                row.update(_run_child(key, size, args, save))
                if row["status"] == "ok":
                    row["ms_per_million"] = row["time_ms"] / (N / 1e6)
                    row["_out"] = np.load(save).astype(np.float64)
                    row["neg_bald"] = int((row["_out"] < 0).sum())
                    row["nan_bald"] = int(np.isnan(row["_out"]).sum())
                    print(f"  {m.label:34s} {row['time_ms']:10.1f} ms  (x{row['repeats']})", flush=True)
                else:
                    print(f"  {m.label:34s} {row['status']}", flush=True)
                rows.append(row)
            # Accuracy against float64, on the first n_acc items of each method's own input.
            n_acc = max(1, min(N, args.acc_elems // (T * C)))
            x_sub = make_logits(N, T, C, args.seed)[:n_acc].clone()
            oracles: dict[str, torch.Tensor] = {}
            for row in rows:
                if row.get("status") != "ok":
                    continue
                kind = METHODS[row["method"]].input
                if kind not in oracles:
                    oracles[kind] = _oracle(x_sub, kind)
                err = np.abs(row.pop("_out")[:n_acc] - oracles[kind].numpy())
                row["max_abs_err"] = float(np.nanmax(err)) if not np.all(np.isnan(err)) else float("nan")
                row["acc_items"] = n_acc
            del x_sub, oracles
            gc.collect()
            results.extend(rows)
    machine = machine_info(args.threads)
    machine["load_average"] = [load_before, loadavg()]
    return dict(benchmark="peers", machine=machine, versions=_versions(fb_version), command=args.command,
                seed=args.seed, logit_scale=LOGIT_SCALE, results=results)


def _versions(fb_version: str) -> dict[str, str]:
    v = {"fastbald": fb_version, "torch": torch.__version__, "numpy": np.__version__,
         "python": platform.python_version()}
    for dist in ("baal", "batchbald-redux", "scipy"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = "not installed"
    return v


def _size_label(r: dict | tuple) -> str:
    N, T, C = (r["N"], r["T"], r["C"]) if isinstance(r, dict) else r

    def h(n: int) -> str:
        return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)

    return f"N={h(N)}, T={T}, C={C}"


def _grid(res: dict) -> tuple[list[str], list[tuple[int, int, int]], dict]:
    keys: list[str] = []
    sizes: list[tuple[int, int, int]] = []
    cell: dict[tuple[str, tuple[int, int, int]], dict] = {}
    for r in res["results"]:
        s = (r["N"], r["T"], r["C"])
        if r["method"] not in keys:
            keys.append(r["method"])
        if s not in sizes:
            sizes.append(s)
        cell[(r["method"], s)] = r
    return keys, sizes, cell


def to_markdown(res: dict) -> str:
    keys, sizes, cell = _grid(res)
    m, v = res["machine"], res["versions"]
    head = "| method | input | " + " | ".join(_size_label(s) for s in sizes) + " |"
    sep = "|---|---|" + "---|" * len(sizes)
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} thread"
        + ("s" if m["threads"] != 1 else "") + ", fastbald kernel "
        f"`{m['kernel']}` (CPU capability {m['capability']}), {m['date']}"
        + (f", 1-min load average {m['load_average'][0]} at the start and {m['load_average'][1]} "
           "at the end (other jobs shared the machine)" if m.get("load_average") else "")
        + ". Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + f". Command: `{res['command']}`. Input: float32 logits `{res['logit_scale']:g} m[n, c] + "
        f"s[n] e[n, t, c]` (m, e standard normal, s log-uniform in [1e-3, 1]: MC samples around "
        f"an item mean, from near-identical to widely spread; seed {res['seed']}).",
        "",
        "### Time of one BALD scoring call (median of repeats; × = time / fastbald CPU kernel)",
        "",
        head,
        sep,
    ]

    def base(s):
        b = cell.get(("fastbald", s))
        return b["time_ms"] if b and b.get("status") == "ok" else None

    def status_or(r: dict | None, f: Callable[[dict], str]) -> str:
        if r is None:
            return ""
        if r.get("status") != "ok":
            return r.get("status", "")
        return f(r)

    for k in keys:
        row = [METHODS[k].label, _INPUTS[METHODS[k].input][1]]
        for s in sizes:
            b = base(s)
            row.append(status_or(cell.get((k, s)), lambda r, b=b: fmt_ms(r["time_ms"]) + (
                f" ({r['time_ms'] / b:.1f}×)" if b else "")))
        out.append("| " + " | ".join(row) + " |")

    out += ["", "### Layout conversion from logits [N, T, C], paid once before the call (not in the times above)",
            "", "| conversion | for | " + " | ".join(_size_label(s) for s in sizes) + " |", sep]
    conv = {"probs_nct": ("softmax + transpose to [N, C, T] + `.numpy()`", "baal"),
            "log_probs": ("log_softmax", "batchbald_redux")}
    for kind, (what, who) in conv.items():
        row = [what, who]
        for s in sizes:
            r = next((cell[(k, s)] for k in keys if (k, s) in cell and METHODS[k].input == kind
                      and cell[(k, s)].get("convert_ms") is not None), None)
            b = base(s)
            row.append(fmt_ms(r["convert_ms"]) + (f" ({r['convert_ms'] / b:.1f}×)" if b else "")
                       if r else "")
        out.append("| " + " | ".join(row) + " |")

    out += ["", "### Peak extra memory of one call (RSS above the process with its input loaded; fresh process)",
            "", head.replace("| method | input |", "| method | input size |"), sep]
    for k in keys:
        row = [METHODS[k].label]
        ins = []
        for s in sizes:
            r = cell.get((k, s))
            if r and r.get("status") == "ok":
                ins.append(f"{r['input_mb']:,.0f}")
        row.append((" / ".join(ins) + " MB") if ins else "")
        for s in sizes:
            row.append(status_or(cell.get((k, s)), lambda r: "n/a" if r.get("peak_extra_mb") is None
                                 else f"{r['peak_extra_mb']:,.0f} MB"))
        out.append("| " + " | ".join(row) + " |")

    out += ["", "### Accuracy of BALD against float64 on the same input: max abs error (nats); "
            "BALD < 0 count over the whole pool", "",
            head.replace("| method | input |", "| method | items checked |"), sep]
    for k in keys:
        row = [METHODS[k].label]
        n = [f"{cell[(k, s)]['acc_items']:,}" for s in sizes
             if cell.get((k, s), {}).get("status") == "ok"]
        row.append(" / ".join(n))
        for s in sizes:
            row.append(status_or(cell.get((k, s)), lambda r: f"{r['max_abs_err']:.1e}; "
                                 f"{r['neg_bald']:,} < 0" + (f"; {r['nan_bald']:,} NaN" if r["nan_bald"] else "")))
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "Notes: the fastbald rows for baal and batchbald_redux are `fastbald.integrations` (the same "
        "kernel behind each peer's own interface and input). The torch backend is fastbald's pure-"
        "PyTorch fallback (all seven scores, float32, in chunks). batchbald_redux's scoring runs "
        "through `toma`, which calls `gc.collect()` after every 1,024-item chunk: in a process "
        "that has imported torch that is most of its time at large N. baal's time includes its "
        "`to_prob` check (min, max and class sums over the whole array). Peak memory is the "
        "high-water mark of one call above the resident size just before it (input loaded).",
    ]
    return "\n".join(out) + "\n"


_COLORS = {
    "fastbald": "#1b7837", "fastbald_all": "#5aae61", "fastbald_torch": "#a6dba0",
    "fastbald_baal": "#2166ac", "fastbald_bbr": "#67a9cf", "naive": "#969696",
    "baal": "#d6604d", "batchbald_redux": "#f4a582",
}


def _fmt_duration(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def plot(res: dict, path: Path) -> bool:
    """Grouped bar chart: time per million pool items, by size (groups) and method (bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return False
    keys, sizes, cell = _grid(res)
    # Peers first, then fastbald, so each group reads left (slow) to right (fast).
    order = ["baal", "batchbald_redux", "naive", "fastbald_torch", "fastbald_baal", "fastbald_bbr",
             "fastbald_all", "fastbald"]
    keys = [k for k in order if k in keys] + [k for k in keys if k not in order]
    fig, ax = plt.subplots(figsize=(max(9.0, 2.9 * len(sizes) + 1.5), 6.2))
    width = 0.84 / max(1, len(keys))
    top = 0.0
    for j, k in enumerate(keys):
        for i, s in enumerate(sizes):
            r = cell.get((k, s))
            if not (r and r.get("status") == "ok"):
                continue
            x, y = i + (j - (len(keys) - 1) / 2) * width, r["ms_per_million"]
            top = max(top, y)
            ax.bar(x, y, width * 0.9, color=_COLORS.get(k), edgecolor="white", linewidth=0.5,
                   label=METHODS[k].label if i == next(
                       (ii for ii, ss in enumerate(sizes) if cell.get((k, ss), {}).get("status") == "ok"), -1)
                   else None)
            b = cell.get(("fastbald", s))
            if k == "fastbald":
                text = _fmt_duration(float(f"{y:.3g}"))
            elif b and b.get("status") == "ok":
                text = f"{r['time_ms'] / b['time_ms']:.1f}×" if r["time_ms"] < 10 * b["time_ms"] \
                    else f"{r['time_ms'] / b['time_ms']:.0f}×"
            else:
                text = ""
            ax.annotate(text, (x, y), ha="center", va="bottom", fontsize=7, rotation=90,
                        xytext=(0, 2), textcoords="offset points",
                        fontweight="bold" if k == "fastbald" else "normal")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 12)
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_duration(v)))
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([_size_label(s) for s in sizes])
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_ylabel("time per million pool items (log scale, lower is better)")
    m = res["machine"]
    ax.set_title("BALD scoring time per million pool items (float32, CPU). Labels: time relative to "
                 "fastbald's kernel;\n"
                 f"each method fed its own input layout, conversion not included. {m['cpu']}, "
                 f"{m['threads']} thread" + ("s" if m["threads"] != 1 else ""), fontsize=9.5)
    ax.grid(axis="y", which="major", alpha=0.35)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _parse_sizes(s: str) -> list[tuple[int, int, int]]:
    out = []
    for part in s.split(","):
        try:
            N, T, C = (int(float(v)) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes are NxTxC,NxTxC,...; got {part!r}") from None
        if min(N, T, C) < 1:
            raise argparse.ArgumentTypeError(f"sizes need N, T and C >= 1; got {part!r}")
        out.append((N, T, C))
    return out


def _parse_methods(s: str) -> list[str]:
    ms = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    return ms


def main(argv: Sequence[str] | None = None) -> int:
    """Run the peers benchmark (``fastbald bench``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    if argv and argv[0] == "batch":  # batch acquisition: stochastic, EPIG (fastbald.bench_batch)
        from fastbald.bench_batch import main as batch_main

        return batch_main(argv[1:])
    p = argparse.ArgumentParser(prog="fastbald bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes {QUICK_SIZES}, 3 repeats (CI smoke run)")
    p.add_argument("--sizes", type=_parse_sizes, default=None,
                   help="NxTxC,... (default: " + ",".join("x".join(map(str, s)) for s in FULL_SIZES) + ")")
    p.add_argument("--methods", type=_parse_methods, default=list(METHODS),
                   help="comma-separated, from: " + ",".join(METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method and size, at most")
    p.add_argument("--budget", type=float, default=15.0,
                   help="seconds of timed calls per method and size, at most (min 1 call)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--acc-elems", type=int, default=20_000_000,
                   help="accuracy is checked on the first items, this many numbers at most")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method and size")
    p.add_argument("--out", type=Path, default=None,
                   help="write the table here (markdown) and .json/.png beside it")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-make the table (and, with --out, the chart) from a saved .json")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 2
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.quick:
        args.repeats = min(args.repeats, 3)
    args.command = "fastbald bench " + " ".join(argv) if argv else "fastbald bench"
    if args.from_json is not None:
        try:
            res = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as e:
            print(f"fastbald bench: error: --from-json {args.from_json}: {e}", file=sys.stderr)
            return 2
        res.setdefault("benchmark", "peers")
    else:
        res = run(args)
    if args.out is not None:
        # One data file (.json); the table (.md) is rendered from it.
        md = write_results(res, args.out.with_suffix(".json"), to_markdown)
        written = [args.out.with_suffix(".md"), args.out.with_suffix(".json")]
    else:
        md = to_markdown(res)
    print()
    print(md)
    if args.out is not None:
        if not args.no_plot and plot(res, args.out.with_suffix(".png")):
            written.append(args.out.with_suffix(".png"))
        print("written: " + ", ".join(map(str, written)))
    ok = [r for r in res["results"] if r.get("status") == "ok"]
    failed = [r for r in res["results"] if r.get("status", "").startswith(("failed", "timed out"))]
    return 1 if failed or not ok else 0


if __name__ == "__main__":
    raise SystemExit(main())
