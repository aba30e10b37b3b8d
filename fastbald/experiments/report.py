"""Report of MNIST active-learning runs next to the paper (Gal, Islam & Ghahramani 2017).

:func:`report` reads the per-round CSVs (``<acquisition>_seed<k>.csv``) of one or more
directories and returns a markdown table of the number of acquired images each acquisition
function needed to reach 10% and 5% test error (mean ± standard deviation over seeds), next to
the paper's Table 1, then how many times as many images Random acquisition needed as each
function (:func:`random_ratio_table`, the paper's headline comparison), and draws test error
against acquired images, one curve per acquisition function (the paper's Figure 1, which plots
the same curves as test accuracy).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..loop import read_csv
from ..metrics import ACQUISITIONS, DISPLAY_NAMES, canonical_acquisition

__all__ = [
    "BEGIN_MARK",
    "END_MARK",
    "PAPER_TABLE1",
    "THRESHOLDS",
    "Run",
    "images_to_reach",
    "load_runs",
    "mean_curve_to_reach",
    "plot_runs",
    "random_ratio_table",
    "report",
    "summary_table",
]

#: The paper's Table 1: images acquired to reach 10% and 5% test error on MNIST.
PAPER_TABLE1: dict[str, tuple[int, int]] = {
    "bald": (145, 335),
    "variation_ratio": (120, 295),
    "entropy": (165, 355),
    "mean_std": (230, 695),
    "random": (255, 835),
}

#: Table 1's runs start from this many labelled images.
PAPER_INITIAL = 20

#: Markers around the generated part of a report file: ``report(out=...)`` on an existing file
#: that holds both replaces only what lies between them, keeping hand-written text around it.
BEGIN_MARK = "<!-- fastbald report: generated, do not edit by hand (begin) -->"
END_MARK = "<!-- fastbald report: generated (end) -->"

#: Test-error thresholds of the table.
THRESHOLDS: tuple[float, float] = (0.10, 0.05)

_NAME = re.compile(r"^(?P<acq>.+)_seed(?P<seed>\d+)\.csv$")


@dataclass
class Run:
    """One run's per-round results (from its CSV)."""

    acquisition: str
    seed: int
    path: Path
    acquired: np.ndarray
    labelled: np.ndarray
    test_error: np.ndarray
    train_seconds: np.ndarray
    score_seconds: np.ndarray

    @property
    def max_acquired(self) -> int:
        """Images acquired by the last completed round."""
        return int(self.acquired.max()) if self.acquired.size else 0


def images_to_reach(run: Run, threshold: float) -> int | None:
    """Acquired images at the first round whose test error is <= ``threshold`` (None if none)."""
    hit = np.nonzero(run.test_error <= threshold + 1e-12)[0]
    return int(run.acquired[hit[0]]) if hit.size else None


def mean_curve_to_reach(runs: Sequence[Run], threshold: float) -> int | None:
    """Acquired images at which the seed-averaged test-error curve first gets to ``threshold``.

    The authors' code averaged the test accuracy over its repeats (``Average_Accuracy``), so
    Table 1 can be read off the mean curve; a run's first crossing can be an early dip, so the
    mean curve usually crosses later than the seeds' first crossings do on average. Only rounds
    every run has reached are averaged;
    None if the mean curve does not get there within them.
    """
    if not runs:
        raise ValueError("mean_curve_to_reach needs at least one run")
    common = sorted(set.intersection(*(set(r.acquired.tolist()) for r in runs)))
    for a in common:
        errs = [float(r.test_error[np.searchsorted(r.acquired, a)]) for r in runs]
        if np.mean(errs) <= threshold + 1e-12:
            return int(a)
    return None


def _csv_files(d: Path) -> list[Path]:
    if d.is_file():
        return [d]
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory or CSV file")
    return sorted(p for p in d.iterdir() if p.is_file() and _NAME.match(p.name))


def load_runs(dirs: Sequence[str | os.PathLike[str]]) -> dict[str, list[Run]]:
    """``{acquisition: [Run, ...]}`` from the ``<acquisition>_seed<k>.csv`` files of ``dirs``
    (directories, or CSV files), in the paper's order; empty CSVs are skipped with a warning.
    The same (acquisition, seed) found twice raises ValueError."""
    runs: dict[str, list[Run]] = {}
    seen: dict[tuple[str, int], Path] = {}
    for d in dirs:
        for path in _csv_files(Path(d)):
            m = _NAME.match(path.name)
            if m is None:
                raise ValueError(f"{path}: expected a file named <acquisition>_seed<k>.csv")
            try:
                acq = canonical_acquisition(m["acq"])
            except ValueError:
                warnings.warn(f"{path}: unknown acquisition {m['acq']!r}, skipped", stacklevel=2)
                continue
            seed = int(m["seed"])
            if (acq, seed) in seen:
                raise ValueError(f"{acq} seed {seed} found twice: {seen[acq, seed]} and {path}")
            seen[acq, seed] = path
            cols = read_csv(path)
            if cols["round"].size == 0:
                warnings.warn(f"{path}: no rounds yet, skipped", stacklevel=2)
                continue
            order = np.argsort(cols["acquired"], kind="stable")
            _check_run_columns(path, cols, order)
            runs.setdefault(acq, []).append(
                Run(
                    acq,
                    seed,
                    path,
                    cols["acquired"][order],
                    cols["labelled"][order],
                    cols["test_error"][order],
                    cols["train_seconds"][order],
                    cols["score_seconds"][order],
                )
            )
    ordered = {a: sorted(runs[a], key=lambda r: r.seed) for a in ACQUISITIONS if a in runs}
    for rs in ordered.values():
        _check_same_schedule(rs)
    return ordered


def _check_run_columns(path: Path, cols: dict[str, np.ndarray], order: np.ndarray) -> None:
    """A run's CSV must have one row per acquired count and test errors in [0, 1]."""
    acquired = cols["acquired"][order]
    rep = np.nonzero(np.diff(acquired) == 0)[0]
    if rep.size:
        raise ValueError(
            f"{path}: {int(acquired[rep[0]])} acquired images appear in more than one row "
            "(a CSV holds one row per round)"
        )
    err = cols["test_error"]
    bad = np.nonzero(~(np.isfinite(err) & (err >= 0) & (err <= 1)))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: test_error of round {int(cols['round'][i])} is {float(err[i])!r}, "
            "not a rate in [0, 1]"
        )


def _schedule(run: Run) -> tuple[int, int | None]:
    """``(initial labelled images, images acquired per round)`` of a run (None: one round)."""
    initial = int(run.labelled[0] - run.acquired[0])
    step = int(run.acquired[1] - run.acquired[0]) if run.acquired.size > 1 else None
    return initial, step


def _initial_sizes(runs: dict[str, list[Run]]) -> list[int]:
    """The initial labelled-set sizes the runs started from, sorted."""
    return sorted({_schedule(r)[0] for rs in runs.values() for r in rs})


def initial_phrase(runs: dict[str, list[Run]]) -> str:
    """``"the 20 initial labelled images"`` (or each size, when the runs differ)."""
    sizes = _initial_sizes(runs)
    if len(sizes) == 1:
        return f"the {sizes[0]} initial labelled images"
    return "each run's initial labelled images (" + ", ".join(map(str, sizes)) + ")"


def _check_same_schedule(runs: list[Run]) -> None:
    """The seeds of one acquisition function are averaged: they must share the initial set size
    and the images acquired per round."""
    first = runs[0]
    i0, s0 = _schedule(first)
    for r in runs[1:]:
        i1, s1 = _schedule(r)
        if i1 != i0 or (s0 is not None and s1 is not None and s1 != s0):
            raise ValueError(
                f"{first.path} ({i0} initial, {s0} per round) and {r.path} ({i1} initial, {s1} "
                "per round) cannot be averaged: put runs of different protocols in different "
                "reports"
            )


def _cell(values: list[int | None], runs: list[Run], paper: int | None = None) -> str:
    reached = [v for v in values if v is not None]
    horizon = max(r.max_acquired for r in runs)
    if not reached:
        return f"not reached (> {horizon})"
    mean = float(np.mean(reached))
    if len(reached) == 1:
        s = f"{reached[0]}"
    else:
        s = f"{mean:.0f} ± {np.std(reached, ddof=1):.0f}"
    if len(reached) == len(values):
        if paper:  # every seed got there: the mean vs the paper's value
            s += f" ({100 * (mean / paper - 1):+.0f}%)"
    else:
        missing = [r for r, v in zip(runs, values, strict=True) if v is None]
        hz = max(r.max_acquired for r in missing)
        s += f" ({len(reached)}/{len(values)} seeds; others not reached by {hz})"
    return s


def summary_table(runs: dict[str, list[Run]]) -> str:
    """The markdown table (see :func:`report`)."""
    lines = [
        "| Acquisition | Seeds | Acquired so far | 10% error: fastbald | 10%: mean curve "
        "| 10%: paper | 5% error: fastbald | 5%: mean curve | 5%: paper | Final test error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for acq, rs in runs.items():
        paper = PAPER_TABLE1.get(acq)
        cells = []
        for i, thr in enumerate(THRESHOLDS):
            cells.append(
                _cell([images_to_reach(r, thr) for r in rs], rs, paper[i] if paper else None)
            )
            mc = mean_curve_to_reach(rs, thr)
            horizon = min(r.max_acquired for r in rs)
            cells.append(str(mc) if mc is not None else f"not reached (> {horizon})")
            cells.append(str(paper[i]) if paper else "–")
        # The final error of the runs that got furthest: averaging a run still at round 3 with
        # finished ones would mix two points of the curve.
        furthest = max(r.max_acquired for r in rs)
        finals = [100 * float(r.test_error[-1]) for r in rs if r.max_acquired == furthest]
        final = (
            f"{finals[0]:.2f}%"
            if len(finals) == 1
            else f"{np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f}%"
        )
        if len(finals) < len(rs):
            final += f" ({len(finals)}/{len(rs)} seeds, at {furthest})"
        acquired = sorted({r.max_acquired for r in rs})
        acq_s = str(acquired[0]) if len(acquired) == 1 else f"{acquired[0]}–{acquired[-1]}"
        seeds = ", ".join(str(r.seed) for r in rs)
        lines.append(
            f"| {DISPLAY_NAMES[acq]} | {seeds} | {acq_s} | " + " | ".join(cells) + f" | {final} |"
        )
    return "\n".join(lines)


def _mean_if_all(values: list[int | None]) -> float | None:
    """The mean of ``values`` when every one is known (every seed reached the threshold)."""
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def random_ratio_table(runs: dict[str, list[Run]]) -> str:
    """A markdown table of how many times as many images Random acquisition needed as each
    other function to reach 10% and 5% test error (the paper's headline comparison), next to
    the same ratio in the paper's Table 1; "" when there are no Random runs.

    Each cell is Random's mean over its seeds divided by the function's mean over its seeds
    (the means of :func:`summary_table`; "–" unless every seed of both reached the threshold),
    then the ratio seed by seed for the seeds both have (same seed: same initial labelled set),
    "–" for a seed where either run has not got there (or the function was there before
    acquiring anything: no ratio).
    """
    if "random" not in runs:
        return ""
    rand = {r.seed: r for r in runs["random"]}
    rand_mean = [_mean_if_all([images_to_reach(r, thr) for r in rand.values()]) for thr in THRESHOLDS]
    lines = [
        "| Acquisition | 10%: Random / function | 10%: paper | 5%: Random / function | 5%: paper |",
        "|---|---|---|---|---|",
    ]
    for acq, rs in runs.items():
        if acq == "random":
            continue
        paper = PAPER_TABLE1.get(acq)
        cells = []
        for i, thr in enumerate(THRESHOLDS):
            num = rand_mean[i]
            den = _mean_if_all([images_to_reach(r, thr) for r in rs])
            cell = f"{num / den:.2f}x" if num is not None and den else "–"
            per_seed = []
            for r in rs:
                if r.seed not in rand:
                    continue
                a, b = images_to_reach(rand[r.seed], thr), images_to_reach(r, thr)
                per_seed.append(f"{a / b:.2f}" if a is not None and b else "–")
            if per_seed:
                cell += " (per seed: " + ", ".join(per_seed) + ")"
            cells.append(cell)
            cells.append(f"{PAPER_TABLE1['random'][i] / paper[i]:.2f}x" if paper else "–")
        lines.append(f"| {DISPLAY_NAMES[acq]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(
    runs: dict[str, list[Run]],
    path: str | os.PathLike[str],
    *,
    title: str = "MNIST active learning: test error vs acquired images",
    ymax: float | str | None = "auto",
    paper_marks: bool = True,
) -> Path:
    """Plot test error (%) against acquired images, one curve per acquisition function (the mean
    over seeds, with the min–max band when there are several), with the 10% and 5% lines.

    ``ymax`` clips the y axis (in %) so that the region the table is about stays readable (the
    first rounds, at 20 labelled images, sit far above it); ``None`` shows everything;
    ``"auto"``: 25% once some run gets below 10% error, else everything.
    ``paper_marks`` adds triangles at the paper's Table 1 values (where the paper's curve of the
    same colour crosses 10% and 5%).
    Writes a PNG (or any format matplotlib knows from the suffix) and returns its path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "the test-error plot needs matplotlib: pip install matplotlib (or skip the plot: "
            "report(..., plot=False), fastbald report --no-plot)"
        ) from e

    colors = {
        "bald": "tab:red",
        "variation_ratio": "tab:blue",
        "entropy": "tab:green",
        "mean_std": "tab:purple",
        "random": "black",
    }
    # Functions outside Table 1 (checks, extras): each its own colour, dashed.
    spare = iter(["tab:orange", "tab:cyan", "tab:brown", "tab:olive", "tab:pink", "tab:gray",
                  "gold", "navy", "lime", "maroon"])
    for acq in runs:
        if acq not in colors:
            colors[acq] = next(spare, None)  # None: matplotlib's cycle, past ten extras
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    clipped = False
    marked = False
    x_max = max(r.max_acquired for rs in runs.values() for r in rs)
    if ymax == "auto":
        best = min(float(r.test_error.min()) for rs in runs.values() for r in rs)
        ymax = 25.0 if best <= THRESHOLDS[0] else None
    elif isinstance(ymax, str):
        raise ValueError(f"ymax must be a number, None or 'auto', got {ymax!r}")
    for acq, rs in runs.items():
        grid = np.unique(np.concatenate([r.acquired for r in rs]))
        ys = np.full((len(rs), grid.size), np.nan)
        for i, r in enumerate(rs):
            pos = np.searchsorted(grid, r.acquired)
            ys[i, pos] = 100 * r.test_error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns beyond a short run
            mean = np.nanmean(ys, axis=0)
            lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
        n_seeds = np.sum(~np.isnan(ys), axis=0)
        color = colors.get(acq)
        seeds = f"{len(rs)} seeds" if len(rs) > 1 else f"seed {rs[0].seed}"
        label = f"{DISPLAY_NAMES[acq]} ({seeds})"
        ax.plot(grid, mean, color=color, lw=1.6, label=label,
                ls="-" if acq in PAPER_TABLE1 else "--")
        if len(rs) > 1:
            band = n_seeds > 1
            ax.fill_between(grid[band], lo[band], hi[band], color=color, alpha=0.15, lw=0)
        if ymax is not None and np.nanmax(hi) > ymax:
            clipped = True
        marks = [
            (x, 100 * t)
            for x, t in zip(PAPER_TABLE1.get(acq, ()), THRESHOLDS, strict=False)
            if x <= x_max
        ]
        if paper_marks and marks:
            ax.plot(
                [m[0] for m in marks], [m[1] for m in marks], ls="none", marker="v",
                ms=7, mec="white", mew=0.8, color=color, zorder=5,
            )
            marked = True
    for thr, style in zip(THRESHOLDS, ("--", ":"), strict=True):
        ax.axhline(100 * thr, color="gray", ls=style, lw=1)
        ax.annotate(
            f"{100 * thr:.0f}% error",
            xy=(0.0, 100 * thr),
            xycoords=("axes fraction", "data"),
            xytext=(4, 3),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=8,
            color="gray",
        )
    ax.set_xlabel(f"acquired images (after {initial_phrase(runs)})")
    ylabel = "test error (%)"
    if clipped:
        ylabel = f"test error (%; axis cut at {ymax:g}%)"
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    if ymax is not None:
        ax.set_ylim(0, ymax)
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    if marked:
        ax.plot([], [], ls="none", marker="v", color="gray", label="paper, Table 1 (10% / 5%)")
    ax.legend(loc="upper right", fontsize=9, frameon=True)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def report(
    dirs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | bool | None = None,
) -> str:
    """A markdown report of the runs found in ``dirs``, next to the paper's Table 1.

    Args:
        dirs: directories holding ``<acquisition>_seed<k>.csv`` files (or the files).
        out: also write the markdown there (e.g. ``benchmarks/results/mnist/REPORT.md``). A
            file there that holds :data:`BEGIN_MARK` and :data:`END_MARK` keeps everything
            outside them (a hand-written analysis around the generated tables); otherwise it is
            replaced.
        plot: where to draw the test-error plot (PNG). Default: ``test_error.png`` next to
            ``out``, else in the first directory; ``False``: no plot.

    Returns:
        The markdown (a table of images acquired to reach 10% / 5% test error per acquisition
        function, mean ± sample standard deviation over seeds and its difference to the paper in
        per cent (when every seed got there), "not reached (> n)" when a run never got there
        within its n acquired images; the same on the seed-averaged curve
        (:func:`mean_curve_to_reach`); the paper's values alongside; the final test error, over
        the seeds that got furthest when some are still running); then, when there are Random
        runs, :func:`random_ratio_table`.
    """
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    if not dirs:
        raise ValueError("report needs at least one directory")
    runs = load_runs(dirs)
    if not runs:
        raise FileNotFoundError(
            "no results found: expected <acquisition>_seed<k>.csv files in "
            + ", ".join(str(d) for d in dirs)
        )
    title = "# MNIST active learning: fastbald vs Gal, Islam & Ghahramani (2017), Table 1"
    caveat = (
        ""
        if _initial_sizes(runs) == [PAPER_INITIAL]
        else f" These runs do not start from the paper's {PAPER_INITIAL} labelled images: its "
        "columns are not like for like."
    )
    parts = [
        f"Images acquired (beyond {initial_phrase(runs)}) until the test error first "
        "reaches 10% and 5%. fastbald: mean ± sample standard deviation over seeds "
        "(a single number for one seed) and, once every seed got there, its difference to the "
        "paper in per cent; mean curve: where the seed-averaged test error first gets there (the "
        f"authors' code averaged its repeats' curves); paper: Table 1.{caveat}",
        "",
        summary_table(runs),
        "",
    ]
    ratios = random_ratio_table(runs)
    if ratios:
        parts += [
            "How many times as many images Random acquisition needed as each function (Random's "
            "mean / the function's mean, then seed by seed for the seeds both have; paper: the "
            "same ratio in Table 1):",
            "",
            ratios,
            "",
        ]
    plot_path: Path | None = None
    if plot is not False:
        if plot is None or plot is True:
            if out is not None:
                plot_path = Path(out).parent / "test_error.png"
            else:
                first = Path(dirs[0])
                plot_path = (first.parent if first.is_file() else first) / "test_error.png"
        else:
            plot_path = Path(plot)
        plot_runs(runs, plot_path)
        # The link is read relative to the markdown file (or to here when printed).
        rel = os.path.relpath(plot_path, Path(out).parent if out is not None else Path.cwd())
        parts += [f"![test error vs acquired images]({Path(rel).as_posix()})"]
    body = "\n".join(parts).rstrip("\n")
    text = f"{title}\n\n{BEGIN_MARK}\n{body}\n{END_MARK}\n"
    if out is not None:
        from .._io import atomic_write_bytes

        out = Path(out)
        head, begin, rest = (out.read_text() if out.is_file() else "").partition(BEGIN_MARK)
        _, end, tail = rest.partition(END_MARK)
        if begin and end:  # keep the hand-written text around the generated block
            text_out = f"{head}{BEGIN_MARK}\n{body}\n{END_MARK}{tail}"
        else:
            text_out = text
        atomic_write_bytes(out, text_out.encode())
    return text

