"""fastbald.benchtools: the benchmarks' shared timers, /proc memory, machine facts and result files."""

from __future__ import annotations

import json
import mmap
import time
from pathlib import Path

import numpy as np
import pytest

from fastbald import benchtools


def test_median_time_counts_calls_and_takes_the_median(monkeypatch):
    calls = []
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed calls: 1 s, 3 s, 2 s
    monkeypatch.setattr(benchtools.time, "perf_counter", lambda: next(clock))
    assert benchtools.median_time(lambda: calls.append(1), repeats=3, warmup=2) == 2.0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeats"):
        benchtools.median_time(lambda: None, repeats=0)


def test_interleaved_times_alternates_the_functions():
    order: list[str] = []
    times = benchtools.interleaved_times([lambda: order.append("a"), lambda: order.append("b")],
                                         repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)


def test_interleaved_wall_cpu_times_counts_this_process_work():
    def busy() -> None:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.02:
            pass

    wall, cpu = benchtools.interleaved_wall_cpu_times([busy, lambda: time.sleep(0.02)], repeats=2, warmup=0)
    assert [len(t) for t in wall + cpu] == [2, 2, 2, 2]
    assert all(c >= 0.02 for c in cpu[0]) and all(w >= 0.02 for w in wall[1])
    assert all(c < 0.01 for c in cpu[1])  # sleeping is wall time, not CPU time


def _touch_fresh_pages(n_bytes: int) -> None:
    """Map n_bytes of new anonymous memory, write every page, unmap it. Not through malloc: a
    malloc'ed buffer (numpy) can reuse resident free heap memory left by earlier tests (e.g. the
    PyTorch sort path of tests/test_stochastic.py leaves ~115 MB free inside glibc's heap), and
    the RSS does not rise at all."""
    buf = mmap.mmap(-1, n_bytes)
    try:
        for i in range(0, n_bytes, mmap.PAGESIZE):
            buf[i] = 1
    finally:
        buf.close()


def test_peak_rss_sees_an_allocation():
    if not benchtools.reset_peak_rss():
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    with benchtools.PeakRSS() as mem:
        _touch_fresh_pages(64 << 20)  # 64 MiB, every page touched
    assert mem.extra_mb is not None and 60 <= mem.extra_mb < 1024, mem.extra_mb
    # The peak mark is reset on entry: a block without an allocation, right after that 64 MiB
    # peak, sees (almost) nothing.
    with benchtools.PeakRSS() as idle:
        pass
    assert idle.extra_mb is not None and 0 <= idle.extra_mb < 16, idle.extra_mb
    assert benchtools.proc_status_mb("VmRSS") > 0
    assert benchtools.proc_status_mb("NoSuchField") is None


def test_machine_info_names_the_cpu_and_kernel():
    m = benchtools.machine_info(threads=3)
    assert m["threads"] == 3 and m["cores"] >= 1 and m["cpu"]
    assert {"torch", "python", "kernel", "capability", "date", "load_average"} <= set(m)


def test_write_results_renders_the_table_from_the_data_file(tmp_path, monkeypatch):
    monkeypatch.setitem(benchtools.RENDERERS, "toy", "tests/test_benchtools.py:_toy_table")
    res = {"benchmark": "toy", "rows": [{"n": 1, "ms": 2.5}, {"n": 2, "ms": float("nan")}],
           "count": np.int64(2)}
    md = benchtools.write_results(res, tmp_path / "toy.md")
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["count"] == 2 and saved["rows"][0] == {"n": 1, "ms": 2.5}
    assert md == (tmp_path / "toy.md").read_text() == _toy_table(saved)
    (tmp_path / "toy.md").write_text("stale")
    assert benchtools.render_results(tmp_path / "toy.json") == md == (tmp_path / "toy.md").read_text()
    with pytest.raises(ValueError, match="benchmark"):
        benchtools.write_results({"rows": []}, tmp_path / "x.json")
    with pytest.raises(KeyError, match="no renderer"):
        benchtools.renderer("nope")


def _toy_table(res: dict) -> str:
    return "| n | ms |\n|---|---|\n" + "".join(f"| {r['n']} | {r['ms']} |\n" for r in res["rows"])


@pytest.mark.parametrize("name", sorted(benchtools.RENDERERS))
def test_committed_tables_are_rendered_from_their_data(name):
    """Each benchmarks/results/<name>.md is what the benchmark's renderer makes of <name>.json."""
    path = benchtools.RESULTS_DIR / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not in this checkout")
    res = json.loads(path.read_text())
    assert res["benchmark"] == name
    assert benchtools.renderer(name)(res) == Path(path.with_suffix(".md")).read_text()
