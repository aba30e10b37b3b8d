"""Streaming pool scoring: fastbald.pool.score_pool."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch
from pool_fixtures import POOL, tiny
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import fastbald
from fastbald.mc import mc_logits
from fastbald.pool import (
    PoolResult,
    PoolScoringConfig,
    RunningTopK,
    SyntheticPool,
    _ScoreBuffer,
    score_pool,
)

pytestmark = pytest.mark.filterwarnings("ignore:fastbald. using the pure-PyTorch backend")


XS = torch.stack([POOL[i] for i in range(len(POOL))])


def test_synthetic_pool_deterministic() -> None:
    assert torch.equal(POOL[5], SyntheticPool(203, shape=(1, 8, 8), seed=4)[5])
    assert torch.equal(torch.stack(POOL.__getitems__([3, 5])), torch.stack([POOL[3], POOL[5]]))
    assert not torch.equal(POOL[5], POOL[6])
    assert 0.0 <= float(XS.min()) and float(XS.max()) < 1.0
    assert abs(float(XS.mean()) - 0.5) < 0.02


@pytest.mark.parametrize("consistent", [True, False])
def test_bit_identical_across_batch_sizes_and_sources(consistent: bool) -> None:
    m = tiny()
    kw = dict(T=6, k=9, seed=7, block_size=32, metrics="all", progress=False,
              consistent=consistent)
    a = score_pool(m, POOL, batch_size=7, **kw)
    b = score_pool(m, POOL, batch_size=64, **kw)
    c = score_pool(m, XS, **kw)
    d = score_pool(m, DataLoader(TensorDataset(XS, torch.zeros(203)), batch_size=10), **kw)
    e = score_pool(m, DataLoader(POOL, batch_size=13, num_workers=1), **kw)
    for r in (b, c, d, e):
        for name in fastbald.METRICS:
            assert torch.equal(r.metrics[name], a.metrics[name]), name
        assert torch.equal(r.topk, a.topk)
    assert a.scores.shape == (203,) and a.scores is a.metrics["bald"]


def test_scores_equal_fused_scores_of_mc_logits() -> None:
    m = tiny()
    r = score_pool(m, XS, T=5, seed=1, block_size=203, metrics="all", progress=False)
    ref = fastbald.scores(mc_logits(m, XS, 5, seed=1))
    for name in fastbald.METRICS:
        assert torch.equal(r.metrics[name], getattr(ref, name)), name
    assert float(r.scores.min()) >= 0 and float(r.scores.max()) > 0


@pytest.mark.parametrize("method", ["bald", "margin", "variation_ratio"])
def test_topk_equals_acquire_with_ties(method: str) -> None:
    m = tiny()
    # Repeated images give exactly tied scores (variation_ratio ties a lot by itself).
    x = torch.cat([XS[:40]] * 3)[torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    for k in (0, 1, 17, 120):
        r = score_pool(m, x, T=5, k=k, method=method, block_size=16, progress=False)
        assert torch.equal(r.topk, fastbald.acquire(r.scores, k, method))
        assert torch.equal(r.topk_scores, r.scores[r.topk])


def test_running_topk_matches_stable_sort() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5, (1000,), generator=g).float()
    for k in (1, 10, 300):
        top = RunningTopK(k)
        for s in range(0, 1000, 37):
            top.update(keys[s : s + 37], torch.arange(s, min(s + 37, 1000)))
        assert torch.equal(top.idx, torch.sort(keys, descending=True, stable=True).indices[:k])


def test_score_buffer_grows_and_keeps_order() -> None:
    buf = _ScoreBuffer(2, 3)
    chunks = [torch.arange(2 * b, dtype=torch.float32).reshape(2, b) + 100 * i
              for i, b in enumerate([2, 5, 1, 9])]
    for c in chunks:
        buf.append(c)
    out = buf.result()
    assert out is not None and torch.equal(out, torch.cat(chunks, 1))
    assert out.untyped_storage().nbytes() == out.numel() * 4  # trimmed copy, no spare capacity
    assert _ScoreBuffer(1, 4).result() is None


def test_iterable_dataset_pool() -> None:
    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[override]
            yield from XS

    m = tiny()
    a = score_pool(m, Stream(), T=4, k=5, block_size=32, batch_size=9, progress=False)
    b = score_pool(m, XS, T=4, k=5, block_size=32, progress=False)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.topk, b.topk)


def test_errors() -> None:
    m = tiny()
    with pytest.raises(ValueError, match="empty"):
        score_pool(m, XS[:0], progress=False)
    with pytest.raises(ValueError, match="k=204 is larger than the pool"):
        score_pool(m, XS, k=204, progress=False)
    with pytest.raises(ValueError, match="T"):
        score_pool(m, XS, T=0, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        score_pool(m, XS, method="random", progress=False)
    with pytest.raises(ValueError, match="shuffle"):
        score_pool(m, DataLoader(POOL, shuffle=True), progress=False)
    with pytest.raises(ValueError, match="drop_last"):
        score_pool(m, DataLoader(POOL, batch_size=50, drop_last=True), block_size=64,
                   progress=False)
    with pytest.raises(TypeError, match="pool must be"):
        score_pool(m, 5, progress=False)

    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.d(x.flatten(1))[:, :3].unsqueeze(-1)  # [B, 3, 1]

    with pytest.raises(ValueError, match=r"returned shape .*compute block 0: pool items 0\.\.31"):
        score_pool(Wrong(), XS, T=2, block_size=32, progress=False)


def test_nan_logits_name_the_item() -> None:
    class Diverged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.d(x.flatten(1)[:, :4] + 1)
            return torch.where(x.flatten(1)[:, :1] == XS[150].flatten()[0], torch.nan, out)

    with pytest.raises(ValueError, match=r"pool item 150 \(MC sample 0, compute block 4: items 128"):
        score_pool(Diverged(), XS, T=3, block_size=32, progress=False)


def test_logits_are_checked_once_by_the_scoring_op(monkeypatch) -> None:
    """Good logits go through no Python scan of their own (the op's check is the only one); the
    scan that names a bad item runs only after the op has refused the block."""
    from fastbald import pool

    calls = []
    real = pool._first_bad_logits
    monkeypatch.setattr(pool, "_first_bad_logits", lambda lg: calls.append(lg.shape) or real(lg))
    score_pool(tiny(), XS, T=3, block_size=32, progress=False)
    assert calls == []
    bad = XS.clone()
    bad[70] = float("nan")  # the NaN reaches every logit of item 70
    with pytest.raises(ValueError, match=r"pool item 70 \(MC sample 0, compute block 2: items 64\.\.95\)"):
        score_pool(tiny(), bad, T=3, block_size=32, progress=False)
    assert calls == [(32, 3, 4)]


def test_config_is_validated_and_normalised() -> None:
    cfg = PoolScoringConfig(T=np.int64(4), method="margin", metrics=["mean_std", "entropy"], amp=True)
    assert cfg.T == 4 and type(cfg.T) is int
    assert cfg.metrics == ("entropy", "mean_std", "margin")  # bit order, the method added
    assert cfg.amp is torch.bfloat16 and PoolScoringConfig().amp is None
    assert PoolScoringConfig(metrics="all").metrics == fastbald.METRICS
    for kw, err, msg in [
        (dict(T=0), ValueError, "T .* >= 1"),
        (dict(k=-1), ValueError, "k must be an integer >= 0"),
        (dict(block_size=2.0), ValueError, "block_size must be an integer"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(metrics=["bald", "nope"]), ValueError, "unknown metric 'nope'"),
        (dict(amp="bf16"), TypeError, "amp must be a bool or a torch.dtype"),
        (dict(method="random"), ValueError, "fastbald.acquire"),
    ]:
        with pytest.raises(err, match=msg):
            PoolScoringConfig(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.T = 5  # type: ignore[misc]


def test_no_dropout_warns() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.warns(RuntimeWarning, match="BALD is identically 0"):
        r = score_pool(m, XS, T=4, progress=False)
    assert float(r.scores.abs().max()) < 1e-6  # identical samples: BALD = 0 up to rounding


def test_save_atomic_and_interrupt_leaves_nothing(tmp_path: os.PathLike[str]) -> None:
    m = tiny()
    path = os.path.join(tmp_path, "scores.pt")
    r = score_pool(m, XS, T=3, k=4, progress=False, out=path)
    back = PoolResult.load(path)
    assert torch.equal(back.scores, r.scores) and torch.equal(back.topk, r.topk)
    os.unlink(path)

    calls = {"n": 0}

    def interrupt(*_: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    m.train()
    h = m.head[2].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        score_pool(m, POOL, T=3, block_size=16, progress=False, out=path)
    h.remove()
    assert os.listdir(tmp_path) == []  # no result, no temporary file
    assert all(mod.training for mod in m.modules())  # modes restored
    assert not any(mod._forward_hooks for mod in m.modules())  # MC hooks removed


def test_progress_bar_and_amp(capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny()
    r = score_pool(m, XS, T=3, progress=True, amp=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "203/203" in err
    ref = score_pool(m, XS, T=3, progress=False)
    torch.testing.assert_close(r.scores, ref.scores, atol=0.05, rtol=0.1)
    assert r.images_per_s > 0


def test_deterministic_model_scores_once() -> None:
    m = tiny()
    m.mc_dropout = False  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = score_pool(m, XS, T=5, method="entropy", metrics="all", progress=False)
    assert float(r.metrics["bald"].abs().max()) < 1e-6 and float(r.scores.max()) > 0
