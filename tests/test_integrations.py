"""fastbald as the backend of baal and batchbald_redux, tested against the peers themselves.

Each test runs the peer's own code (baal's heuristics, batchbald_redux's scoring) on the same input
as fastbald's drop-in and compares scores and rankings. The peers are test extras; a test whose
peer is not installed is skipped, or fails when FASTBALD_REQUIRE_PEERS=1 (set it in CI, where they
are installed).

Tolerances: float32 scores agree within rtol 1e-5 / atol 2e-6 (both sides round in float32; baal's
BALD also loses ~1e-6 to cancellation); a ranking must order the peer's scores up to that
tolerance (near-ties may swap); for float64 input the rankings must be identical.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

import fastbald
from fastbald.reference import METRICS, reference_scores

_REQUIRE = os.environ.get("FASTBALD_REQUIRE_PEERS") == "1"
# baal 2.1.0 configures structlog through a deprecated API on import.
pytestmark = pytest.mark.filterwarnings("ignore:`structlog.threadlocal` is deprecated")


def _peer(module: str, install: str):
    """Import a peer, or skip (fail under FASTBALD_REQUIRE_PEERS=1) saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"peer not installed (or missing a dependency): {module}: {e}. Install with: {install}"
        if _REQUIRE:
            pytest.fail("FASTBALD_REQUIRE_PEERS=1 but " + msg)
        pytest.skip(msg)


BAAL_INSTALL = ("pip install --no-deps baal==2.1.0 && pip install scipy scikit-learn "
                "'structlog>=22,<23' 'torchmetrics>=1.7.3,<2'")
BBR_INSTALL = "pip install --no-deps batchbald-redux==2.0.5 && pip install 'toma<2'"


@pytest.fixture(scope="module")
def bh():
    """baal's own heuristics module."""
    return _peer("baal.active.heuristics", BAAL_INSTALL)


@pytest.fixture(scope="module")
def fh(bh):
    """fastbald's drop-in replacements (needs baal)."""
    import fastbald.integrations.baal as fh

    return fh


@pytest.fixture(scope="module")
def bbr():
    return _peer("batchbald_redux.batchbald", BBR_INSTALL)


def logits_NCT(N=3000, C=10, T=20, scale=3.0, seed=0, dtype=np.float32) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.standard_normal((N, C, T)) * scale).astype(dtype)


def probs_of(z: np.ndarray, axis: int = 1) -> np.ndarray:
    return torch.softmax(torch.from_numpy(z), axis).numpy()


def assert_orders(rank: np.ndarray, theirs: np.ndarray, reverse: bool, tol: float) -> None:
    """`rank` sorts the peer's scores `theirs` (descending if reverse) up to `tol`."""
    s = np.asarray(theirs, dtype=np.float64)[rank]
    d = np.diff(s)
    worst = d.max() if reverse else -d.min()
    assert worst <= tol, f"ranking out of order by {worst:.3g} > {tol:.3g}"


HEURISTICS = ["BALD", "Entropy", "Margin", "Certainty", "Variance"]


# ------------------------------------------------------------------------------------------------
# baal
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HEURISTICS)
@pytest.mark.parametrize("kind", ["probs", "logits"])
@pytest.mark.parametrize("container", ["numpy", "torch"])
def test_baal_same_scores_and_ranking(bh, fh, name, kind, container):
    z = logits_NCT()
    x = probs_of(z) if kind == "probs" else z
    theirs_rank, theirs = getattr(bh, name)().get_ranks(torch.from_numpy(x) if container == "torch" else x)
    ours_h = getattr(fh, name)()
    assert isinstance(ours_h, getattr(bh, name))
    assert ours_h.reversed == getattr(bh, name)().reversed
    ours_rank, ours = ours_h.get_ranks(torch.from_numpy(x) if container == "torch" else x)
    assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    rtol, atol = 1e-5, 2e-6
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol)
    tol = 2 * (atol + rtol * float(np.abs(theirs).max()))
    assert_orders(ours_rank, theirs, ours_h.reversed, tol)
    # The top of the ranking, what an acquisition takes, agrees except for near-ties.
    k = 50
    assert len(set(ours_rank[:k]) ^ set(theirs_rank[:k])) <= 4


@pytest.mark.parametrize("name", HEURISTICS)
def test_baal_float64_identical_ranking(bh, fh, name):
    x = probs_of(logits_NCT(N=2000, dtype=np.float64))
    theirs_rank, theirs = getattr(bh, name)().get_ranks(x)
    ours_rank, ours = getattr(fh, name)().get_ranks(x)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(ours_rank, theirs_rank)


def _per_item_min(s: np.ndarray) -> np.ndarray:
    return s.reshape(s.shape[0], -1).min(1)


@pytest.mark.parametrize("name", ["BALD", "Entropy", "Margin", "Certainty"])
@pytest.mark.parametrize("reduction", ["none", "mean", "max", "sum", _per_item_min])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6, 8), (40, 5, 3, 8)])  # N <= D and N > D
@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_baal_extra_axes(bh, fh, name, reduction, shape, kind):
    """baal's segmentation-style predictions [N, C, H, W, T] and its reductions."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(*shape, generator=g) * 2
    x = (torch.softmax(z, 1) if kind == "probs" else z).numpy()
    theirs = getattr(bh, name)(reduction=reduction).get_uncertainties(x)
    ours = getattr(fh, name)(reduction=reduction).get_uncertainties(x)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "max", "sum"])
def test_baal_variance_extra_axes(bh, fh, reduction):
    x = torch.softmax(torch.randn(10, 4, 3, 5, 6), 1).numpy()
    np.testing.assert_allclose(
        fh.Variance(reduction=reduction).get_uncertainties(x),
        bh.Variance(reduction=reduction).get_uncertainties(x), rtol=1e-5, atol=1e-8,
    )


def test_baal_probs_that_do_not_sum_to_one_are_softmaxed_like_baal(bh, fh):
    """baal's to_prob soft-maxes values in [0, 1] that do not sum to 1 (e.g. sigmoid outputs)."""
    x = torch.sigmoid(torch.from_numpy(logits_NCT(N=500))).numpy()
    for name in ("BALD", "Entropy", "Margin"):
        np.testing.assert_allclose(getattr(fh, name)().get_uncertainties(x),
                                   getattr(bh, name)().get_uncertainties(x), rtol=1e-5, atol=2e-6)
    # One bad row anywhere flips baal's decision for the whole array; it must flip ours too.
    p = probs_of(logits_NCT(N=500))
    p[123, :, 4] *= 0.99
    np.testing.assert_allclose(fh.BALD().get_uncertainties(p), bh.BALD().get_uncertainties(p),
                               rtol=1e-5, atol=2e-6)


def test_baal_explicit_input_kind(bh, fh):
    z = logits_NCT(N=500)
    p = probs_of(z)
    auto = fh.BALD().get_uncertainties(p)
    np.testing.assert_array_equal(fh.BALD(input="probs").get_uncertainties(p), auto)
    np.testing.assert_allclose(fh.BALD(input="logits").get_uncertainties(z),
                               fh.BALD().get_uncertainties(z), rtol=0, atol=0)
    np.testing.assert_allclose(fh.BALD(input="logits").get_uncertainties(z), auto, atol=2e-6)
    with pytest.raises(ValueError, match="input must be one of"):
        fh.BALD(input="probabilities")
    with pytest.raises(ValueError, match="sums to"):
        fh.BALD(input="probs").get_uncertainties(z.clip(0, 1))


def test_baal_api(bh, fh):
    """What baal's ActiveLearningLoop and stochastic heuristics use works the same."""
    from baal.active.heuristics.stochastics import PowerSampling

    p = probs_of(logits_NCT(N=1000))
    ours, theirs = fh.BALD(), bh.BALD()
    np.testing.assert_array_equal(ours(p), ours.get_ranks(p)[0])
    np.testing.assert_array_equal(ours([p]), ours(p))  # a list of one output
    with pytest.raises(ValueError, match="single array"):
        ours([p, p])
    chunks = (p[i:i + 300] for i in range(0, 1000, 300))  # predict_on_dataset_generator
    np.testing.assert_allclose(ours.get_uncertainties_generator(chunks),
                               theirs.get_uncertainties(p), rtol=1e-5, atol=2e-6)
    np.random.seed(0)
    picked, _ = PowerSampling(fh.BALD(), query_size=10).get_ranks(p)
    assert len(set(picked.tolist())) == 10
    # Requires-grad tensors (baal's .numpy() would raise) are fine.
    t = torch.from_numpy(p).requires_grad_()
    np.testing.assert_allclose(ours.get_uncertainties(t), theirs.get_uncertainties(p), atol=2e-6)


def test_baal_single_output_falls_back_to_baal(bh, fh):
    """C = 1 (baal's sigmoid case) is handed to baal's own code."""
    x = torch.sigmoid(torch.randn(200, 1, 10)).numpy()
    for name in ("BALD", "Entropy"):
        np.testing.assert_array_equal(getattr(fh, name)().get_uncertainties(x),
                                      getattr(bh, name)().get_uncertainties(x))


def test_baal_bald_never_negative(fh):
    """Near-identical samples: the true BALD is ~1e-7. baal's float32 difference of two entropies
    rounds either way (some items come out negative); fastbald's mean-KL form is >= 0 and within
    1e-6 of float64."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5000, 10, 1, generator=g) * 4 + torch.randn(5000, 10, 20, generator=g) * 1e-3
    p = torch.softmax(z, 1).numpy()
    ours = fh.BALD().get_uncertainties(p)
    exact = reference_scores(torch.from_numpy(p).permute(0, 2, 1).double(), "probs",
                             dtype=torch.float64)[METRICS.index("bald")].numpy()
    assert (ours >= 0).all()
    assert np.abs(ours - exact).max() <= 1e-6


def test_baal_extras_match_fastbald(fh):
    z = logits_NCT(N=500)
    p = probs_of(z)
    ps = fastbald.scores(p, input="probs", layout="NCT")
    np.testing.assert_array_equal(fh.MeanSTD().get_uncertainties(p), ps.mean_std)
    np.testing.assert_array_equal(fh.VariationRatio().get_uncertainties(p), ps.variation_ratio)
    assert fh.MeanSTD().reversed and fh.VariationRatio().reversed


def test_baal_nan_raises_with_item(fh):
    p = probs_of(logits_NCT(N=50))
    p[7, 2, 3] = np.nan
    with pytest.raises(ValueError, match="pool item 7"):
        fh.BALD().get_uncertainties(p)


# ------------------------------------------------------------------------------------------------
# batchbald_redux and epig
# ------------------------------------------------------------------------------------------------
def log_probs_NKC(N=3000, K=20, C=10, scale=3.0, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(N, K, C, generator=g, dtype=torch.float64) * scale, -1).to(dtype)


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def test_bbr_get_bald_batch_same_batch(bbr):
    from fastbald.integrations import batchbald as fb

    for dtype in (torch.float64, torch.float32):
        lp = log_probs_NKC(dtype=dtype)
        theirs = bbr.get_bald_batch(lp, 20)
        ours = fb.get_bald_batch(lp, 20)
        assert type(ours) is type(theirs)
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-5,
                                   atol=1e-11 if dtype == torch.float64 else 2e-6)
        if dtype == torch.float64:
            assert ours.indices == theirs.indices
        else:
            assert len(set(ours.indices) ^ set(theirs.indices)) <= 2
    assert fb.get_bald_batch(lp, 0).indices == bbr.get_bald_batch(lp, 0).indices == []
    assert len(fb.get_bald_batch(lp[:5], 10).indices) == len(bbr.get_bald_batch(lp[:5], 10).indices) == 5


def test_bbr_entropies(bbr):
    from fastbald.integrations import batchbald as fb

    lp = log_probs_NKC()
    for name in ("compute_entropy", "compute_conditional_entropy"):
        ours, theirs = getattr(fb, name)(lp), getattr(bbr, name)(lp)
        assert ours.dtype == theirs.dtype == torch.float64 and ours.device == theirs.device
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)
    scores = fb.get_bald_scores(lp)
    torch.testing.assert_close(scores.double(), bbr.compute_entropy(lp) - bbr.compute_conditional_entropy(lp),
                               rtol=1e-5, atol=2e-6)
    assert (scores >= 0).all()


def test_bbr_masked_classes(bbr):
    """-inf log-probabilities (masked classes): batchbald_redux's 0 * -inf gives NaN; fastbald
    counts them as probability 0."""
    from fastbald.integrations import batchbald as fb

    lp = log_probs_NKC(N=200, dtype=torch.float64)
    lp[:, :, 0] = float("-inf")
    lp = torch.log_softmax(lp, -1)
    ours = fb.get_bald_scores(lp)
    assert torch.isfinite(ours).all()
    exact = reference_scores(lp, "log_probs", dtype=torch.float64)[METRICS.index("bald")]
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-9)
    theirs = bbr.compute_entropy(lp) - bbr.compute_conditional_entropy(lp)
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-9, atol=1e-9)


def test_epig_style_functions(bbr):
    """epig's bald_from_logprobs / _from_probs family: the same numbers as batchbald_redux's
    entropies (epig's own code is not a package; its formulas are batchbald_redux's)."""
    from fastbald.integrations import batchbald as fb

    lp = log_probs_NKC(N=1000)
    p = lp.exp()
    H, EH = bbr.compute_entropy(lp).float(), bbr.compute_conditional_entropy(lp).float()
    kw = dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(fb.marginal_entropy_from_logprobs(lp), H, **kw)
    torch.testing.assert_close(fb.conditional_entropy_from_logprobs(lp), EH, **kw)
    torch.testing.assert_close(fb.bald_from_logprobs(lp), H - EH, **kw)
    torch.testing.assert_close(fb.marginal_entropy_from_probs(p), H, **kw)
    torch.testing.assert_close(fb.conditional_entropy_from_probs(p), EH, **kw)
    torch.testing.assert_close(fb.bald_from_probs(p), H - EH, **kw)
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
        fb.bald_from_logprobs(lp[0])


def test_batchbald_module_works_without_peer():
    """The batchbald integration does not need batchbald_redux installed."""
    code = (
        "import sys; sys.modules['batchbald_redux'] = None\n"
        "import torch\n"
        "from fastbald.integrations.batchbald import get_bald_batch, CandidateBatch\n"
        "b = get_bald_batch(torch.log_softmax(torch.randn(50, 4, 3), -1), 5)\n"
        "assert isinstance(b, CandidateBatch) and len(b.indices) == 5\n"
        "print('ok')\n"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ------------------------------------------------------------------------------------------------
# The peers benchmark (fastbald bench), smoke run
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_smoke(tmp_path, capsys):
    from fastbald import bench

    methods = ["fastbald", "naive"]
    for mod, key in (("baal", "baal"), ("batchbald_redux", "batchbald_redux")):
        if importlib.util.find_spec(mod) is not None:
            methods.append(key)
    out = tmp_path / "peers.md"
    rc = bench.main(["--sizes", "300x5x4", "--methods", ",".join(methods), "--repeats", "1",
                     "--threads", "1", "--out", str(out)])
    assert rc == 0
    md = out.read_text()
    assert "N=300, T=5, C=4" in md and "fastbald (CPU kernel)" in md
    assert out.with_suffix(".json").exists()
    import json

    res = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in res["results"]} == set(methods)
    for r in res["results"]:
        assert r["status"] == "ok", r
        assert r["max_abs_err"] < 1e-5
        assert r["neg_bald"] == 0 or r["method"] in ("naive", "baal", "batchbald_redux")


# ------------------------------------------------------------------------------------------------
# baal: stochastic batch acquisition and EPIG (issue 11)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bs():
    """baal's own stochastic heuristics and aliases."""
    _peer("baal.active.heuristics", BAAL_INSTALL)
    import baal.active.heuristics.aliases as aliases
    import baal.active.heuristics.stochastics as stochastics

    return stochastics, aliases


def _small_pool(N=6, C=4, T=10, seed=3) -> np.ndarray:
    """baal predictions [N, C, T] whose BALD scores are well spread."""
    g = np.random.default_rng(seed)
    z = g.standard_normal((N, C, T)) * np.linspace(0.3, 3.0, N)[:, None, None]
    return probs_of(z.astype(np.float32))


def _pair_counts(draw, n: int) -> dict:
    counts: dict = {}
    for d in range(n):
        key = tuple(int(i) for i in draw(d))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _same_distribution(a: dict, b: dict, alpha: float = 1e-3) -> float:
    """Two-sample chi-square (contingency table) on outcome counts; returns the p-value."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(a) | set(b))
    table = np.array([[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]])
    keep = table.sum(0) >= 5  # pool rare outcomes into one cell
    table = np.concatenate([table[:, keep], table[:, ~keep].sum(1, keepdims=True)], 1)
    table = table[:, table.sum(0) > 0]
    p = chi2_contingency(table).pvalue
    assert p > alpha, f"chi-square p = {p:.2g}:\n{table}"
    return p


@pytest.mark.parametrize("cls,T", [("PowerSampling", 1.0), ("PowerSampling", 0.5), ("GibbsSampling", 0.25),
                                   ("RankBasedSampling", 1.0)])
def test_baal_stochastic_same_distribution_as_baal(bh, bs, fh, cls, T):
    stochastics, _ = bs
    x = _small_pool()
    theirs_h = getattr(stochastics, cls)(bh.BALD(), query_size=2, temperature=T)
    ours_h = getattr(fh, cls)(fh.BALD(), query_size=2, temperature=T)
    assert isinstance(ours_h, getattr(stochastics, cls))
    # The same sampling distribution, returned by get_ranks.
    np.testing.assert_allclose(ours_h.get_ranks(x)[1], theirs_h.get_ranks(x)[1], rtol=1e-5, atol=1e-9)
    n = 3000
    np.random.seed(0)
    theirs = _pair_counts(lambda d: theirs_h.get_ranks(x)[0], n)
    ours = _pair_counts(lambda d: getattr(fh, cls)(fh.BALD(), 2, T, seed=d).get_ranks(x)[0], n)
    _same_distribution(ours, theirs)


def test_baal_power_bald_alias_and_seeding(bs, fh):
    _, aliases = bs
    x = _small_pool(N=200, seed=4)
    ours, theirs = fh.PowerBALD(5, temperature=0.5), aliases.PowerBALD(5, temperature=0.5)
    assert isinstance(ours, bs[0].PowerSampling) and ours.temperature == theirs.temperature == 0.5
    np.testing.assert_allclose(ours.get_ranks(x)[1], theirs.get_ranks(x)[1], rtol=1e-5, atol=1e-9)
    np.random.seed(1)
    a = ours.get_ranks(x)[0]
    np.random.seed(1)
    b = ours.get_ranks(x)[0]
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 5  # np.random.seed reproduces it
    assert fh.PowerBALD(5, seed=7)(x).tolist() == fh.PowerBALD(5, seed=7)(x).tolist()
    assert fh.PowerEntropy(3, seed=0).get_ranks(x)[0].shape == (3,)
    with pytest.raises(ValueError, match="larger than the pool"):
        fh.PowerBALD(201).get_ranks(x)
    with pytest.raises(ValueError, match="ranks ascending"):
        fh.PowerSampling(fh.Margin(), 2).get_ranks(x)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fh.PowerBALD(2, temperature=0)


def test_baal_softmax_sampling_respects_margin_direction(fh):
    x = _small_pool(N=50, seed=5)
    margin = fh.Margin().get_uncertainties(x)
    h = fh.GibbsSampling(fh.Margin(), 3, temperature=0.01, seed=0)  # beta = 100: almost top-k
    assert h.get_ranks(x)[1].argmax() == int(np.argmin(margin))


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_baal_epig_same_scores(bh, fh, kind):
    g = np.random.default_rng(6)
    z_pool = (g.standard_normal((800, 10, 20)) * 3).astype(np.float32)
    z_targ = (g.standard_normal((60, 10, 20)) * 3).astype(np.float32)
    pool, targ = (probs_of(z_pool), probs_of(z_targ)) if kind == "probs" else (z_pool, z_targ)
    theirs_h, ours_h = bh.EPIG(), fh.EPIG()
    assert isinstance(ours_h, bh.EPIG) and ours_h.reversed == theirs_h.reversed
    theirs = theirs_h.get_uncertainties(pool, target_predictions=targ)
    ours = ours_h.get_uncertainties(pool, target_predictions=targ)
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == (800,)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # baal subtracts entropies: ~1e-6
    ref = fastbald.epig(torch.from_numpy(probs_of(z_pool).transpose(0, 2, 1).copy()).double(),
                        torch.from_numpy(probs_of(z_targ).transpose(0, 2, 1).copy()).double(), input="probs")
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2e-6)  # ours: float32, float64 oracle
    rank_ours, _ = ours_h.get_ranks(pool, target_predictions=targ)
    rank_theirs, _ = theirs_h.get_ranks(pool, target_predictions=targ)
    assert len(set(rank_ours[:20]) ^ set(rank_theirs[:20])) <= 2
    with pytest.raises(ValueError, match="needs target_predictions"):
        ours_h.get_uncertainties(pool)
    with pytest.raises(ValueError, match="K=20, target K=19"):
        ours_h.get_uncertainties(pool, target_predictions=targ[..., :19])


# ------------------------------------------------------------------------------------------------
# batchbald_redux: get_batchbald_batch (fastbald.batchbald_batch underneath)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, None])
def test_bbr_get_batchbald_batch_same_batch_exact_regime(bbr, dtype):
    from fastbald.integrations import batchbald as fb

    lp = log_probs_NKC(N=120, K=10, C=3, scale=2.0, seed=3, dtype=torch.float64)
    # C^n <= num_samples for every step of a batch of 5 (3^4 = 81): both compute the exact joint.
    theirs = bbr.get_batchbald_batch(lp, 5, 1000, dtype=dtype)
    ours = fb.get_batchbald_batch(lp, 5, 1000, dtype=dtype)
    assert type(ours) is type(theirs)
    assert ours.indices == theirs.indices
    np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-4 if dtype is None else 1e-9, atol=1e-6)
    # The first pick is BALD's argmax; batch_size is capped at N; 0 gives an empty batch.
    assert ours.indices[0] == fb.get_bald_batch(lp, 1).indices[0]
    assert len(fb.get_batchbald_batch(lp[:3], 10, 1000).indices) == 3
    assert fb.get_batchbald_batch(lp, 0, 1000).indices == []
    assert len(set(fb.get_batchbald_batch(lp, 20, 100).indices)) == 20  # sampled regime: no duplicate


@pytest.mark.slow  # baal's own BatchBALD with 20,000 draws: about a minute
@pytest.mark.parametrize("seed", [0, 1])
def test_baal_batchbald_same_batch(bh, fh, seed):
    """baal's BatchBALD picks its BALD argmax, then num_samples more points, with a Monte-Carlo joint
    entropy (num_draw draws): with many draws on a small pool it is nearly exact, and fastbald's
    batch (exact here: 3^3 <= num_draw) is the batch baal chose."""
    g = np.random.default_rng(seed)
    p = probs_of((g.standard_normal((40, 3, 10)) * 2).astype(np.float64))
    torch.manual_seed(seed)
    _, theirs = bh.BatchBALD(4, num_draw=20000).get_ranks(p)
    theirs_batch = set(np.nonzero(theirs)[0].tolist())
    ours_h = fh.BatchBALD(4, num_draw=20000)
    assert isinstance(ours_h, bh.BatchBALD)
    ranks, scores = ours_h.get_ranks(p)
    assert sorted(ranks.tolist()) == list(range(40))
    batch = ranks[:4].tolist()
    assert set(batch) <= theirs_batch and len(theirs_batch) == 5
    assert batch[0] == int(np.argmax(fh.BALD().get_uncertainties(p)))
    assert (scores[batch] > 0).all() and (np.delete(scores, batch) == 0).all()
    # logits in, same batch (soft-maxed over classes as baal does)
    logits = np.log(p) + 1.5
    assert fh.BatchBALD(4, num_draw=20000).get_ranks(logits)[0][:4].tolist() == batch


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_baal_epig_tiny_probability_is_not_nan(fh, kind):
    """A class at log-prob -100 in every sample (subnormal mean probability in float32): the
    drop-in's scores stay finite and equal EPIG by definition in float64 (they were all NaN when
    such a class was in a target item)."""
    g = np.random.default_rng(7)
    z_pool = (g.standard_normal((30, 6, 12)) * 2).astype(np.float32)  # baal's [N, C, K]
    z_targ = (g.standard_normal((9, 6, 12)) * 2).astype(np.float32)
    z_pool[4, 2, :] = -100.0
    z_targ[3, 5, :] = -100.0
    lp_pool = torch.log_softmax(torch.from_numpy(z_pool).permute(0, 2, 1).double(), -1)
    lp_targ = torch.log_softmax(torch.from_numpy(z_targ).permute(0, 2, 1).double(), -1)
    from fastbald.epig import epig_reference

    ref = epig_reference(lp_pool, lp_targ).numpy()
    pool, targ = (probs_of(z_pool), probs_of(z_targ)) if kind == "probs" else (z_pool, z_targ)
    ours = fh.EPIG().get_uncertainties(pool, target_predictions=targ)
    assert np.isfinite(ours).all(), ours
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
