"""Batch acquisition in the active-learning loop and in ``fastbald.acquire``: ``power_bald``
(stochastic batch acquisition, fastbald.stochastic) draws its round from the scored pool."""

from __future__ import annotations

import torch

import fastbald
from fastbald.data import synthetic_mnist_like
from fastbald.loop import ActiveLearningLoop, LoopProtocol, canonical_acquisition
from fastbald.metrics import acquisition

TINY = {"rounds": 1, "epochs": 2, "T": 4, "validation": 20, "per_round": 7}


def test_power_bald_in_the_table_and_acquire():
    assert canonical_acquisition("PowerBALD") == "power_bald" == canonical_acquisition("powerbald")
    a = acquisition("power_bald")
    assert (a.metric, a.rule, a.display) == ("bald", "power", "PowerBALD")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 8, 10, generator=g) * 3
    s = fastbald.scores(logits)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = fastbald.acquire(s, 12, "power_bald", generator=g1)
    assert got.tolist() == fastbald.acquire(logits, 12, "power_bald", generator=g2).tolist()
    assert len(set(got.tolist())) == 12
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(4)))
    assert got.tolist() == fastbald.stochastic_acquire(s.bald, 12, "power", 1.0, seed=seed).tolist()


def test_loop_power_bald_draws_from_the_scored_pool():
    from fastbald.loop import _SEED_SCORE, _SEED_STOCHASTIC
    from fastbald.pool import score_pool

    data = synthetic_mnist_like(400, seed=0, n_test=100)
    p = LoopProtocol(acquisition="power_bald", **TINY)
    loop = ActiveLearningLoop(data, p)
    loop.step()
    model, pool = loop.model, loop.pool_indices()
    rec = loop.step()
    assert rec.acquired == 7 and rec.scored == pool.numel() and len(set(rec.new_indices)) == 7
    res = score_pool(model, data.x_train[pool], T=p.T, method="bald", seed=loop.round_seed(1, _SEED_SCORE),
                     progress=False)
    want = fastbald.stochastic_acquire(res.scores, 7, "power", 1.0, seed=loop.round_seed(1, _SEED_STOCHASTIC))
    assert rec.new_indices == pool[want].tolist()
    # Reproducible: the same protocol and seed give the same run.
    again = ActiveLearningLoop(data, p)
    again.run()
    assert again.labelled_indices == loop.labelled_indices


def test_bench_batch_smoke(tmp_path):
    """`fastbald bench batch` runs end to end (tiny sizes) and writes its table from its JSON."""
    import json

    from fastbald.bench import main

    out = tmp_path / "batch.json"
    rc = main(["batch", "--stochastic-n", "20000", "--repeats", "2", "--epig-size", "300x10x8x5",
               "--epig-methods", "fastbald,epig_repo", "--threads", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert {r["method"] for r in res["stochastic"]["rows"]} >= {"torch.topk", "stochastic power"}
    assert all(r["status"] == "ok" and r["max_abs_err"] < 1e-5 for r in res["epig"]["rows"])
    md = out.with_suffix(".md").read_text()
    assert "### EPIG" in md and "fastbald.epig" in md and "stochastic softrank" in md


def test_batchbald_in_acquire_and_the_loop():
    from fastbald.batchbald import batchbald_batch
    from fastbald.loop import _SEED_SCORE, _SEED_STOCHASTIC
    from fastbald.mc import mc_logits

    a = acquisition("BatchBALD")
    assert (a.name, a.metric, a.rule) == ("batchbald", None, "batchbald")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 8, 10, generator=g) * 3
    got = fastbald.acquire(logits, 6, "batchbald", generator=torch.Generator().manual_seed(2))
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(2)))
    assert got.tolist() == batchbald_batch(torch.log_softmax(logits, -1), 6, seed=seed).indices.tolist()

    data = synthetic_mnist_like(400, seed=0, n_test=100)
    p = LoopProtocol(acquisition="batchbald", pool_subset=120, **TINY)
    loop = ActiveLearningLoop(data, p)
    loop.step()
    model, pool = loop.model, loop.pool_indices()
    rec = loop.step()
    assert rec.acquired == 7 and rec.scored == 120 and len(set(rec.new_indices)) == 7
    assert set(rec.new_indices) <= set(pool.tolist())
    # The loop's batch is batchbald_batch on the subset's MC log-probs, in the order chosen.
    from fastbald.loop import _SEED_SUBSET, _generator

    cand = pool[torch.randperm(pool.numel(), generator=_generator(p.seed, 1, _SEED_SUBSET))[:120]].sort().values
    lp = torch.log_softmax(mc_logits(model, data.x_train[cand], p.T, seed=loop.round_seed(1, _SEED_SCORE)), -1)
    want = batchbald_batch(lp, 7, num_samples=10_000, seed=loop.round_seed(1, _SEED_STOCHASTIC) % 2**62)
    assert rec.new_indices == cand[want.indices].tolist()


def test_batchbald_acquire_honours_input_and_layout():
    """acquire(x, k, 'batchbald', input=...) reads x as what input= says (it used to log_softmax
    probabilities as if they were logits and pick another batch), and rejects kwargs it cannot use."""
    import numpy as np
    import pytest

    from fastbald.batchbald import batchbald_batch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, 5, generator=g) * 3
    lp = torch.log_softmax(logits, -1)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(1)))
    want = batchbald_batch(lp, 4, seed=seed).indices.tolist()

    def acq(x, **kw):
        return fastbald.acquire(x, 4, "batchbald", generator=torch.Generator().manual_seed(1), **kw).tolist()

    assert acq(logits) == want
    assert acq(logits, input="logits") == want
    assert acq(lp, input="log_probs") == want
    assert acq(lp.exp(), input="probs") == want
    assert acq(lp.exp().numpy(), input="probs") == want  # numpy in, numpy out
    assert isinstance(fastbald.acquire(lp.exp().numpy(), 4, "batchbald", input="probs"), np.ndarray)
    assert acq(logits.permute(1, 0, 2), layout="TNC") == want
    assert acq(lp.exp().permute(0, 2, 1), input="probs", layout="NCT") == want
    bad = lp.exp()
    bad[17, 3, 2] = -0.5
    with pytest.raises(ValueError, match="pool item 17"):
        acq(bad, input="probs")
    with pytest.raises(ValueError, match="sum to"):
        acq(lp.exp() * 1.2, input="probs")
    with pytest.raises(ValueError, match="input must be one of"):
        acq(logits, input="prob")
    with pytest.raises(TypeError, match=r"'batchbald'.*backend"):
        acq(logits, backend="torch")
