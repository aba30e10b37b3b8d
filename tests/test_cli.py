"""Tests for the fastbald command line: help, argument errors, a tiny experiment, report, score
and the bench/selftest hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbald import cli
from fastbald.cli import main
from fastbald.loop import read_csv

REPO = Path(__file__).resolve().parents[1]
TINY = ["--synthetic", "400", "--rounds", "1", "--epochs", "2", "-T", "3", "--validation", "10",
        "--threads", "1"]


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--help"], ["experiment", "report", "score", "bench", "selftest"]),
        (["experiment", "--help"], ["mnist"]),
        (["experiment", "mnist", "--help"],
         ["--acquisition", "--pool-subset", "--preset", "Default: 100", "T=100", "resumes",
          "Gal, Islam & Ghahramani"]),
        (["report", "--help"], ["10% and 5%", "Table 1", "--out", "--plot"]),
        (["score", "--help"], ["--input", "--layout", "--top"]),
        (["bench", "--help"], ["bench"]),
    ],
)
def test_help(argv, expect, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in expect:
        assert word in out, word
    assert "%%" not in out  # an unformatted argparse escape (descriptions are not %-formatted)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fastbald ")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["experiment"], "required"),
        (["experiment", "mnist", "--acquisition", "coreset"], "unknown acquisition"),
        (["experiment", "mnist", "--epochs", "0"], "expected an integer >= 1"),
        (["experiment", "mnist", "--rounds", "ten"], "expected an integer"),
        (["experiment", "mnist", "--lr", "-1"], "expected a positive number"),
        (["experiment", "mnist", "--preset", "fast"], "invalid choice"),
        (["experiment", "mnist", "--pool-subset", "5", "--synthetic", "100"], "pool_subset"),
        # Data that cannot hold the protocol, or a missing MNIST root: an error line, no traceback.
        (["experiment", "mnist", "--synthetic", "500", "-q"], "the training set has 500 images"),
        (["experiment", "mnist", "-q", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["score"], "required"),
        (["score", "x.pt", "--input", "odds"], "invalid choice"),
    ],
)
def test_argument_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_experiment_report_roundtrip(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["experiment", "mnist", *TINY, "--acquisition", "bald", "Var Ratios",
               "--out", str(out), "--report"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "[BALD seed 0] round 1/1" in text and "[Var Ratios seed 0] round 0/1" in text
    assert "| BALD | 0 | 10 |" in text and "| Var Ratios | 0 | 10 |" in text
    assert (out / "test_error.png").exists()
    for name in ("bald_seed0", "variation_ratio_seed0"):
        assert read_csv(out / f"{name}.csv")["acquired"].tolist() == [0, 10]
        assert (out / "state" / name / "state.json").exists()
    # The same command again: nothing to do.
    assert main(["experiment", "mnist", *TINY, "--acquisition", "bald", "--out", str(out)]) == 0
    assert "complete" in capsys.readouterr().out
    # A different protocol in the same directory is refused with a clear message.
    assert main(["experiment", "mnist", *TINY, "-T", "4", "--out", str(out)]) == 1
    assert "different protocol" in capsys.readouterr().err
    # report subcommand
    md = tmp_path / "REPORT.md"
    assert main(["report", str(out), "--out", str(md)]) == 0
    assert "Table 1" in md.read_text() and (tmp_path / "test_error.png").exists()
    assert main(["report", str(tmp_path / "nothing-here")]) == 1
    assert "no such" in capsys.readouterr().err


def test_experiment_state_dir_and_stop_after(tmp_path, capsys):
    out, st = tmp_path / "res", tmp_path / "st"
    args = ["experiment", "mnist", *TINY, "--rounds", "2", "--out", str(out),
            "--state-dir", str(st), "-q"]
    assert main([*args, "--stop-after", "0"]) == 0
    assert read_csv(out / "bald_seed0.csv")["round"].tolist() == [0]
    assert (st / "bald_seed0" / "state.json").exists() and not (out / "state").exists()
    assert main(args) == 0
    assert read_csv(out / "bald_seed0.csv")["round"].tolist() == [0, 1, 2]
    assert capsys.readouterr().out == ""  # --quiet


def test_experiment_train_bf16_banner_and_state(tmp_path, capsys):
    out = tmp_path / "res"
    args = ["experiment", "mnist", *TINY, "--rounds", "0", "--out", str(out)]
    assert main([*args, "--train-bf16"]) == 0
    assert "2 epochs (bf16 autocast), batch 128" in capsys.readouterr().out
    state = json.loads((out / "state" / "bald_seed0" / "state.json").read_text())
    assert state["protocol"]["train_bf16"] is True
    assert main(args) == 1  # the saved run trained in bf16: a float32 resume is refused
    assert "train_bf16: False != True" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_score(tmp_path, capsys, suffix):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, 10, generator=g)
    f = tmp_path / f"pred{suffix}"
    if suffix == ".pt":
        torch.save(x, f)
    else:
        np.save(f, x.numpy())
    csv_out = tmp_path / "scores.csv"
    assert main(["score", str(f), "--top", "3", "--out", str(csv_out)]) == 0
    out = capsys.readouterr().out
    import fastbald

    best = fastbald.acquire(x, 3, "bald").tolist()
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[1]) for r in rows] == best
    assert "bald" in out and "(50, 8, 10)" in out
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("item,entropy") and len(lines) == 51


def test_score_errors(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing.pt")]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(3, 4), bad)
    assert main(["score", str(bad)]) == 1
    assert "3 dimensions" in capsys.readouterr().err


def test_score_batchbald_and_seeded_draws(tmp_path, capsys):
    """-m batchbald ranks the predictions (not their scores); the draws follow --seed."""
    import fastbald

    x = torch.randn(30, 8, 5, generator=torch.Generator().manual_seed(1))
    f = tmp_path / "z.pt"
    torch.save(x, f)
    assert main(["score", str(f), "-m", "batchbald", "-k", "3"]) == 0
    out = capsys.readouterr().out
    rows = [int(ln.split()[1]) for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    want = fastbald.acquire(x, 3, "batchbald", generator=torch.Generator().manual_seed(0))
    assert rows == want.tolist() and "3 chosen by batchbald (seed 0)" in out
    picks = []
    for seed in ("0", "0", "5"):
        assert main(["score", str(f), "-m", "random", "-k", "5", "--seed", seed]) == 0
        picks.append([ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()])
    assert picks[0] == picks[1] != picks[2]


def test_score_unreadable_files_and_outputs_are_error_lines(tmp_path, capsys):
    text = tmp_path / "garbage.pt"
    text.write_text("not a tensor file\n")
    npy = tmp_path / "garbage.npy"
    npy.write_bytes(b"\x00\x01nonsense")
    for f in (text, npy):
        assert main(["score", str(f)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fastbald score: error: ") and "cannot be read" in err and "Traceback" not in err
    good = tmp_path / "z.pt"
    torch.save(torch.randn(6, 3, 4), good)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["score", str(good), "-o", str(blocker / "out.csv")]) == 1  # parent is a file
    assert "error: cannot write" in capsys.readouterr().err


def test_score_reversed_and_big_endian_numpy(tmp_path, capsys):
    import fastbald

    a = np.random.default_rng(0).standard_normal((12, 4, 3)).astype(np.float32)
    ranks = []
    for arr in (a, a.astype(">f4")):
        np.save(tmp_path / "p.npy", arr)
        out = tmp_path / "s.pt"
        assert main(["score", str(tmp_path / "p.npy"), "-k", "4", "-o", str(out)]) == 0
        ranks.append([ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()])
        saved = torch.load(out, weights_only=True)  # tensors, loadable without pickle
        assert torch.equal(saved["bald"], fastbald.bald(torch.from_numpy(a)))
    assert ranks[0] == ranks[1]
    assert np.array_equal(fastbald.bald(a[::-1]), fastbald.bald(a)[::-1])


def test_score_output_through_a_symlink_or_into_a_fifo(tmp_path, capsys):
    """-o follows a symlink (the link stays, its target gets the scores) and writes into a FIFO
    (or /dev/stdout) in place: an atomic replace would swap those for a plain file."""
    import threading

    f = tmp_path / "z.pt"
    torch.save(torch.randn(7, 3, 4), f)
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert main(["score", str(f), "-o", str(link)]) == 0
    assert link.is_symlink() and target.read_text().startswith("item,entropy")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["score", str(f), "-o", str(fifo)]) == 0
    reader.join(timeout=30)
    assert got and got[0].startswith("item,entropy") and len(got[0].splitlines()) == 8
    assert fifo.is_fifo()


def test_sigterm_handler_keeps_an_ignored_or_foreign_sigterm():
    import signal

    old = signal.getsignal(signal.SIGTERM)
    try:
        for before in (signal.SIG_IGN, lambda *a: None):
            signal.signal(signal.SIGTERM, before)
            h = cli._SigtermAsInterrupt()
            assert signal.getsignal(signal.SIGTERM) is before
            h.restore()
            assert signal.getsignal(signal.SIGTERM) is before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        h = cli._SigtermAsInterrupt()
        assert signal.getsignal(signal.SIGTERM) == h._handle
        h.restore()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)


def test_score_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    f = tmp_path / "z.pt"
    torch.save(torch.randn(2000, 3, 4), f)
    cmd = f"{sys.executable} -m fastbald score {f} -k 0 | head -1"
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.stdout.count("\n") == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


@pytest.mark.parametrize("device", ["cdua", "cuda:0"])
def test_experiment_bad_device_is_an_error_line(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    rc = main(["experiment", "mnist", *TINY, "--rounds", "0", "--out", str(tmp_path), "--device", device])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastbald experiment mnist: error: --device {device}: ") and "Traceback" not in err
    assert not (tmp_path / "state").exists()


def test_plugin_hooks(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fastbald.bench")
    fake.main = lambda argv: calls.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastbald.bench", fake)
    assert main(["bench", "--size", "10", "-x"]) == 0
    assert calls == [["--size", "10", "-x"]]
    assert cli._cmd_plugin("not_a_module_xyz", []) == 2
    assert "not available" in capsys.readouterr().err
    nomain = types.ModuleType("fastbald.selftest")
    monkeypatch.setitem(sys.modules, "fastbald.selftest", nomain)
    assert main(["selftest"]) == 2
    assert "no main" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastbald", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "experiment" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastbald", "experiment", "mnist", "--seed", "x"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "expected an integer" in r.stderr


def test_protocol_flags_cover_every_field_and_reach_the_protocol(tmp_path, monkeypatch):
    """The protocol options are generated from LoopProtocol: one per field (but acquisition and
    seed), and each given value arrives in the run's protocol; unset ones keep the preset's."""
    import dataclasses

    import fastbald.experiments.mnist as mnist
    from fastbald.loop import LoopProtocol

    seen = []
    monkeypatch.setattr(mnist, "run_mnist", lambda a, s, out, protocol, **kw: seen.append(protocol) or [])
    fields = {f.name for f in dataclasses.fields(LoopProtocol)}
    assert {kw["dest"] for _, kw in cli.protocol_flags()} == fields - {"acquisition", "seed"}
    argv = ["experiment", "mnist", "--synthetic", "400", "-q", "--out", str(tmp_path),
            "--initial", "30", "--unbalanced-initial", "--validation", "7", "--per-round", "5",
            "--rounds", "3", "--epochs", "4", "--batch-size", "16", "--lr", "0.01",
            "--weight-decay-c", "0", "--weight-decay-scope", "dense", "-T", "9",
            "--pool-subset", "50", "--deterministic-model", "--score-block-size", "64",
            "--test-subset", "40", "--train-bf16", "--equal-batches", "--seed", "2"]
    assert main(argv) == 0
    want = LoopProtocol(acquisition="bald", seed=2, initial=30, balanced_initial=False,
                        validation=7, per_round=5, rounds=3, epochs=4, batch_size=16, lr=0.01,
                        weight_decay_c=0.0, weight_decay_scope="dense", T=9, pool_subset=50,
                        deterministic_model=True, score_block_size=64, test_subset=40,
                        train_bf16=True, equal_batches=True)
    assert seen == [want]
    # every field but acquisition differs from the default: the argv above covers them all
    assert LoopProtocol().differences(want, ignore=()) and len(LoopProtocol().differences(want, ignore=())) == len(fields) - 1
    # a preset's values stay unless given; "all" removes a preset's subset
    seen.clear()
    assert main(["experiment", "mnist", "--synthetic", "400", "-q", "--out", str(tmp_path),
                 "--preset", "demo", "--acquisition", "random", "--no-report"]) == 0
    assert (seen[0].pool_subset, seen[0].rounds, seen[0].T) == (2000, 10, 20)
    seen.clear()
    assert main(["experiment", "mnist", "--synthetic", "400", "-q", "--out", str(tmp_path),
                 "--preset", "demo", "--acquisition", "random", "--pool-subset", "all", "--no-report"]) == 0
    assert seen[0].pool_subset is None and seen[0].test_subset == 2000


@pytest.mark.parametrize(
    "kind, lo, strict, text, message",
    [
        (int, 1, False, "0", "expected an integer >= 1, got 0"),
        (int, 0, False, "1.5", "expected an integer, got '1.5'"),
        (float, 0, True, "0", "expected a positive number, got 0"),
        (float, 0, False, "nan", "expected a number >= 0, got nan"),
        (float, 0, False, "x", "expected a number, got 'x'"),
    ],
)
def test_number_parser(kind, lo, strict, text, message):
    import argparse

    parse = cli._number(kind, lo, strict=strict)
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace(".", r"\.")):
        parse(text)
    assert parse("3") == kind(3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["selftest", "--dtypes", ""], "--dtypes: none given; choose from float32"),
        (["selftest", "--dtypes", "float32,int8"], "--dtypes: unknown 'int8'; choose from float32"),
        (["bench", "--sizes", "0x5x4"], "sizes need N, T and C >= 1"),
        (["bench", "--from-json", "/nonexistent/r.json"], "error: --from-json /nonexistent/r.json"),
    ],
)
def test_selftest_and_bench_argument_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
