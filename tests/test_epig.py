"""fastbald.epig against EPIG by its definition in float64 (the full [N_p, N_t, C, C] joint), and
against the epig repository's matmul form (reproduced in fastbald.bench_peers_batch); bad input.
Each runs on the native CPU path (torch.ops.fastbald.epig_block) and on the PyTorch path (the
fallback on other devices / without the extension); the two are also compared directly."""

from __future__ import annotations

import decimal
import importlib
import math

import numpy as np
import pytest
import torch

from fastbald.bench_peers_batch import epig_repo_from_logprobs_using_matmul, epig_repo_minibatched
from fastbald.epig import epig, epig_reference

fe = importlib.import_module("fastbald.epig")  # the module (fastbald.epig is the function)
NATIVE = fe._native_op() is not None


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run on the native CPU kernel and on the pure-PyTorch path."""
    if request.param == "native" and not NATIVE:
        pytest.skip("native EPIG kernel not built")
    if request.param == "torch":
        monkeypatch.setitem(fe._NATIVE, "op", None)
    return request.param


def preds(N, K, C, scale, seed):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(N, 1, C, generator=g) * scale
    return torch.log_softmax(shared + torch.randn(N, K, C, generator=g) * scale * 0.7, -1)


def mi_by_definition(lp_pool: torch.Tensor, lp_targ: torch.Tensor) -> torch.Tensor:
    """Loops over pairs, float64, the textbook KL of the joint against the product of marginals."""
    a, b = lp_pool.double().exp(), lp_targ.double().exp()
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)  # exactly normalised
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        acc = 0.0
        for t in range(b.shape[0]):
            joint = a[i].T @ b[t] / a.shape[1]  # [C, C]
            indep = torch.outer(a[i].mean(0), b[t].mean(0))
            m = joint > 0
            acc += float((joint[m] * torch.log(joint[m] / indep[m])).sum())
        out[i] = acc / b.shape[0]
    return out


@pytest.mark.parametrize("K,C,scale", [(8, 3, 1.0), (20, 10, 3.0), (50, 10, 0.3), (5, 100, 2.0), (1, 4, 2.0)])
def test_matches_float64_definition(K, C, scale, path):
    lp, lt = preds(40, K, C, scale, 0), preds(7, K, C, scale, 1)
    ref = mi_by_definition(lp, lt)
    torch.testing.assert_close(epig_reference(lp, lt), ref, rtol=1e-10, atol=1e-12)
    ours32 = epig(lp, lt)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(epig(lp.double(), lt.double()), ref, rtol=1e-9, atol=1e-12)
    if K == 1:  # one posterior sample: y and y* are independent, EPIG = 0 exactly
        assert float(epig(lp, lt).abs().max()) <= 1e-6


def test_inputs_chunking_and_numpy(path):
    lp, lt = preds(333, 16, 10, 2.0, 2), preds(25, 16, 10, 2.0, 3)
    ref = epig_reference(lp, lt)
    for kw in ({}, {"chunk_bytes": 1}, {"chunk_bytes": 10_000}, {"chunk_bytes": 1 << 40}):
        torch.testing.assert_close(epig(lp, lt, **kw).double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(epig(lp.exp(), lt.exp(), input="probs").double(), ref, rtol=0, atol=2e-6)
    logits = lp + torch.randn(333, 16, 1)  # shifted per sample: same probabilities
    torch.testing.assert_close(epig(logits, lt, input="logits").double(), ref, rtol=0, atol=2e-6)
    out = epig(lp.numpy(), lt.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (333,)
    # Masked classes (probability 0 everywhere) are fine.
    lpm, ltm = lp.clone(), lt.clone()
    lpm[..., 3] = -math.inf
    ltm[..., 3] = -math.inf
    lpm, ltm = torch.log_softmax(lpm, -1), torch.log_softmax(ltm, -1)
    m = epig(lpm, ltm)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m.double(), epig_reference(lpm, ltm), rtol=0, atol=2e-6)


def test_range_and_agreement_with_epig_repository(path):
    lp, lt = preds(500, 30, 10, 3.0, 4), preds(50, 30, 10, 3.0, 5)
    ours = epig(lp, lt)
    assert float(ours.min()) >= 0 and float(ours.max()) <= math.log(10)
    theirs = epig_repo_from_logprobs_using_matmul(lp, lt)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # theirs loses ~1e-6 to cancellation
    torch.testing.assert_close(epig_repo_minibatched(lp, lt, 64), theirs, rtol=0, atol=1e-6)
    # Deterministic model (all K samples equal): EPIG = 0; the entropy-difference form is only ~0.
    same_p = lp[:, :1].expand(-1, 30, -1).contiguous()
    same_t = lt[:, :1].expand(-1, 30, -1).contiguous()
    assert float(epig(same_p, same_t).abs().max()) <= 1e-6


def test_memory_stays_flat(path):
    """No [N_p, N_t, C, C]-sized temporary: the big buffers are the chunk's."""
    lp, lt = preds(4000, 20, 10, 2.0, 6), preds(100, 20, 10, 2.0, 7)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        epig(lp, lt, chunk_bytes=1 << 20)
    peak_alloc = max(e.cpu_memory_usage for e in prof.events())  # per call (key_averages sums)
    full = 4000 * 100 * 10 * 10 * 4  # 160 MB
    assert peak_alloc < full / 20, f"an allocation of {peak_alloc} bytes (the full joint is {full})"


def test_bad_input(path):
    lp, lt = preds(10, 8, 5, 1.0, 0), preds(4, 8, 5, 1.0, 1)
    with pytest.raises(ValueError, match=r"same K posterior samples: pool has K=8, target K=6"):
        epig(lp, lt[:, :6])
    with pytest.raises(ValueError, match=r"same classes: pool has C=5, target C=4"):
        epig(lp, torch.log_softmax(lt[..., :4], -1))
    with pytest.raises(ValueError, match=r"pool predictions must be \[N, K, C\].*shape \(10, 40\)"):
        epig(lp.reshape(10, 40), lt)
    with pytest.raises(ValueError, match=r"target predictions must be \[N, K, C\]"):
        epig(lp, lt[0])
    with pytest.raises(ValueError, match="at least one target"):
        epig(lp, lt[:0])
    with pytest.raises(ValueError, match="input must be one of"):
        epig(lp, lt, input="prob")
    with pytest.raises(TypeError, match="floating-point"):
        epig(lp, lt.to(torch.int64))
    bad = lp.clone()
    bad[7, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"pool must be finite: item 7 \(sample 2, class 1\) is nan"):
        epig(bad, lt, chunk_bytes=1)  # chunked: still the index in the whole pool
    badt = lt.clone()
    badt[3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"target must be finite: item 3"):
        epig(lp, badt)
    with pytest.raises(ValueError, match=r"item 0, sample 0 sums to"):
        epig(lp.exp() * 1.1, lt.exp(), input="probs")
    neg = lp.exp()
    neg[2, 1, 0] = -0.1
    with pytest.raises(ValueError, match=r"item 2 \(sample 1, class 0\)"):
        epig(neg, lt.exp(), input="probs")
    allmasked = lp.clone()
    allmasked[5, 3, :] = -math.inf
    with pytest.raises(ValueError, match=r"item 5, sample 3 has every class at -inf"):
        epig(allmasked, lt)


def _with_class_at(lp: torch.Tensor, item: int, cls: int, value: float) -> torch.Tensor:
    """``lp`` with class ``cls`` of ``item`` at log-prob ``value`` in every sample (renormalised)."""
    out = lp.clone()
    out[item, :, cls] = value
    return torch.log_softmax(out, -1)


def test_tiny_mean_probability_contributes_zero_not_nan(path):
    """A class whose mean probability is below the dtype's smallest normal (float32: every sample
    at log-prob < ~-87.3, a confident network; float64: < ~-708) is subnormal: 1/p was inf and the
    EPIG NaN, and one such TARGET item made every pool item NaN. It contributes < 1e-36 nats."""
    lp, lt = preds(6, 8, 5, 2.0, 10), preds(5, 8, 5, 2.0, 11)
    for pool, targ in (
        (_with_class_at(lp, 1, 3, -95.0), lt),  # pool item 1: exp(-95) = 5.5e-42 in float32
        (lp, _with_class_at(lt, 2, 1, -100.0)),  # target item 2: poisoned every pool item
        (_with_class_at(lp, 4, 0, -100.0), _with_class_at(lt, 0, 4, -95.0)),
    ):
        ours = epig(pool, targ)
        assert torch.isfinite(ours).all(), ours
        torch.testing.assert_close(ours.double(), epig_reference(pool, targ), rtol=0, atol=2e-6)
    # One sample gives probability exactly 0, the others a subnormal one.
    pool = _with_class_at(lp, 1, 3, -95.0)
    pool[1, 0, 3] = -math.inf
    torch.testing.assert_close(epig(pool, lt).double(), epig_reference(pool, lt), rtol=0, atol=2e-6)
    # float64 below ~-708: the oracle is the same input with that class at probability 0 (the
    # class's contribution, < 1e-300 nats, is below float64 resolution of the scores).
    lp64, lt64 = lp.double(), lt.double()
    pool, targ = _with_class_at(lp64, 1, 3, -720.0), _with_class_at(lt64, 2, 1, -730.0)
    ours = epig(pool, targ)
    assert ours.dtype == torch.float64 and torch.isfinite(ours).all(), ours
    ref = epig_reference(_with_class_at(lp64, 1, 3, -math.inf), _with_class_at(lt64, 2, 1, -math.inf))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_log_probs_input_must_logsumexp_to_zero(path):
    """The default input='log_probs' rejects rows that are not normalised in log space (it used to
    read probabilities, or logits, silently as log-probs), naming the item."""
    lp, lt = preds(30, 6, 5, 2.0, 12), preds(9, 6, 5, 2.0, 13)
    with pytest.raises(ValueError, match=r"pool: input='log_probs' but item 0, sample 0 has logsumexp"):
        epig(lp.exp(), lt)  # probabilities
    bad = lp.clone()
    bad[17, 4] += 0.5  # logits, or a log-prob row that does not sum to 1
    with pytest.raises(ValueError, match=r"item 17, sample 4 has logsumexp 0.5.*input='logits'"):
        epig(bad, lt, chunk_bytes=1)  # chunked: the index in the whole pool
    badt = lt.clone()
    badt[5] = badt[5].exp()
    with pytest.raises(ValueError, match=r"target: input='log_probs' but item 5, sample 0"):
        epig(lp, badt)
    torch.testing.assert_close(epig(bad, lt, input="logits").double(), epig_reference(bad, lt, "logits"),
                               rtol=0, atol=2e-6)
    # Rounding of lower-precision log-probs is tolerated.
    for dt in (torch.float16, torch.bfloat16):
        got = epig(lp.to(dt), lt.to(dt))
        assert torch.isfinite(got).all()


def test_chunk_bytes_bounds_the_block_also_for_many_targets(path):
    """When one pool item's [C, N_t, C] block is larger than chunk_bytes the targets are split too:
    no allocation above chunk_bytes (it was C^2 N_t elements, twice), same scores."""
    from torch.profiler import ProfilerActivity, profile

    lp, lt = preds(20, 2, 10, 2.0, 14), preds(400, 2, 10, 2.0, 15)  # one item's block: 160 kB
    ref = epig_reference(lp, lt)
    for cb in (100_000, 1, 10_000):
        torch.testing.assert_close(epig(lp, lt, chunk_bytes=cb).double(), ref, rtol=0, atol=2e-6)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        epig(lp, lt, chunk_bytes=100_000)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= 100_000, f"an allocation of {biggest} bytes with chunk_bytes=100,000"


@pytest.mark.skipif(not NATIVE, reason="native EPIG kernel not built")
def test_native_kernel_follows_fastbald_cpu_kernel(monkeypatch):
    """FASTBALD_CPU_KERNEL=base|avx2 runs the scalar code (EPIG has no AVX2 loops), avx512 or unset
    the widest; _force_kernel(k >= 0) takes precedence."""
    cpu = importlib.import_module("fastbald._epig_cpu")
    monkeypatch.delenv("FASTBALD_CPU_KERNEL", raising=False)
    try:
        cpu._force_kernel(1)
        has512 = cpu.vectorized()
        cpu._force_kernel(-1)
        assert cpu.vectorized() == has512
        for env, want in (("base", False), ("avx2", False), ("avx512", has512)):
            monkeypatch.setenv("FASTBALD_CPU_KERNEL", env)
            assert cpu.vectorized() == want, env
        monkeypatch.setenv("FASTBALD_CPU_KERNEL", "base")
        cpu._force_kernel(1)
        assert cpu.vectorized() == has512
    finally:
        cpu._force_kernel(-1)


@pytest.mark.skipif(not NATIVE, reason="native EPIG kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_equals_torch_path_scalar_code_and_threads(dtype, monkeypatch):
    """The native kernel (AVX-512 where the CPU has it, and its scalar code forced) against the
    PyTorch path and the float64 definition; odd sizes (vector tails, several tasks and target
    blocks); bit-identical for 1 and 2 threads (each item's sum does not depend on the split)."""
    cpu = importlib.import_module("fastbald._epig_cpu")
    lp, lt = preds(301, 13, 7, 2.5, 20).to(dtype), preds(37, 13, 7, 2.5, 21).to(dtype)
    ref = epig_reference(lp, lt)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-14)
    with monkeypatch.context() as mp:
        mp.setitem(fe._NATIVE, "op", None)
        torch_path = epig(lp, lt)
    prev = torch.get_num_threads()
    try:
        runs = {}
        for kernel in (-1, 0):  # automatic (AVX-512 here), scalar
            cpu._force_kernel(kernel)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for cb in (None, 3000):  # default blocks; 1 item x 8 targets per product
                    runs[(kernel, threads, cb)] = epig(lp, lt, chunk_bytes=cb)
    finally:
        cpu._force_kernel(-1)
        torch.set_num_threads(prev)
    for key, out in runs.items():
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, **tol, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(out, torch_path, **tol)
    for kernel in (-1, 0):
        for cb in (None, 3000):
            assert torch.equal(runs[(kernel, 1, cb)], runs[(kernel, 2, cb)])


def _f_exact(r: float) -> float:
    """f(r) = r log r - r + 1 in 40-digit decimal arithmetic (f(0) = 1)."""
    if r == 0:
        return 1.0
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        d = decimal.Decimal(r)
        return float(d * d.ln() - d + 1)


@pytest.mark.skipif(not NATIVE, reason="native EPIG kernel not built")
def test_native_f_is_accurate_near_one_and_at_extremes():
    """The kernel's f(r) = r log r - r + 1 (through the op: one pool item of probability 1, K = C =
    1, one target column holding r, w = 1, so out = f(r)) for ratios 0 .. 1e3 including 1 +- 1e-7,
    where r log r and r - 1 cancel: relative error against 40-digit arithmetic, both dtypes, the
    AVX-512 code and the scalar code. Below the smallest normal number r counts as 0 (f = 1)."""
    op = torch.ops.fastbald.epig_block
    cpu = importlib.import_module("fastbald._epig_cpu")
    rs = [0.0, 1e-30, 1e-3, 0.5, 0.70710678, 0.99999, 1 - 1e-7, 1.0, 1 + 1e-7, 1.00001, 1.41421357,
          2.0, 37.0, 1e3]
    for dt, rtol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        for kernel in (-1, 0):
            cpu._force_kernel(kernel)
            try:
                for r in rs:
                    rt = torch.tensor([[r]], dtype=dt)
                    out, bad = op(torch.zeros(1, 1, 1, dtype=dt), rt, torch.ones(1, dtype=dt), 1, 1, math.inf, 1)
                    assert int(bad[0]) == -1
                    rr = float(rt)
                    want = _f_exact(rr) if rr >= torch.finfo(dt).tiny else 1.0
                    err = abs(float(out[0]) - want)
                    assert err <= rtol * want, (dt, kernel, r, float(out[0]), want)
            finally:
                cpu._force_kernel(-1)


@pytest.mark.skipif(not NATIVE, reason="native EPIG kernel not built")
def test_native_op_arguments():
    op = torch.ops.fastbald.epig_block
    x = torch.log_softmax(torch.randn(5, 4, 3), -1)
    bt, w = torch.rand(6, 4), torch.rand(6)
    a, bad = op(x, bt, w, 2, 4, 1e-3, 1)
    b, _ = op(x, bt, w, 5, 6, 1e-3, 0)  # at::mm instead of oneDNN, other blocking
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert a.shape == (5,) and int(bad[0]) == -1
    x2 = x.clone()
    x2[3, 1, 2] = float("nan")
    x2[4, 0, 0] = float("inf")
    assert int(op(x2, bt, w, 1, 6, 1e-3, 1)[1][0]) == 3
    with pytest.raises(TypeError, match="all be float32 or all float64"):
        op(x.double(), bt, w, 2, 4, 1e-3, 1)
    with pytest.raises(ValueError, match=r"bt \[M, K=4\]"):
        op(x, bt[:, :3], w, 2, 4, 1e-3, 1)
    with pytest.raises(ValueError, match="items and cols must be >= 1"):
        op(x, bt, w, 0, 4, 1e-3, 1)


@pytest.mark.skipif(not NATIVE, reason="native EPIG kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_single_task_pool_is_bit_identical_across_threads(dtype):
    """A pool of one task (a few items): the product must not be threaded by BLAS itself (which
    changes the float64 EPIG in the last ulp between 1 and 2 threads, K=512, C=17)."""
    g = torch.Generator().manual_seed(0)

    def lps(N, K, C):
        base = torch.randn(N, 1, C, generator=g, dtype=torch.float64) * 2
        return torch.log_softmax(base + torch.randn(N, K, C, generator=g, dtype=torch.float64) * 1.4, -1)

    prev = torch.get_num_threads()
    try:
        for K in (128, 512):
            for N_p in (1, 2, 3):
                for N_t in (1, 4):
                    lp, lt = lps(N_p, K, 17).to(dtype), lps(N_t, K, 17).to(dtype)
                    runs = {}
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        runs[threads] = epig(lp, lt)
                    assert torch.equal(runs[1], runs[2]), (K, N_p, N_t, runs[1].tolist(), runs[2].tolist())
    finally:
        torch.set_num_threads(prev)
