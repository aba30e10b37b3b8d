"""Stochastic batch acquisition (fastbald.stochastic): the draw's distribution against the exact
Plackett-Luce probabilities (chi-square on selection frequencies, fixed seeds), the limits
beta = inf (top-k) and beta = 0 (uniform), the native kernel against the PyTorch path, bad input."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, rankdata

import fastbald
from fastbald import stochastic as st
from fastbald.stochastic import sampling_probabilities, stochastic_acquire

NATIVE = st._native_op() is not None


@pytest.fixture
def torch_path(monkeypatch):
    """Run with the pure-PyTorch path (as on devices without the native kernel)."""
    monkeypatch.setitem(st._NATIVE, "op", None)


def weights_f64(s: np.ndarray, mode: str, beta: float, ascending: bool = False) -> np.ndarray:
    """Reference unnormalised weights, float64, straight from the definitions."""
    s = np.asarray(s, dtype=np.float64)
    if mode == "power":
        s = 1 - s if ascending else s
        return np.maximum(s, 0) ** beta
    key = -s if ascending else s
    if mode == "softmax":
        return np.exp(beta * (key - key.max()))
    return rankdata(-key, method="average") ** -beta


def ordered_pair_probs(w: np.ndarray) -> dict[tuple[int, int], float]:
    """P(first = i, second = j) of sequential sampling without replacement."""
    p = w / w.sum()
    return {(i, j): p[i] * w[j] / (w.sum() - w[i]) for i in range(len(w)) for j in range(len(w)) if i != j}


def draw_counts(s, k, mode, beta, n_draws, method="bald", seed0=0):
    counts: dict[tuple, int] = {}
    for d in range(n_draws):
        t = tuple(stochastic_acquire(s, k, mode, beta, method, seed=seed0 + d).tolist())
        counts[t] = counts.get(t, 0) + 1
    return counts


def assert_chisquare(counts: dict, probs: dict, n: int, alpha: float = 1e-3):
    keys = sorted(probs)
    assert set(counts) <= set(keys), f"drew impossible outcomes {set(counts) - set(keys)}"
    obs = np.array([counts.get(key, 0) for key in keys], dtype=np.float64)
    exp = np.array([probs[key] for key in keys]) * n
    res = chisquare(obs, exp)
    assert res.pvalue > alpha, f"chi-square p = {res.pvalue:.2g}: observed {obs}, expected {exp.round(1)}"


POOL = np.array([0.05, 0.3, 0.9, 1.4, 0.6, 2.0], dtype=np.float32)


@pytest.mark.parametrize("mode,beta", [("power", 1.0), ("power", 3.0), ("softmax", 1.0),
                                       ("softmax", 2.5), ("softrank", 1.0), ("softrank", 2.0)])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_ordered_pairs_follow_plackett_luce(mode, beta, path, monkeypatch):
    if path == "native" and not NATIVE:
        pytest.skip("native kernel not built")
    if path == "torch":
        monkeypatch.setitem(st._NATIVE, "op", None)
    n = 6000 if path == "native" else 1500
    counts = draw_counts(torch.from_numpy(POOL), 2, mode, beta, n)
    assert_chisquare(counts, ordered_pair_probs(weights_f64(POOL, mode, beta)), n)


def test_margin_is_ascending():
    margin = np.array([0.9, 0.1, 0.5, 0.02, 0.7], dtype=np.float32)
    for mode in st.MODES:
        p = sampling_probabilities(torch.from_numpy(margin), mode, 2.0, method="margin").numpy()
        w = weights_f64(margin, mode, 2.0, ascending=True)
        np.testing.assert_allclose(p, w / w.sum(), rtol=1e-12)
        assert p.argmax() == 3
    n = 4000
    counts = draw_counts(torch.from_numpy(margin), 2, "softmax", 2.0, n, method="margin")
    assert_chisquare(counts, ordered_pair_probs(weights_f64(margin, "softmax", 2.0, True)), n)


def test_softrank_uses_average_ranks_not_argsort_indices():
    s = np.array([0.2, 0.9, 0.2, 0.5, 0.9, 0.1], dtype=np.float64)
    p = sampling_probabilities(torch.from_numpy(s), "softrank", 1.0).numpy()
    w = rankdata(-s, method="average") ** -1.0
    np.testing.assert_allclose(p, w / w.sum(), rtol=1e-12)
    assert p[1] == p[4] and p[0] == p[2]  # ties get the same probability


@pytest.mark.parametrize("mode", st.MODES)
def test_beta_inf_is_topk_and_large_beta_converges(mode):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50_000, generator=g)
    top = fastbald.acquire(s, 20)
    assert torch.equal(stochastic_acquire(s, 20, mode, math.inf, seed=1), top)
    if mode != "softrank":  # huge beta: no underflow, the top-k in order (log-space keys)
        assert torch.equal(stochastic_acquire(s.double(), 5, mode, 1e9, seed=1), top[:5])
    m = torch.rand(1000, generator=g)
    assert torch.equal(stochastic_acquire(m, 7, mode, math.inf, "margin"), fastbald.acquire(m, 7, "margin"))


@pytest.mark.parametrize("mode", st.MODES)
def test_beta_zero_is_uniform(mode):
    s = torch.tensor([0.0, 5.0, 0.1, 100.0, 2.0])
    n = 3000
    counts = draw_counts(s, 2, mode, 0.0, n)
    w = np.ones(5)
    assert_chisquare(counts, ordered_pair_probs(w), n)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_zero_weights_come_last_uniformly(path, monkeypatch):
    if path == "torch":
        monkeypatch.setitem(st._NATIVE, "op", None)
    s = torch.zeros(8)
    s[2], s[5] = 1.0, -3.0  # power: one item of positive weight (the negative score clamps to 0)
    firsts, rest = set(), np.zeros(8)
    for seed in range(800):
        idx = stochastic_acquire(s, 4, "power", 1.0, seed=seed).tolist()
        assert len(set(idx)) == 4
        firsts.add(idx[0])
        for i in idx[1:]:
            rest[i] += 1
    assert firsts == {2}
    assert rest[2] == 0
    assert chisquare(np.delete(rest, 2)).pvalue > 1e-3  # the 3 others: uniform over the 7 zeros


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("mode", st.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_equals_torch_path_and_threads(mode, dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(300_001, generator=g, dtype=torch.float64) * 3 - 0.5).to(dtype)
    s[::7] = 0.0
    for k, beta, seed in [(1, 1.0, 0), (10, 1.0, 7), (257, 2.0, 2**40 + 3), (64, 0.5, 5)]:
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = stochastic_acquire(s, k, mode, beta, seed=seed)
            torch.set_num_threads(max(2, prev))
            many = stochastic_acquire(s, k, mode, beta, seed=seed)
        finally:
            torch.set_num_threads(prev)
        with monkeypatch.context() as mp:
            mp.setitem(st._NATIVE, "op", None)
            ref = stochastic_acquire(s, k, mode, beta, seed=seed)
        assert torch.equal(one, many)
        assert torch.equal(one, ref), (mode, k, beta)
        assert len(set(one.tolist())) == k


def test_seed_generator_and_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 8, 10, generator=g) * 3
    ps = fastbald.scores(logits)
    a = stochastic_acquire(ps, 10, seed=5)
    assert torch.equal(a, stochastic_acquire(ps.bald, 10, seed=5))
    assert torch.equal(a, stochastic_acquire(logits, 10, seed=5))
    out = stochastic_acquire(ps.bald.numpy(), 10, seed=5)
    assert isinstance(out, np.ndarray) and out.tolist() == a.tolist()
    assert not torch.equal(a, stochastic_acquire(ps, 10, seed=6))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(stochastic_acquire(ps, 10, generator=g1), stochastic_acquire(ps, 10, generator=g2))
    assert stochastic_acquire(ps, 0, seed=1).shape == (0,)
    assert sorted(stochastic_acquire(ps.entropy, 500, "softrank", seed=1).tolist()) == list(range(500))
    assert fastbald.stochastic_acquire is stochastic_acquire


@pytest.mark.parametrize("path", ["native", "torch"])
def test_bad_input(path, monkeypatch):
    if path == "torch":
        monkeypatch.setitem(st._NATIVE, "op", None)
    s = torch.rand(100)
    with pytest.raises(ValueError, match=r"k=101 is larger than the pool \(100 items\)"):
        stochastic_acquire(s, 101)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        stochastic_acquire(s, 3, beta=-0.5)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        stochastic_acquire(s, 3, beta=float("nan"))
    with pytest.raises(ValueError, match="mode must be one of"):
        stochastic_acquire(s, 3, mode="boltzmann")
    with pytest.raises(TypeError, match="k must be an integer"):
        stochastic_acquire(s, 2.0)
    with pytest.raises(ValueError, match="pass seed or generator"):
        stochastic_acquire(s, 2, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        stochastic_acquire(s.reshape(10, 10), 2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = s.clone()
        x[37] = bad
        x[80] = bad
        for mode, beta in itertools.product(st.MODES, (0.0, 1.0, math.inf)):
            with pytest.raises(ValueError, match="pool item 37 "):
                stochastic_acquire(x, 3, mode, beta, seed=0)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
def test_native_chunks_and_threads_beyond_one_grain(monkeypatch):
    """Above 2^20 items the native scan splits into parallel chunks: same draw as one thread and as
    the PyTorch path."""
    g = torch.Generator().manual_seed(8)
    s = torch.rand((1 << 21) + 5, generator=g)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stochastic_acquire(s, 50, "power", 2.0, seed=11)
        torch.set_num_threads(max(2, prev))
        many = stochastic_acquire(s, 50, "power", 2.0, seed=11)
    finally:
        torch.set_num_threads(prev)
    monkeypatch.setitem(st._NATIVE, "op", None)
    assert torch.equal(one, many) and torch.equal(one, stochastic_acquire(s, 50, "power", 2.0, seed=11))


@pytest.mark.parametrize("path", ["native", "torch"])
def test_huge_finite_beta_is_topk_not_uniform(path, monkeypatch):
    """beta so large that beta * s (softmax), beta * log s (power) or beta * log rank (softrank,
    5+ items tied at the top) overflows: the draw is the top-k (it used to become uniform: +inf
    keys counted as weight 0) and the probabilities are finite (they were NaN). Items whose weight
    underflows relative to the best (weight ratio < exp(-1.8e308)) still come in score order."""
    if path == "torch":
        monkeypatch.setitem(st._NATIVE, "op", None)
    s = torch.tensor([0.1, 5.0, 3.0, 0.2], dtype=torch.float64)
    big = torch.tensor([2.0, 1e200, 3e200, 0.5, 1e-300], dtype=torch.float64)
    for mode, x, beta in [("softmax", s, 1e308), ("softmax", s.float(), 1e308), ("softmax", s * 1e300, 1e8),
                          ("softmax", -s * 1e306, 1e3), ("power", s, 1.7e308), ("power", big, 1e307),
                          ("power", big * 1e-200, 1e306)]:
        top = fastbald.acquire(x, x.shape[0])
        for seed in range(30):
            assert stochastic_acquire(x, 2, mode, beta, seed=seed).tolist() == top[:2].tolist(), (mode, beta)
            assert stochastic_acquire(x, x.shape[0], mode, beta, seed=seed).tolist() == top.tolist()
        p = sampling_probabilities(x, mode, beta)
        assert torch.isfinite(p).all(), (mode, beta, p)
        np.testing.assert_allclose(p.numpy(), np.eye(x.shape[0])[int(top[0])], atol=1e-300)
    # Past _MAX_LEVELS re-shifted rounds the rest come in score order (here: from the first).
    monkeypatch.setattr(st, "_MAX_LEVELS", 1)
    assert stochastic_acquire(s, 4, "softmax", 1e308, seed=0).tolist() == [1, 2, 3, 0]
    monkeypatch.setattr(st, "_MAX_LEVELS", 64)
    # softrank: 6 items tied at the top share rank 3.5, beta * log 3.5 overflows.
    tied = torch.tensor([5.0] * 6 + [3.0, 1.0])
    firsts = set()
    for seed in range(60):
        idx = stochastic_acquire(tied, 8, "softrank", 1.7e308, seed=seed).tolist()
        assert sorted(idx[:6]) == list(range(6)) and idx[6:] == [6, 7], idx
        firsts.add(idx[0])
    assert firsts == set(range(6))  # the tied items in uniformly random order, not by index
    p = sampling_probabilities(tied, "softrank", 1.7e308)
    np.testing.assert_allclose(p.numpy(), [1 / 6] * 6 + [0, 0], rtol=1e-12)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
def test_native_softrank_equals_mode0_on_sorted_ranks():
    """Softrank's native ranks (mode 3: histogram bounds, candidates, exact ranks of candidates;
    no sort) give the same draw and keys as mode 0 fed the log-weights from the sort-based
    _average_ranks, on pools made to stress the buckets: heavy ties, a narrow range, a range of
    many decades, signed zeros, a constant pool, float64 with ties."""
    op = st._native_op()
    g = torch.Generator().manual_seed(0)
    n = 200_001
    pools = {
        "uniform": torch.rand(n, generator=g),
        "ties4": torch.randint(0, 4, (n,), generator=g).float(),
        "narrow": 0.5 + torch.rand(n, generator=g) * 1e-4,
        "decades": torch.exp(torch.randn(n, generator=g) * 20),
        "signed": torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.1),
        "f64": torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1,
        "f64ties": (torch.rand(n, generator=g, dtype=torch.float64) * 100).floor(),
        "const": torch.full((n,), 0.3),
    }
    pools["signed"][::5] = -0.0
    for name, s in pools.items():
        for k, beta, seed in [(1, 1.0, 0), (10, 1.0, 7), (257, 2.0, 2**40 + 3), (1000, 0.1, 9), (10, 30.0, 1)]:
            lw = st._log_weights(s, "softrank", beta).contiguous()
            want_i, want_k = op(lw, k, 0, beta, st._signed(seed), 0.0)
            got_i, got_k = op(s, k, 3, beta, st._signed(seed), 0.0)
            assert torch.equal(got_i, want_i), (name, k, beta, seed)
            torch.testing.assert_close(got_k, want_k, rtol=1e-13, atol=1e-13)


def _softrank_all_kernels(s: torch.Tensor, k: int, beta: float, seed: int):
    """Mode 3 with the scalar loops forced, then the AVX-512 loops, then the AVX2 ones (each scalar
    again where the CPU lacks it), and mode 0 fed the sort-based log-weights: four (indices, keys)."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    op = st._native_op()
    out = []
    try:
        for kernel in (0, 1, 2):
            cpu._force_kernel(kernel)
            out.append(op(s, k, 3, beta, st._signed(seed), 0.0))
    finally:
        cpu._force_kernel(-1)
    lw = st._log_weights(s, "softrank", beta).contiguous()
    out.append(op(lw, k, 0, beta, st._signed(seed), 0.0))
    return out


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
def test_native_softrank_vectorized_equals_scalar_code():
    """Softrank's three passes have AVX-512 loops (16 items per step) and AVX2 loops (8 per step),
    chosen at run time, beside the scalar loops: all give the draw and keys of mode 0 on sort-based
    ranks, bit for bit, for
    float32 and float64 pools with ties, signed zeros, distinct doubles that round to one float,
    the largest score repeated, and lengths that are not a multiple of 16 (shorter than one step,
    too)."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    try:  # what each forced kind runs (scalar where the CPU lacks it)
        for kernel, names in ((0, {"scalar"}), (1, {"avx512", "scalar"}), (2, {"avx2", "scalar"})):
            cpu._force_kernel(kernel)
            assert cpu.kernel() in names and cpu.vectorized() == (cpu.kernel() == "avx512")
    finally:
        cpu._force_kernel(-1)
    g = torch.Generator().manual_seed(21)
    n = 100_003
    base = torch.rand(n, generator=g, dtype=torch.float64)
    pools = {
        "bald_like": (torch.rand(n, generator=g) ** 3 * math.log(10)).float(),
        "ties": torch.randint(0, 50, (n,), generator=g).float(),
        "signed": (torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.2)).float(),
        "decades": torch.exp(torch.randn(n, generator=g) * 20).float(),
        "f64_mixed": base * 4 - 2,
        # distinct doubles in groups of 64 that round to the same float: one bucket, many groups
        "f64_subfloat": 1.0 + (torch.arange(n, dtype=torch.float64) % 64) * 1e-12 + (base > 0.5) * 1e-3,
        "top_ties": torch.cat([torch.full((37,), 9.0), torch.rand(n - 37, generator=g)]).float(),
    }
    pools["signed"][::3] = -0.0
    for length in (1, 15, 16, 17, 33, 1000):
        pools[f"len{length}"] = torch.rand(length, generator=g)
        pools[f"len{length}_f64"] = torch.rand(length, generator=g, dtype=torch.float64).floor_divide(0.25)
    for name, s in pools.items():
        N = s.shape[0]
        for k, beta, seed in [(1, 1.0, 0), (min(N, 10), 1.0, 7), (min(N, 300), 2.0, 2**40 + 3), (min(N, 10), 0.1, 9),
                              (min(N, 10), 30.0, 1)]:
            (si, sk), (vi, vk), (ai, ak), (wi, wk) = _softrank_all_kernels(s, k, beta, seed)
            assert torch.equal(si, vi) and torch.equal(sk, vk), (name, k, beta, seed)
            assert torch.equal(si, ai) and torch.equal(sk, ak), (name, k, beta, seed)
            assert torch.equal(si, wi), (name, k, beta, seed)
            torch.testing.assert_close(sk, wk, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_scan_vectorized_equals_scalar_code(dtype, monkeypatch):
    """Modes 0-2 (log-weights, power, softmax): the AVX-512 filter (16 items per step, thresholds by
    permute; float64: classes >= 26 always to the exact step) and the scalar loop give the same
    indices and keys, and the same draw as the PyTorch path; lengths around the vector width,
    ties, non-positive scores, beta 0 and huge."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    op = st._native_op()
    g = torch.Generator().manual_seed(5)
    try:
        for N in (1, 15, 16, 17, 50_003):
            base = torch.rand(N, generator=g, dtype=torch.float64)
            for s in (base * 3 - 0.5, (base * 20).floor(), base**3 * math.log(10)):
                s = s.to(dtype)
                for mode, code in (("logw", 0), ("power", 1), ("softmax", 2)):
                    for k, beta, seed in [(1, 1.0, 0), (min(N, 10), 1.0, 7), (min(N, 300), 2.0, 2**40 + 3),
                                          (min(N, 10), 0.0, 9), (min(N, 10), 1e300, 1)]:
                        shift = 0.0 if code == 0 else math.nan
                        runs = []
                        for kernel in (0, 1):
                            cpu._force_kernel(kernel)
                            runs.append(op(s, k, code, beta, st._signed(seed), shift))
                        assert torch.equal(runs[0][0], runs[1][0]), (N, mode, k, beta, seed)
                        assert torch.equal(runs[0][1], runs[1][1]), (N, mode, k, beta, seed)
            cpu._force_kernel(-1)
            if N > 1000:
                native = [stochastic_acquire(s, 40, m, 1.0, seed=3) for m in ("power", "softmax")]
                with monkeypatch.context() as mp:
                    mp.setitem(st._NATIVE, "op", None)
                    ref = [stochastic_acquire(s, 40, m, 1.0, seed=3) for m in ("power", "softmax")]
                assert all(torch.equal(a, b) for a, b in zip(native, ref, strict=True))
    finally:
        cpu._force_kernel(-1)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_softrank_names_the_first_bad_item_with_either_kernel(dtype):
    """The min/max pass (AVX-512: 64 floats / 32 doubles per step, then a scalar tail) is also the
    finiteness check: a NaN or inf in the vector part or in the tail is found and named (softrank;
    power and softmax: the max for the shift, then the per-chunk check)."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    op = st._native_op()
    s = torch.rand(1000, generator=torch.Generator().manual_seed(2), dtype=dtype)
    try:
        for kernel, bad, where in itertools.product((0, 1, 2), (math.nan, math.inf, -math.inf), (5, 500, 998)):
            cpu._force_kernel(kernel)
            x = s.clone()
            x[where] = bad
            x[999] = bad
            for code, shift in ((3, 0.0), (1, math.nan), (2, math.nan), (0, 0.0)):
                with pytest.raises(ValueError, match=f"pool item {where} "):
                    op(x, 3, code, 1.0, 0, shift)
    finally:
        cpu._force_kernel(-1)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("dtype,beta", [(torch.float32, 1e300), (torch.float64, 1.7e308)])
def test_native_scan_with_flushed_denormals(dtype, beta, monkeypatch):
    """torch.set_flush_denormal(True) (DAZ: subnormal operands read as 0): a pool of zeros, softmax
    with a huge beta (every item ties), puts the scan's thresholds within a subnormal of 0; none may
    be subnormal (DAZ would read -1e-45 as -0 and skip x = 0 > thr), so every kernel draws as the
    PyTorch path without DAZ (uniformly), not the first k items every time."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    x = torch.zeros(100, dtype=dtype)
    seeds = range(40)
    got = {}
    try:
        torch.set_flush_denormal(True)
        for kernel in (0, 1, 2):
            cpu._force_kernel(kernel)
            got[kernel] = [stochastic_acquire(x, 10, "softmax", beta, seed=seed).tolist() for seed in seeds]
    finally:
        torch.set_flush_denormal(False)
        cpu._force_kernel(-1)
    monkeypatch.setitem(st._NATIVE, "op", None)
    ref = [stochastic_acquire(x, 10, "softmax", beta, seed=seed).tolist() for seed in seeds]
    assert len({tuple(sorted(r)) for r in ref}) > 30  # the reference draw is not the first k items
    for kernel, runs in got.items():
        assert runs == ref, kernel


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
def test_native_kernel_follows_fastbald_cpu_kernel(monkeypatch):
    """FASTBALD_CPU_KERNEL (the switch of every CPU kernel) picks the loops unless _force_kernel does:
    base the scalar ones, avx2 the AVX2 ones (scalar where the CPU lacks AVX2), avx512 the widest;
    the draw is the same."""
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    s = torch.rand(50_001, generator=torch.Generator().manual_seed(5))
    monkeypatch.delenv("FASTBALD_CPU_KERNEL", raising=False)
    try:
        cpu._force_kernel(2)
        avx2 = cpu.kernel()
        cpu._force_kernel(-1)
        auto = cpu.kernel()
        ref = stochastic_acquire(s, 20, "softrank", 1.0, seed=4)
        for env, want in (("base", "scalar"), ("avx2", avx2), ("avx512", auto)):
            monkeypatch.setenv("FASTBALD_CPU_KERNEL", env)
            assert cpu.kernel() == want and cpu.vectorized() == (want == "avx512"), env
            assert torch.equal(stochastic_acquire(s, 20, "softrank", 1.0, seed=4), ref), env
        monkeypatch.setenv("FASTBALD_CPU_KERNEL", "base")
        cpu._force_kernel(2)
        assert cpu.kernel() == avx2
    finally:
        cpu._force_kernel(-1)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
def test_native_softrank_chunks_and_threads(monkeypatch):
    """Softrank above 2^20 items: the histogram, scan and rank passes split into thread chunks;
    same draw as one thread and as the PyTorch path (sort-based ranks)."""
    g = torch.Generator().manual_seed(12)
    s = (torch.rand((1 << 21) + 7, generator=g) * 5000).floor()  # ~420-way ties
    cpu = importlib.import_module("fastbald._stochastic_cpu")
    prev = torch.get_num_threads()
    runs = []
    try:
        for kernel in (0, 1, 2):  # scalar loops, AVX-512 loops, AVX2 loops (where the CPU has them)
            cpu._force_kernel(kernel)
            torch.set_num_threads(1)
            runs.append(stochastic_acquire(s, 40, "softrank", 1.0, seed=3))
            torch.set_num_threads(max(2, prev))
            runs.append(stochastic_acquire(s, 40, "softrank", 1.0, seed=3))
    finally:
        torch.set_num_threads(prev)
        cpu._force_kernel(-1)
    monkeypatch.setitem(st._NATIVE, "op", None)
    ref = stochastic_acquire(s, 40, "softrank", 1.0, seed=3)
    assert all(torch.equal(r, ref) for r in runs)


def test_disable_native_env_selects_the_torch_path(monkeypatch):
    """FASTBALD_DISABLE_NATIVE=1 switches the stochastic kernel off as it does the scores op and
    EPIG; the PyTorch path then draws the same items."""
    s = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    native = stochastic_acquire(s, 10, "power", 1.0, seed=3)
    monkeypatch.setenv("FASTBALD_DISABLE_NATIVE", "1")
    monkeypatch.setattr(st, "_NATIVE", {})
    assert st._native_op() is None
    assert "FASTBALD_DISABLE_NATIVE" in st._NATIVE["why"]
    assert torch.equal(stochastic_acquire(s, 10, "power", 1.0, seed=3), native)
