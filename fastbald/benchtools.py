"""What every fastbald benchmark shares: machine facts, memory from /proc, timers, result files.

The benchmarks (``benchmarks/*.py``, ``fastbald bench``) import this module instead of keeping
their own copies:

* :func:`machine_info` / :func:`cpu_name` / :func:`loadavg`: the facts a result table states;
* :func:`proc_status_mb`, :func:`reset_peak_rss`, :class:`PeakRSS`: resident memory and its
  high-water mark (VmHWM) from ``/proc/self/status``, reset through ``/proc/self/clear_refs``;
* :func:`median_time`, :func:`interleaved_times`, :func:`interleaved_wall_cpu_times`: timers
  (median of repeats; several functions interleaved so a change in the load of a shared machine
  hits all of them alike; wall and process CPU time);
* :func:`write_results` and :func:`render_results`: a benchmark's numbers go to ONE data file,
  ``<name>.json``, and its markdown tables are rendered from that file (``<name>.md``) by the
  benchmark's own ``to_markdown(res)``; ``python -m fastbald.benchtools render`` re-renders every
  table under ``benchmarks/results`` from its JSON (after a change to a renderer, no re-run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

# Result name (the JSON's "benchmark" field) -> "module:function" of its table renderer
# (res -> markdown). A module path ending in .py is a file relative to the repository root.
RENDERERS: dict[str, str] = {
    "scores_cpu": "benchmarks/bench_scores.py:to_markdown",
    "peers": "fastbald.bench:to_markdown",
    "pool_scale": "benchmarks/bench_pool_scale.py:to_markdown",
    "mc_cpu": "benchmarks/bench_mc.py:to_markdown",
    "batch_acquisition": "fastbald.bench_batch:to_markdown",
    "batchbald": "benchmarks/bench_batchbald.py:to_markdown",
}


# ------------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return None


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a result table says about where it ran: CPU, cores, torch threads (``threads``, else
    torch's current count), torch and Python versions, the CPU kernel build fastbald loaded and
    torch's CPU capability, the date and the load average now."""
    import torch

    from fastbald import _ops

    return dict(cpu=cpu_name(), cores=os.cpu_count(), threads=threads or torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                kernel=_ops.load()["cpu"], capability=torch.backends.cpu.get_cpu_capability(),
                date=time.strftime("%Y-%m-%d"), load_average=loadavg())


# ------------------------------------------------------------------------------------------------
# Memory (Linux /proc)
# ------------------------------------------------------------------------------------------------
def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in MiB; None if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process' peak RSS mark (VmHWM) to its current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of a block above the resident memory just before it (MiB)::

        with PeakRSS() as mem:
            out = fn(x)
        mem.extra_mb  # None where /proc cannot tell

    Exact only when the peak mark could be reset (Linux); threads' memory counts, child
    processes' does not."""

    def __init__(self) -> None:
        self.before_mb: float | None = None
        self.peak_mb: float | None = None
        self.extra_mb: float | None = None
        self._exact = False

    def __enter__(self) -> PeakRSS:
        self._exact = reset_peak_rss()
        self.before_mb = proc_status_mb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = proc_status_mb("VmHWM")
        if self._exact and self.peak_mb is not None and self.before_mb is not None:
            self.extra_mb = self.peak_mb - self.before_mb


# ------------------------------------------------------------------------------------------------
# Timers
# ------------------------------------------------------------------------------------------------
def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``repeats`` calls of fn, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved_times(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[list[float]]:
    """Wall times (s) of each function over ``repeats`` rounds, the functions interleaved within
    each round (a change in the machine's load hits all of them alike); ``warmup`` untimed calls of
    each first. Returns one list of times per function."""
    return interleaved_wall_cpu_times(fns, repeats, warmup)[0]


def interleaved_wall_cpu_times(
    fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1
) -> tuple[list[list[float]], list[list[float]]]:
    """:func:`interleaved_times`, and also the process CPU time (s, all of this process' threads)
    of each call: ``(wall, cpu)``, one list per function each. On a machine shared with other jobs
    the wall time says how long it took here and now, the CPU time how much work it was."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return wall, cpu


def fmt_ms(ms: float) -> str:
    """A time in milliseconds for a table: 1,234 ms, 12.3 ms, 0.12 ms."""
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


# ------------------------------------------------------------------------------------------------
# Result files: one JSON per benchmark, markdown rendered from it
# ------------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    return str(o)


def _load_module(spec: str) -> ModuleType:
    if spec.endswith(".py"):
        path = ROOT / spec
        name = "_fastbald_bench_" + path.stem
        if name in sys.modules:
            return sys.modules[name]
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None or mspec.loader is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        mspec.loader.exec_module(mod)
        return mod
    return importlib.import_module(spec)


def renderer(name: str) -> Callable[[dict], str]:
    """The table renderer registered for result ``name`` (see RENDERERS)."""
    if name not in RENDERERS:
        raise KeyError(f"no renderer registered for benchmark result {name!r}; known: {sorted(RENDERERS)}")
    module, func = RENDERERS[name].rsplit(":", 1)
    return getattr(_load_module(module), func)


def write_results(res: dict, json_path: str | Path, render: Callable[[dict], str] | None = None) -> str:
    """Write ``res`` (which names its benchmark in ``res["benchmark"]``) to ``json_path`` and its
    markdown tables beside it (same name, ``.md``); returns the markdown. The markdown is rendered
    from the data as written (a JSON round trip), so ``render_results(json_path)`` reproduces it.
    ``render`` defaults to the renderer registered for the benchmark."""
    if "benchmark" not in res:
        raise ValueError("res must name its benchmark (res['benchmark'])")
    json_path = Path(json_path).with_suffix(".json")
    text = json.dumps(res, indent=1, default=_json_default) + "\n"
    md = (render or renderer(res["benchmark"]))(json.loads(text))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(json_path, text)
    _atomic_write(json_path.with_suffix(".md"), md)
    return md


def render_results(json_path: str | Path) -> str:
    """Re-render the markdown of a saved result file (``<name>.json`` -> ``<name>.md``)."""
    json_path = Path(json_path)
    res = json.loads(json_path.read_text())
    if "benchmark" not in res:
        raise ValueError(f"{json_path}: no 'benchmark' field (which renderer?)")
    md = renderer(res["benchmark"])(res)
    _atomic_write(json_path.with_suffix(".md"), md)
    return md


def _atomic_write(path: Path, text: str) -> None:
    from fastbald._io import atomic_write_bytes

    atomic_write_bytes(str(path), text.encode())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastbald.benchtools render [FILE.json ...]``: re-render result tables."""
    p = argparse.ArgumentParser(prog="python -m fastbald.benchtools", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="re-render <name>.md from <name>.json")
    r.add_argument("files", nargs="*", type=Path,
                   help=f"result files (default: every *.json in {RESULTS_DIR} with a renderer)")
    args = p.parse_args(argv)
    files = args.files or sorted(
        f for f in RESULTS_DIR.glob("*.json") if json.loads(f.read_text()).get("benchmark") in RENDERERS
    )
    for f in files:
        render_results(f)
        print(f"rendered {f.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
