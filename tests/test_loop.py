"""Tests for fastbald.loop: protocol validation, the initial split, a tiny run, atomic resumable
state and kill-and-resume equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fastbald
from fastbald.data import synthetic_mnist_like
from fastbald.loop import (
    ACQUISITIONS,
    CSV_COLUMNS,
    ActiveLearningLoop,
    LoopProtocol,
    StateLockedError,
    StateMismatchError,
    canonical_acquisition,
    read_csv,
    split_initial,
)

REPO = Path(__file__).resolve().parents[1]

# Small and fast: 400 synthetic images, 2 epochs, T=4.
TINY = {"rounds": 2, "epochs": 2, "T": 4, "validation": 20, "per_round": 10}


@pytest.fixture(scope="module")
def data():
    return synthetic_mnist_like(400, seed=0, n_test=100)


def _key(records):
    return [(r.round, r.labelled, r.acquired, r.test_error, r.val_error, r.train_loss,
             r.new_indices, r.pool_size, r.scored) for r in records]


class Boom(Exception):
    pass


def _stop_after(round_):
    def cb(loop, rec):
        if rec.round == round_:
            raise Boom(f"simulated kill after round {round_}")

    return cb


# ------------------------------------------------------------------------------------------------
def test_canonical_acquisition():
    assert canonical_acquisition("BALD") == "bald"
    assert canonical_acquisition("Max Entropy") == "entropy"
    assert canonical_acquisition("var-ratios") == "variation_ratio"
    assert canonical_acquisition("Mean STD") == "mean_std"
    for a in ACQUISITIONS:
        assert canonical_acquisition(a) == a
    with pytest.raises(ValueError, match="unknown acquisition"):
        canonical_acquisition("coreset")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rounds": -1}, "rounds"),
        ({"epochs": 0}, "epochs"),
        ({"T": 0}, "T must"),
        ({"per_round": 0}, "per_round"),
        ({"pool_subset": 5}, "pool_subset"),
        ({"test_subset": 0}, "test_subset"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay_scope": "all"}, "weight_decay_scope"),
        ({"seed": -1}, "seed"),
        ({"acquisition": "nope"}, "unknown acquisition"),
    ],
)
def test_protocol_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LoopProtocol(**kw)


def test_protocol_defaults_are_the_papers():
    p = LoopProtocol()
    assert (p.initial, p.validation, p.per_round, p.rounds) == (20, 100, 10, 100)
    assert (p.epochs, p.batch_size, p.lr, p.weight_decay_c, p.T) == (50, 128, 1e-3, 3.5, 100)
    assert p.balanced_initial and p.pool_subset is None and p.weight_decay_scope == "paper"
    assert LoopProtocol.from_dict(p.to_dict()) == p
    assert p.differences(LoopProtocol(rounds=5)) == []
    assert p.differences(LoopProtocol(T=20)) == ["T: 100 != 20"]


def test_split_is_balanced_disjoint_and_seeded(data):
    p = LoopProtocol(validation=50, rounds=10)
    init, val = split_initial(data.y_train, p, 10)
    assert init.numel() == 20 and val.numel() == 50
    assert torch.bincount(data.y_train[init], minlength=10).tolist() == [2] * 10
    assert not set(init.tolist()) & set(val.tolist())
    init2, val2 = split_initial(data.y_train, p, 10)
    assert torch.equal(init, init2) and torch.equal(val, val2)
    init3, _ = split_initial(data.y_train, LoopProtocol(validation=50, rounds=10, seed=1), 10)
    assert not torch.equal(init, init3)
    odd, _ = split_initial(data.y_train, LoopProtocol(initial=13, validation=0, rounds=0), 10)
    counts = torch.bincount(data.y_train[odd], minlength=10)
    assert odd.numel() == 13 and counts.min() == 1 and counts.max() == 2
    with pytest.raises(ValueError, match="fewer than"):
        split_initial(data.y_train, LoopProtocol(rounds=1000), 10)


def test_tiny_run(data, tmp_path):
    p = LoopProtocol(acquisition="bald", **TINY)
    seen = []
    loop = ActiveLearningLoop(
        data, p, state_dir=tmp_path / "st", csv_path=tmp_path / "r.csv",
        callbacks=[lambda lp, r: seen.append(r.round)],
    )
    recs = loop.run()
    assert seen == [0, 1, 2] and loop.done
    assert [r.labelled for r in recs] == [20, 30, 40]
    assert [r.acquired for r in recs] == [0, 10, 20]
    assert recs[0].new_indices == [] and recs[0].score_seconds == 0.0
    pool0 = 400 - 20 - 20
    assert [r.pool_size for r in recs] == [pool0, pool0, pool0 - 10]
    assert [r.scored for r in recs] == [0, pool0, pool0 - 10]
    labelled = loop.labelled_indices
    assert len(set(labelled)) == 40 and not set(labelled) & set(loop.validation_indices)
    assert labelled[20:] == recs[1].new_indices + recs[2].new_indices
    assert all(0.0 <= r.test_error <= 1.0 for r in recs)
    # CSV: the required columns, one row per round
    cols = read_csv(tmp_path / "r.csv")
    assert list(cols) == list(CSV_COLUMNS)
    assert cols["round"].tolist() == [0, 1, 2] and cols["labelled"].tolist() == [20, 30, 40]
    assert cols["test_error"].tolist() == pytest.approx([r.test_error for r in recs], abs=1e-6)
    # State of a finished run: the JSON only (no model checkpoint, no temporary files)
    st = json.loads((tmp_path / "st" / "state.json").read_text())
    assert st["rounds_done"] == 3 and st["labelled_indices"] == labelled
    assert st["protocol"]["acquisition"] == "bald" and st["checkpoint"] is None
    assert sorted(f.name for f in (tmp_path / "st").iterdir()) == ["state.json"]
    with pytest.raises(RuntimeError, match="complete"):
        loop.step()


def test_acquired_are_the_top_scored(data):
    """Round 1's acquisitions are the top-k of score_pool over the remaining pool."""
    from fastbald.loop import _SEED_SCORE
    from fastbald.pool import score_pool

    p = LoopProtocol(acquisition="entropy", **{**TINY, "rounds": 1})
    loop = ActiveLearningLoop(data, p)
    loop.step()
    model = loop.model
    pool = loop.pool_indices()
    rec = loop.step()
    res = score_pool(model, data.x_train[pool], T=p.T, method="entropy", k=10,
                     seed=loop.round_seed(1, _SEED_SCORE), progress=False)
    assert rec.new_indices == pool[res.topk].tolist()


@pytest.mark.parametrize("acq", ["random", "margin"])
def test_pool_subset_and_other_acquisitions(data, acq):
    p = LoopProtocol(acquisition=acq, pool_subset=50, test_subset=40, **TINY)
    loop = ActiveLearningLoop(data, p)
    recs = loop.run()
    assert loop.x_test.shape[0] == 40
    assert [r.scored for r in recs] == ([0, 0, 0] if acq == "random" else [0, 50, 50])
    assert len(set(loop.labelled_indices)) == 40


def test_same_seed_same_result_and_seeds_differ(data):
    p = LoopProtocol(acquisition="bald", **{**TINY, "rounds": 1})
    a = ActiveLearningLoop(data, p).run()
    torch.manual_seed(12345)  # the loop must not depend on the global RNG state
    b = ActiveLearningLoop(data, p).run()
    assert _key(a) == _key(b)
    c = ActiveLearningLoop(data, LoopProtocol(acquisition="bald", seed=1, **{**TINY, "rounds": 1}))
    assert _key(c.run()) != _key(a)


@pytest.mark.parametrize("acq", ["bald", "random"])
def test_resume_after_simulated_kill_matches_uninterrupted(data, tmp_path, acq):
    p = LoopProtocol(acquisition=acq, pool_subset=200, **{**TINY, "rounds": 3})
    full_loop = ActiveLearningLoop(data, p)
    full = full_loop.run()

    st = tmp_path / "st"
    with pytest.raises(Boom):
        ActiveLearningLoop(data, p, state_dir=st, csv_path=tmp_path / "r.csv",
                           callbacks=[_stop_after(1)]).run()
    assert read_csv(tmp_path / "r.csv")["round"].tolist() == [0, 1]
    # Mid-run, the last model is kept only if the next round scores the pool with it.
    ckpts = sorted(f.name for f in st.glob("*.pt"))
    assert ckpts == ([] if acq == "random" else ["round_0001.pt"])
    torch.manual_seed(999)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed = ActiveLearningLoop(data, p, state_dir=st, csv_path=tmp_path / "r.csv")
    assert resumed.next_round == 2
    assert (resumed.model is not None) == (acq != "random")
    rest = resumed.run()
    assert _key(rest) == _key(full)
    assert resumed.labelled_indices == full_loop.labelled_indices
    assert read_csv(tmp_path / "r.csv")["test_error"].tolist() == pytest.approx(
        [r.test_error for r in full], abs=1e-6)


def test_environment_is_recorded_and_a_changed_one_warns_on_resume(data, tmp_path):
    p = LoopProtocol(**{**TINY, "rounds": 3})
    st = tmp_path / "st"
    threads = torch.get_num_threads()
    with pytest.raises(Boom):
        ActiveLearningLoop(data, p, state_dir=st, callbacks=[_stop_after(1)]).run()
    envs = json.loads((st / "state.json").read_text())["environments"]
    assert envs == [{"from_round": 0, "torch": torch.__version__, "fastbald": fastbald.__version__,
                     "threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "device": "cpu"}]
    with warnings.catch_warnings():  # same environment: silent
        warnings.simplefilter("error", RuntimeWarning)
        ActiveLearningLoop(data, p, state_dir=st)
    other = 2 if threads == 1 else 1
    torch.set_num_threads(other)
    try:
        with pytest.warns(RuntimeWarning, match=rf"resuming at round 2 with threads {threads} -> {other}"):
            loop = ActiveLearningLoop(data, p, state_dir=st)
        loop.run()
    finally:
        torch.set_num_threads(threads)
    envs = json.loads((st / "state.json").read_text())["environments"]
    assert [(e["from_round"], e["threads"]) for e in envs] == [(0, threads), (2, other)]
    # A finished run does not warn (nothing more will run), nor does a state from before the
    # environments were recorded.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ActiveLearningLoop(data, p, state_dir=st)
        raw = json.loads((st / "state.json").read_text())
        del raw["environments"]
        raw["records"], raw["rounds_done"] = raw["records"][:2], 2
        raw["labelled_indices"] = raw["labelled_indices"][: raw["records"][-1]["labelled"]]
        (st / "state.json").write_text(json.dumps(raw))
        assert ActiveLearningLoop(data, p, state_dir=st).environments == []


def test_rounds_can_be_extended_but_protocol_must_match(data, tmp_path):
    """A finished run keeps no model; raising its rounds retrains the last round's model from the
    saved labelled set (it reproduces the recorded loss and error: no warning) and continues
    exactly as an uninterrupted run."""
    st = tmp_path / "st"
    short = LoopProtocol(acquisition="bald", **{**TINY, "rounds": 1})
    ActiveLearningLoop(data, short, state_dir=st).run()
    assert sorted(f.name for f in st.iterdir()) == ["state.json"]
    longer = LoopProtocol(acquisition="bald", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loop = ActiveLearningLoop(data, longer, state_dir=st)
    assert loop.next_round == 2 and loop.model is not None
    extended = loop.run()
    assert _key(extended) == _key(ActiveLearningLoop(data, longer).run())
    with pytest.raises(StateMismatchError, match="T: 5 != 4"):
        ActiveLearningLoop(data, LoopProtocol(acquisition="bald", **{**TINY, "T": 5}),
                           state_dir=st)
    other = synthetic_mnist_like(400, seed=1, n_test=100)
    with pytest.raises(StateMismatchError, match="different data"):
        ActiveLearningLoop(other, longer, state_dir=st)
    fresh = ActiveLearningLoop(data, LoopProtocol(acquisition="bald", **{**TINY, "T": 5}),
                               state_dir=st, restart=True)
    assert fresh.next_round == 0


def test_corrupt_state_is_reported(data, tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "state.json").write_text("{not json")
    with pytest.raises(StateMismatchError, match="cannot read"):
        ActiveLearningLoop(data, LoopProtocol(**TINY), state_dir=st)


def test_bad_data_is_named(data):
    from dataclasses import replace

    proto = LoopProtocol(**TINY)
    cases = [
        (replace(data, x_train=data.x_train.double(), x_test=data.x_test.double()), TypeError,
         r"needs float32 images, data.x_train is torch.float64"),
        (replace(data, x_test=data.x_test.double()), TypeError, r"differ in dtype"),
        (replace(data, x_train=(data.x_train * 255).to(torch.uint8)), TypeError,
         r"data.x_train must hold floating-point images, got torch.uint8"),
        (replace(data, y_train=data.y_train.float()), TypeError,
         r"data.y_train must hold integer class labels, got torch.float32"),
        (replace(data, y_test=data.y_test[:, None]), ValueError, r"data.y_test must be 1-D"),
    ]
    y = data.y_train.clone()
    y[[7, 9]] = torch.tensor([10, -1])
    cases.append((replace(data, y_train=y), ValueError,
                  r"data.y_train\[7\] = 10 is not a class label in \[0, 10\) \(2 such labels\)"))
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match):
            ActiveLearningLoop(bad, proto)
    # int32 labels are fine (trained on as int64): the same run as with int64 labels.
    a = ActiveLearningLoop(replace(data, y_train=data.y_train.int(), y_test=data.y_test.int()), proto)
    b = ActiveLearningLoop(data, proto)
    assert _key(a.run(1)) == _key(b.run(1))


def test_training_is_stopped_cleanly_by_an_exception(data, tmp_path, monkeypatch):
    """An error inside a round leaves the committed state of the previous round untouched."""
    p = LoopProtocol(acquisition="bald", **TINY)
    loop = ActiveLearningLoop(data, p, state_dir=tmp_path / "st")
    loop.step()
    before = (tmp_path / "st" / "state.json").read_bytes()
    labelled = list(loop.labelled_indices)

    def fail(*a, **k):
        raise Boom("in training")

    monkeypatch.setattr(loop, "_train", fail)
    with pytest.raises(Boom):
        loop.step()
    assert loop.labelled_indices == labelled and loop.next_round == 1
    assert (tmp_path / "st" / "state.json").read_bytes() == before
    assert not [f for f in (tmp_path / "st").iterdir() if f.name.startswith(".")]


_CLI_RUN = [sys.executable, "-m", "fastbald", "experiment", "mnist", "--synthetic", "400",
            "--acquisition", "bald", "--rounds", "3", "--epochs", "2", "-T", "4",
            "--validation", "20", "--threads", "1", "--quiet"]
_CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_for_rounds(proc: subprocess.Popen, state: Path, rounds: int) -> None:
    """Wait (up to 120 s) until the run of ``proc`` has committed ``rounds`` rounds to ``state``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text())["rounds_done"] >= rounds:
            return
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"the run ended before it was stopped: {err!r}")
        time.sleep(0.05)
    pytest.fail(f"round {rounds - 1} was never committed")


@pytest.mark.slow
def test_kill_and_resume_subprocess(tmp_path):
    """SIGKILL a real CLI run after round 1 is committed; the same command resumes it and the
    result equals an uninterrupted run's."""
    args, env = _CLI_RUN, _CLI_ENV
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    state = killed / "state" / "bald_seed0" / "state.json"
    proc = subprocess.Popen([*args, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rounds(proc, state, 2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = json.loads(state.read_text())["rounds_done"]
    assert 2 <= done <= 4
    for out in (killed, clean):
        subprocess.run([*args, "--out", str(out)], cwd=REPO, env=env, check=True,
                       capture_output=True)
    a = json.loads(state.read_text())
    b = json.loads((clean / "state" / "bald_seed0" / "state.json").read_text())
    assert a["labelled_indices"] == b["labelled_indices"]
    strip = ("train_seconds", "score_seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in a["records"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in b["records"]
    ]
    ca, cb = read_csv(killed / "bald_seed0.csv"), read_csv(clean / "bald_seed0.csv")
    assert ca["test_error"].tolist() == cb["test_error"].tolist()
    assert ca["round"].tolist() == [0, 1, 2, 3]
    # The killed run's lock file did not block the resume, which removed it when it finished.
    assert sorted(f.name for f in (killed / "state" / "bald_seed0").iterdir()) == ["state.json"]


def test_resume_from_a_trimmed_state(data, tmp_path):
    """A state whose model checkpoint was removed (as in the committed results) resumes: the
    last model is retrained and the run ends as an uninterrupted one; a state whose record the
    retrained model does not reproduce resumes with a warning."""
    p = LoopProtocol(acquisition="entropy", pool_subset=100, **{**TINY, "rounds": 3})
    full = ActiveLearningLoop(data, p).run()
    st = tmp_path / "st"
    ActiveLearningLoop(data, p, state_dir=st).run(rounds=1)
    (ckpt,) = st.glob("round_*.pt")
    ckpt.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        resumed = ActiveLearningLoop(data, p, state_dir=st, csv_path=tmp_path / "r.csv")
    assert _key(resumed.run()) == _key(full)
    assert read_csv(tmp_path / "r.csv")["round"].tolist() == [0, 1, 2, 3]
    assert sorted(f.name for f in st.iterdir()) == ["state.json"]

    st2 = tmp_path / "st2"
    ActiveLearningLoop(data, p, state_dir=st2).run(rounds=1)
    for f in st2.glob("round_*.pt"):
        f.unlink()
    state = json.loads((st2 / "state.json").read_text())
    state["records"][-1]["train_loss"] += 1e-3
    (st2 / "state.json").write_text(json.dumps(state))
    with pytest.warns(RuntimeWarning, match="retrained on resume"):
        ActiveLearningLoop(data, p, state_dir=st2)


# ------------------------------------------------------------------------------------------------
# bf16-autocast training (LoopProtocol.train_bf16)
@pytest.mark.parametrize("field", ["train_bf16", "equal_batches"])
def test_training_flags_are_off_by_default_and_old_states_still_resume(field):
    p = LoopProtocol()
    assert getattr(p, field) is False
    old = p.to_dict()
    del old[field]  # a state.json written before the field existed
    assert LoopProtocol.from_dict(old) == p
    assert p.differences(LoopProtocol(**{field: True})) == [f"{field}: False != True"]


def test_train_bf16_runs_the_forward_in_bf16_and_learns(data):
    from fastbald.loop import default_model_factory, train_from_scratch

    x, y = data.x_train[:256], data.y_train[:256]
    seen: dict[bool, set[torch.dtype]] = {}

    def factory(protocol, num_classes):
        model = default_model_factory(protocol, num_classes)
        dtypes = seen.setdefault(protocol.train_bf16, set())
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        return model

    models, losses = {}, {}
    for bf16 in (False, True):
        p = LoopProtocol(acquisition="random", epochs=8, train_bf16=bf16)
        models[bf16], losses[bf16] = train_from_scratch(factory, p, 10, x, y, 1)
    assert seen[False] == {torch.float32} and seen[True] == {torch.bfloat16}
    # Weights stay float32 (autocast casts per op); the two trainings really differ.
    for a, b in zip(models[False].parameters(), models[True].parameters(), strict=True):
        assert a.dtype == b.dtype == torch.float32
    assert not all(
        torch.equal(a, b)
        for a, b in zip(models[False].parameters(), models[True].parameters(), strict=True)
    )
    # Both learn the synthetic task about equally well: the last epoch's loss is far below
    # log(10) = 2.30 and within 0.1 nats of each other.
    assert losses[False] < 1.0 and abs(losses[True] - losses[False]) < 0.1, losses


def test_train_bf16_is_recorded_in_the_state(data, tmp_path):
    st = tmp_path / "st"
    p = LoopProtocol(acquisition="random", **{**TINY, "rounds": 1}, train_bf16=True)
    ActiveLearningLoop(data, p, state_dir=st).run()
    assert json.loads((st / "state.json").read_text())["protocol"]["train_bf16"] is True
    with pytest.raises(StateMismatchError, match="train_bf16: False != True"):
        ActiveLearningLoop(data, LoopProtocol(acquisition="random", **TINY), state_dir=st)


# ------------------------------------------------------------------------------------------------
# Equal-size minibatches (LoopProtocol.equal_batches)
def test_epoch_batches():
    from fastbald.loop import epoch_batches

    assert epoch_batches(130, 128) == [0, 128, 130]  # the paper's: a 2-image remainder
    assert epoch_batches(130, 128, equal=True) == [0, 65, 130]
    assert epoch_batches(257, 128, equal=True) == [0, 85, 171, 257]
    assert epoch_batches(256, 128, equal=True) == epoch_batches(256, 128) == [0, 128, 256]
    assert epoch_batches(20, 128, equal=True) == epoch_batches(20, 128) == [0, 20]
    assert epoch_batches(0, 128) == epoch_batches(0, 128, equal=True) == [0]
    for n in range(1, 1100, 7):
        b = epoch_batches(n, 128, equal=True)
        sizes = [e - s for s, e in zip(b[:-1], b[1:], strict=True)]
        assert sum(sizes) == n and len(sizes) == -(-n // 128) and max(sizes) - min(sizes) <= 1
        assert max(sizes) <= 128


def test_equal_batches_changes_only_the_minibatch_sizes(data):
    from fastbald.loop import default_model_factory, train_from_scratch

    x, y = data.x_train[:130], data.y_train[:130]
    sizes: dict[bool, list[int]] = {}

    def factory(protocol, num_classes):
        model = default_model_factory(protocol, num_classes)
        seen = sizes.setdefault(protocol.equal_batches, [])
        model.register_forward_hook(lambda _m, inp, _o: seen.append(int(inp[0].shape[0])))
        return model

    for eq in (False, True):
        train_from_scratch(factory, LoopProtocol(epochs=3, equal_batches=eq), 10, x, y, 1)
    assert sizes[False] == [128, 2] * 3 and sizes[True] == [65, 65] * 3


# ------------------------------------------------------------------------------------------------
# One process per state directory
# ------------------------------------------------------------------------------------------------
_HOLD_LOCK = """
import sys, time
from fastbald._io import DirectoryLock
with DirectoryLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _lock_holder(directory):
    """A subprocess holding ``directory``'s lock (wait until it says so)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(directory)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"the lock holder did not start: {line!r} {proc.stderr.read()}")
    return proc


def test_a_second_process_on_the_same_state_is_refused(data, tmp_path):
    """While another process holds the state directory, step/run/restart fail at once, naming
    it, and change nothing; once it is SIGKILLed (its lock file stays behind) the run goes on,
    and a finished run leaves no lock file."""
    p = LoopProtocol(**{**TINY, "rounds": 2})
    st, csv = tmp_path / "st", tmp_path / "r.csv"
    with pytest.raises(Boom):
        ActiveLearningLoop(data, p, state_dir=st, csv_path=csv, callbacks=[_stop_after(0)]).run()
    before = (st / "state.json").read_bytes()
    csv.write_text(",".join(CSV_COLUMNS) + "\n")  # a lagging CSV: the holder's to rewrite
    holder = _lock_holder(st)
    try:
        loop = ActiveLearningLoop(data, p, state_dir=st, csv_path=csv)  # reading needs no lock
        assert loop.next_round == 1
        assert read_csv(csv)["round"].tolist() == []  # left to the process that holds the state
        for call in (loop.step, loop.run,
                     lambda: ActiveLearningLoop(data, p, state_dir=st, restart=True)):
            with pytest.raises(StateLockedError, match=rf"in use by pid {holder.pid} on "):
                call()
        assert (st / "state.json").read_bytes() == before
        assert loop.next_round == 1
    finally:
        holder.kill()
        holder.wait()
    assert (st / ".fastbald.lock").exists()  # SIGKILL: nobody removed it, the kernel unlocked it
    assert ActiveLearningLoop(data, p, state_dir=st, csv_path=csv).next_round == 1
    assert read_csv(csv)["round"].tolist() == [0]  # now the resume rewrote the lagging CSV
    loop.run()
    assert loop.done
    assert sorted(f.name for f in st.iterdir()) == ["state.json"]


def test_a_stale_loop_does_not_overwrite_a_newer_state(data, tmp_path):
    """Two loops opened on one state (one process after the other): the one that read it first
    refuses to commit over the rounds the other added, and the state keeps them."""
    p = LoopProtocol(**{**TINY, "rounds": 3})
    st = tmp_path / "st"
    with pytest.raises(Boom):
        ActiveLearningLoop(data, p, state_dir=st, callbacks=[_stop_after(0)]).run()
    stale = ActiveLearningLoop(data, p, state_dir=st)
    fresh = ActiveLearningLoop(data, p, state_dir=st)
    fresh.step()
    fresh.step()
    after = (st / "state.json").read_bytes()
    with pytest.raises(StateMismatchError, match=r"holds 3 round\(s\), but this run read it at 1"):
        stale.step()
    assert (st / "state.json").read_bytes() == after
    assert json.loads(after)["rounds_done"] == 3


def test_directory_lock_is_reentrant_and_exclusive(tmp_path):
    from fastbald._io import DirectoryLock

    a, b = DirectoryLock(tmp_path / "d"), DirectoryLock(tmp_path / "d")
    with a:
        with a:  # nested on one instance
            assert a.held
            with pytest.raises(StateLockedError, match=rf"in use by pid {os.getpid()} "):
                b.__enter__()  # another holder, even in this process
        assert a.held and (tmp_path / "d" / ".fastbald.lock").exists()
    assert not a.held and not (tmp_path / "d" / ".fastbald.lock").exists()
    with b:  # free again
        assert b.held


def test_cli_refuses_a_locked_run(tmp_path, capsys):
    from fastbald.cli import main

    out = tmp_path / "out"
    args = ["experiment", "mnist", "--synthetic", "400", "--rounds", "1", "--epochs", "1", "-T", "2",
            "--validation", "20", "--out", str(out)]
    assert main([*args, "--stop-after", "0", "--quiet"]) == 0  # round 0 saved: resumable
    state = (out / "state" / "bald_seed0" / "state.json").read_bytes()
    capsys.readouterr()
    holder = _lock_holder(out / "state" / "bald_seed0")
    try:
        rc = main(args)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1
    out_text, err = capsys.readouterr()
    assert "error: the run state directory" in err and f"in use by pid {holder.pid}" in err
    assert "resuming" not in out_text  # refused before it says it resumes
    assert (out / "state" / "bald_seed0" / "state.json").read_bytes() == state
    assert main(args) == 0  # the holder is gone: it resumes
    assert "resuming at round 1" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_stops_a_cli_run_cleanly_and_it_resumes(tmp_path):
    """`kill PID` (SIGTERM) mid-run: exit 143 with the resume hint, every committed round kept,
    no lock file left behind (Python's default SIGTERM would die without cleanup); the same
    command then resumes to the uninterrupted result."""
    args, env = _CLI_RUN, _CLI_ENV
    out, clean = tmp_path / "term", tmp_path / "clean"
    run_dir = out / "state" / "bald_seed0"
    proc = subprocess.Popen([*args, "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rounds(proc, run_dir / "state.json", 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM) during bald_seed0" in err and "Run the same command again" in err
    assert "Traceback" not in err
    assert not (run_dir / ".fastbald.lock").exists()
    done = json.loads((run_dir / "state.json").read_text())["rounds_done"]
    assert 1 <= done <= 4
    for o in (out, clean):
        subprocess.run([*args, "--out", str(o)], cwd=REPO, env=env, check=True, capture_output=True)
    assert read_csv(out / "bald_seed0.csv")["test_error"].tolist() == read_csv(
        clean / "bald_seed0.csv")["test_error"].tolist()


@pytest.mark.parametrize("fail_at", ["checkpoint", "csv"])
def test_a_failed_commit_can_be_retried(data, tmp_path, monkeypatch, fail_at):
    """A write that fails once (a full disk) fails that step; the loop is left consistent with
    the state on disk (the round is redone if its state was not committed, kept if only the CSV
    failed), and the finished run equals an uninterrupted one."""
    import fastbald.loop as loop_mod

    p = LoopProtocol(**{**TINY, "rounds": 2})
    full = ActiveLearningLoop(data, p).run()
    st, csv = tmp_path / "st", tmp_path / "r.csv"
    loop = ActiveLearningLoop(data, p, state_dir=st, csv_path=csv)
    loop.step()
    target = "atomic_torch_save" if fail_at == "checkpoint" else "write_csv"
    real = getattr(loop_mod, target)
    calls = []

    def fail_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, target, fail_once)
    with pytest.raises(OSError, match="No space left"):
        loop.step()
    assert loop.next_round == (1 if fail_at == "checkpoint" else 2)
    assert json.loads((st / "state.json").read_text())["rounds_done"] == loop.next_round
    rest = loop.run()
    assert _key(rest) == _key(full)
    assert read_csv(csv)["round"].tolist() == [0, 1, 2]


def test_a_forked_child_does_not_keep_the_lock():
    """A child forked while the lock is held (a DataLoader worker) closes its copy: once the
    parent releases, the directory is free although the child still runs, and the child's exit
    leaves the parent's lock file alone."""
    import tempfile

    from fastbald._io import DirectoryLock

    d = Path(tempfile.mkdtemp())
    lock = DirectoryLock(d)
    with lock:
        pid = os.fork()
        if pid == 0:  # the child: outlive the parent's release a little, then leave at once
            time.sleep(2)
            os._exit(0)
    try:
        with DirectoryLock(d):  # would raise StateLockedError if the child held the lock
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with lock:
        pid = os.fork()
        if pid == 0:  # the child leaves the parent's `with` block: it must not unlink the file
            lock.__exit__(None, None, None)
            os._exit(0)
        os.waitpid(pid, 0)
        assert (d / ".fastbald.lock").exists()
        with pytest.raises(StateLockedError):
            DirectoryLock(d).__enter__()  # still held by this process


def test_reading_a_finished_run_needs_no_lock_and_no_write_access(data, tmp_path):
    """Opening and run() of a finished run neither waits for the lock nor writes: it works while
    another process holds the directory, and with the CSV unwritable."""
    p = LoopProtocol(**{**TINY, "rounds": 1})
    st, csv = tmp_path / "st", tmp_path / "r.csv"
    want = _key(ActiveLearningLoop(data, p, state_dir=st, csv_path=csv).run())
    csv.unlink()
    csv.mkdir()  # the CSV path cannot be written (a directory)
    holder = _lock_holder(st)
    try:
        loop = ActiveLearningLoop(data, p, state_dir=st, csv_path=csv)
        assert loop.done and _key(loop.run()) == want
    finally:
        holder.kill()
        holder.wait()
    loop = ActiveLearningLoop(data, p, state_dir=st, csv_path=csv)  # free, but the CSV unwritable
    assert loop.done and _key(loop.run()) == want
