"""The fused scoring op against the float64 reference: shapes, dtypes, layouts, input kinds,
strides, extreme values, masks, threads, torch.library integration, and bad input.

Tolerances (max abs error, nats): float32 / float16 / bfloat16 input 1e-5 against float64 computed
from the same (rounded) values; float64 input 1e-9.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbald
from fastbald import _ops
from fastbald.reference import METRICS, reference_scores
from fastbald.scores import pool_scores_op

pytestmark = pytest.mark.usefixtures("native_cpu")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-9}
PERM = {"NTC": (0, 1, 2), "TNC": (1, 0, 2), "NCT": (0, 2, 1)}  # canonical [N,T,C] -> layout


def to_layout(x_ntc: torch.Tensor, layout: str) -> torch.Tensor:
    """A contiguous tensor in `layout` holding the values of the canonical x [N, T, C]."""
    return x_ntc.permute(*PERM[layout]).contiguous()


def make_input(N, T, C, kind, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, T, C, generator=g, dtype=torch.float64) * scale
    if kind == "logits":
        x = z
    elif kind == "log_probs":
        x = torch.log_softmax(z, -1)
    else:
        x = torch.softmax(z, -1)
    x = x.to(dtype)
    if kind == "probs" and dtype in (torch.float16, torch.bfloat16):
        # Re-normalise after rounding so rows sum to 1 within the dtype's precision.
        x = (x.double() / x.double().sum(-1, keepdim=True)).to(dtype)
    return x


def ref(x_ntc: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    return reference_scores(x_ntc.double(), kind, dtype=torch.float64)


def assert_close(ps: fastbald.PoolScores, r: torch.Tensor, tol: float, where: str = "") -> None:
    for i, name in enumerate(METRICS):
        got = getattr(ps, name)
        assert got is not None, name
        assert got.shape == r[i].shape, (name, got.shape, r[i].shape)
        err = (got.double() - r[i]).abs()
        assert torch.isfinite(got).all(), f"{name} has non-finite values {where}"
        if err.numel() == 0:
            continue
        assert float(err.max()) <= tol, (
            f"{name}: max abs err {float(err.max()):.3g} > {tol:g} {where}"
        )


SHAPES = [(1, 1, 1), (7, 1, 2), (33, 20, 10), (17, 5, 3), (5, 3, 100), (4, 50, 1000), (2, 4, 10000), (40, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["NTC", "TNC", "NCT"])
def test_matches_reference_logits(shape, dtype, layout):
    x = make_input(*shape, "logits", dtype)
    ps = fastbald.scores(to_layout(x, layout), layout=layout, backend="native")
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ps.bald.dtype == out_dtype
    assert_close(ps, ref(x), TOL[dtype], f"{shape} {dtype} {layout}")


@pytest.mark.parametrize("kind", ["log_probs", "probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(33, 20, 10), (3, 7, 300), (5, 1, 2)], ids=str)
def test_input_kinds(shape, dtype, kind):
    x = make_input(*shape, kind, dtype)
    ps = fastbald.scores(x, input=kind, backend="native")
    assert_close(ps, ref(x, kind), TOL[dtype], f"{shape} {dtype} {kind}")


@pytest.mark.parametrize("scale", [0.01, 0.3, 3.0, 20.0, 50.0])
@pytest.mark.parametrize("shape", [(64, 20, 10), (8, 10, 1000), (6, 20, 10000)], ids=str)
def test_logit_scales(scale, shape):
    """(6, 20, 10000) takes the row kernel's recompute path (T*C too large to keep)."""
    x = make_input(*shape, "logits", torch.float32, scale=scale, seed=3)
    assert_close(fastbald.scores(x, backend="native"), ref(x), 1e-5, f"scale {scale}")


@contextlib.contextmanager
def cpu_kernel_forced_to_rows(on: bool = True):
    """Route the loaded CPU build's op to its item (row) kernel whatever T*C is (the library's test
    hook ``_force_row_kernel``; FASTBALD_FORCE_ROW_KERNEL sets it when the library loads)."""
    lib = importlib.import_module(f"fastbald._cpu_{_ops.load()['cpu']}")
    before = lib._force_row_kernel(on)
    try:
        yield
    finally:
        lib._force_row_kernel(before)


@pytest.mark.parametrize("force_row", [False, True], ids=["group-kernel", "row-kernel"])
def test_both_cpu_kernels(force_row):
    """Small T*C takes the lanes-over-items kernel; the test hook forces the other."""
    with cpu_kernel_forced_to_rows(force_row):
        for shape in [(37, 20, 10), (19, 3, 7), (9, 9, 2)]:
            for layout in ("NTC", "TNC", "NCT"):
                x = make_input(*shape, "logits", torch.float32, seed=5)
                ps = fastbald.scores(to_layout(x, layout), layout=layout, backend="native")
                assert_close(ps, ref(x), 1e-5, f"{shape} {layout} row={force_row}")


def test_row_kernel_hook_switches_kernels():
    """The hook really changes the kernel: the two sum in different orders (the row kernel in
    float64 across lanes), so their float32 results differ in the last bits; it is off again after."""
    x = make_input(64, 20, 10, "logits", torch.float32, seed=6)
    group = pool_scores_op(x)
    with cpu_kernel_forced_to_rows():
        rows = pool_scores_op(x)
    assert not torch.equal(group, rows)
    assert float((group - rows).abs().max()) <= 2e-6
    assert torch.equal(pool_scores_op(x), group)
    # FASTBALD_FORCE_ROW_KERNEL sets the hook when the library loads (read once, not per call).
    code = ("import importlib\nfrom fastbald import _ops\n"
            "print(importlib.import_module(f\"fastbald._cpu_{_ops.load()['cpu']}\")._force_row_kernel(False))")
    for env, want in (({"FASTBALD_FORCE_ROW_KERNEL": "1"}, "True"), ({}, "False")):
        full = {k: v for k, v in os.environ.items() if k != "FASTBALD_FORCE_ROW_KERNEL"} | env
        out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want, (env, out.stdout)


def test_non_contiguous_strides():
    base = make_input(40, 30, 24, "logits", torch.float32, seed=7)
    views = {
        "every-other-item": base[::2],
        "sliced-samples": base[:, 3:25:3],
        "sliced-classes": base[:, :, 1::2],
        "all-three": base[1::3, ::4, 2::5],
        "transposed-TC": base.transpose(1, 2)[:, :10, :],  # [N, 24, 30] with swapped strides
    }
    for name, v in views.items():
        assert not v.is_contiguous()
        ps = fastbald.scores(v, backend="native")
        assert_close(ps, ref(v.contiguous()), 1e-5, name)


def _vr_first_nan_rule(x: torch.Tensor) -> torch.Tensor:
    """Variation ratio when rows may hold NaN: each row votes for the argmax (ties: lowest class)
    of its classes before its first NaN, class 0 when the NaN is at class 0."""
    N, T, C = x.shape
    vr = torch.empty(N, dtype=torch.float64)
    for n in range(N):
        votes = []
        for t in range(T):
            row = x[n, t]
            nan = torch.isnan(row).nonzero()
            k = int(nan[0]) if len(nan) else C
            votes.append(int(torch.argmax(row[:k])) if k > 0 else 0)
        vr[n] = 1 - max(votes.count(v) for v in set(votes)) / T
    return vr


@pytest.mark.parametrize("shape", [(3, 5, 40), (37, 20, 10), (19, 3, 7), (5, 40, 100)], ids=str)
def test_unchecked_nan_rows_vote_by_one_rule(shape):
    """check_finite=False: the variation ratio of items with NaN logits does not depend on which
    other metrics are asked for nor on the kernel (group, row), and follows the first-NaN rule."""
    N, T, C = shape
    g = torch.Generator().manual_seed(40)
    x = torch.randn(*shape, generator=g) * 3
    x[0, 1, 5 % C] = math.nan
    x[1, :, 0] = math.nan
    x[2, :, C - 1] = math.nan
    x[-1, T - 1, C // 2] = math.nan
    x[-1, 0, :] = math.nan
    want = _vr_first_nan_rule(x)
    k = METRICS.index("variation_ratio")
    for force_row in (False, True):
        with cpu_kernel_forced_to_rows(force_row):
            every = pool_scores_op(x, check_finite=False)[k].double()
            alone = pool_scores_op(x, metrics=["variation_ratio"], check_finite=False)[k].double()
        assert torch.allclose(every, want, atol=1e-6), (force_row, every, want)
        assert torch.allclose(alone, want, atol=1e-6), (force_row, alone, want)


@pytest.mark.parametrize("shape", [(4, 5, 300), (4, 5, 1000), (4, 3, 5000), (4, 40, 10)], ids=str)
def test_unchecked_invalid_items_are_nan_but_vr(shape):
    """check_finite=False: an item with a NaN row or an all -inf row scores NaN for every metric
    but the variation ratio, in both kernels (the row kernel gave entropy 0, margin 0 and least
    confidence 1 for such items once T * C > 2048), and the other items are unaffected."""
    N, T, C = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 3
    x[0, 1, 5] = math.nan
    x[1, 2, :] = -math.inf
    x[2, 0, 0] = math.inf
    k_vr = METRICS.index("variation_ratio")
    for force_row in (False, True):
        with cpu_kernel_forced_to_rows(force_row):
            out = pool_scores_op(x, check_finite=False).double()
        for k in range(len(METRICS)):
            if k != k_vr:
                assert torch.isnan(out[k, :3]).all(), (force_row, METRICS[k], out[k, :3])
        assert not torch.isnan(out[k_vr, :3]).any(), (force_row, out[k_vr, :3])
        torch.testing.assert_close(out[:, 3:], ref(x[3:]), atol=5e-5, rtol=0)
    # The pure-PyTorch backend (and float64 oracle) follows the same rule, VR included.
    torch.testing.assert_close(ref(x), out, atol=5e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("T, C", [(1, 2048), (2, 1000), (4, 512), (8, 256)], ids=str)
def test_group_kernel_large_c_sums(T, C):
    """The group kernel (T * C <= 2048) at large C: its per-item sums over classes and the
    per-row mean-KL sums are compensated, the per-row probability sums blocked, so float32
    errors do not grow ~C eps (plain running sums gave 1.0-1.7e-5 at C = 1000-2048,
    BALD 1.7e-5 for identical samples, 1.1e-5 for a flat row at C = 2048). Random rows, identical samples and an
    exactly flat row, against float64, both kernels."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, T, C, generator=g)
    x[:20] *= 3.0
    x[20:30] = x[20:30, :1].expand(10, T, C)  # identical samples: BALD 0
    x[30] = 0.0  # a flat row: entropy log C
    for force_row in (False, True):
        with cpu_kernel_forced_to_rows(force_row):
            out = pool_scores_op(x).double()
        err = (out - ref(x)).abs()
        assert err.max() <= 1e-5, (force_row, err.max(1).values)  # flat row, C=2000: 9.5e-6
        assert err[:, :30].max() <= 3e-6, (force_row, err[:, :30].max(1).values)
        assert out[METRICS.index("bald"), 20:30].max() <= 1.5e-6, force_row


def test_extreme_logits_and_masks():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50, 12, 9, generator=g) * 1e4
    x[0] = 0.0  # all equal
    x[1] = -1e4
    x[1, :, 0] = 1e4  # one dominant class
    x[2, :, :3] = 0.0
    x[2, :, 3:] = -math.inf  # masked classes everywhere
    x[3, ::2, :8] = -math.inf  # a single live class in every other sample
    x[4, 5, 2] = -math.inf
    x[5] = -1e4
    for i in range(6, 50):
        x[i, :, torch.randperm(9, generator=g)[:4]] = -math.inf
    for force_row in (False, True):
        with cpu_kernel_forced_to_rows(force_row):
            ps = fastbald.scores(x, backend="native")
        assert_close(ps, ref(x), 1e-5, f"row={force_row}")
        assert float(ps.bald.min()) >= 0
        assert float(ps.entropy[0]) == pytest.approx(math.log(9), abs=1e-6)
        assert float(ps.bald[1]) <= 1e-6 and float(ps.entropy[1]) <= 1e-6
        assert float(ps.entropy[2]) == pytest.approx(math.log(3), abs=1e-6)


@pytest.mark.parametrize("shape", [(20, 20, 10), (5, 10, 1000), (7, 1, 2), (3, 100, 2)], ids=str)
@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_identical_samples_give_zero_bald(shape, scale):
    N, T, C = shape
    one = torch.randn(N, 1, C) * scale
    x = one.expand(N, T, C)  # stride 0 along T
    ps = fastbald.scores(x, backend="native")
    assert float(ps.bald.abs().max()) <= 1e-6
    assert float(ps.variation_ratio.abs().max()) == 0.0
    assert float(ps.mean_std.max()) <= 1e-6
    assert torch.allclose(ps.entropy, ps.expected_entropy, atol=2e-6)


def test_same_result_for_one_and_two_threads():
    x = make_input(3001, 20, 10, "logits", torch.float32, seed=2)
    y = make_input(50, 30, 700, "logits", torch.float32, seed=2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = [pool_scores_op(v) for v in (x, y)]
        torch.set_num_threads(2)
        b = [pool_scores_op(v) for v in (x, y)]
    finally:
        torch.set_num_threads(old)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_metric_subsets_skip_work_but_agree():
    x = make_input(45, 20, 10, "logits", torch.float32, seed=4)
    full = fastbald.scores(x, backend="native")
    for m in METRICS:
        ps = fastbald.scores(x, metrics=[m], backend="native")
        for other in METRICS:
            v = getattr(ps, other)
            if other == m:
                err = float((v - getattr(full, m)).abs().max())
                assert err <= 1e-6, (m, err)
            else:
                assert v is None
    raw = pool_scores_op(x, metrics=["bald"])
    assert torch.isnan(raw[METRICS.index("entropy")]).all()  # not asked for: NaN, not garbage


def test_single_metric_functions_and_numpy_roundtrip():
    x = make_input(30, 8, 5, "probs", torch.float64, seed=9)
    r = ref(x, "probs")
    nct = x.permute(0, 2, 1).contiguous().numpy()  # baal's [N, C, T] probabilities
    fns = {
        "bald": fastbald.bald,
        "entropy": fastbald.predictive_entropy,
        "expected_entropy": fastbald.expected_entropy,
        "variation_ratio": fastbald.variation_ratio,
        "mean_std": fastbald.mean_std,
        "margin": fastbald.margin,
        "least_confidence": fastbald.least_confidence,
    }
    for name, f in fns.items():
        out = f(nct, input="probs", layout="NCT")
        assert isinstance(out, np.ndarray) and out.shape == (30,)
        np.testing.assert_allclose(out, r[METRICS.index(name)].numpy(), atol=1e-9, err_msg=name)


def test_empty_pool():
    for layout in ("NTC", "TNC", "NCT"):
        shape = {"NTC": (0, 5, 3), "TNC": (5, 0, 3), "NCT": (0, 3, 5)}[layout]
        ps = fastbald.scores(torch.randn(shape), layout=layout, backend="native")
        assert ps.bald.shape == (0,)


def test_torch_backend_agrees_with_native():
    x = make_input(64, 20, 10, "logits", torch.float32, seed=8)
    a = fastbald.scores(x, backend="native")
    b = fastbald.scores(x, backend="torch")
    for name in METRICS:
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=2e-6), name


def _cpu_variants_runnable_here() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["avx512", "avx2", "base"], "AVX2": ["avx2", "base"]}.get(cap, ["base"])


@pytest.mark.parametrize("variant", ["avx512", "avx2"])
def test_x86_cpu_builds_keep_their_software_prefetch(variant):
    """The group kernel prefetches the next group's tiles; GCC once deleted those loops silently
    (no prefetch instruction in the binary, 25% slower). Guard: the built library contains them."""
    import glob
    import shutil

    objdump = shutil.which("objdump")
    libs = glob.glob(os.path.join(os.path.dirname(fastbald.__file__), f"_cpu_{variant}*.so"))
    if objdump is None or not libs:
        pytest.skip("needs objdump and the built x86 kernel")
    dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", libs[0]], capture_output=True,
                         text=True, check=True).stdout
    assert dis.count("prefetcht0") >= 4, f"no software prefetch left in {libs[0]}"


@pytest.mark.parametrize("variant", ["avx512", "avx2", "base"])
def test_every_cpu_kernel_build_in_subprocess(variant):
    """Each CPU build (AVX-512, AVX2, portable: what other CPUs load) gives the reference results,
    through both the group kernel (T*C <= 2048, with a partial last group) and the row kernel, and
    catches a NaN / an all-masked row naming the first bad item."""
    if variant not in _cpu_variants_runnable_here():
        pytest.skip(f"this CPU cannot run the {variant} build")
    code = (
        "import torch, fastbald, pytest\n"
        "from fastbald import _ops\n"
        "from fastbald.scores import pool_scores_op\n"
        f"assert _ops.load()['cpu'] == {variant!r}, _ops.load()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(37, 20, 10, generator=g) * 4\n"
        "x[3, :, 2] = float('-inf')\n"
        "y = torch.randn(3, 9, 700, generator=g)\n"
        "z = torch.randn(40, 7, 3, generator=g).double()\n"
        "w = torch.randn(70, 25, 10, generator=g)[::2, 3:23]  # [T][C] tiles, item stride != T*C\n"
        "for v in (x, y, z, w, x[:, :, :2].contiguous(), x.transpose(0, 1).contiguous().transpose(0, 1)):\n"
        "    a = pool_scores_op(v).double()\n"
        "    r = fastbald.reference_scores(v.double(), dtype=torch.float64)\n"
        "    assert float((a - r).abs().max()) < 1e-5, float((a - r).abs().max())\n"
        "for bad, item, what in ((float('nan'), 21, 'NaN'), (float('inf'), 30, 'inf')):\n"
        "    w = x.clone(); w[item, 5, 7] = bad; w[item + 2, 1, 1] = bad\n"
        "    with pytest.raises(ValueError, match=f'item {item}'):\n"
        "        pool_scores_op(w)\n"
        "w = x.clone(); w[17, 4, :] = float('-inf')\n"
        "with pytest.raises(ValueError, match='item 17'):\n"
        "    pool_scores_op(w)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTBALD_CPU_KERNEL=variant)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------
# torch.library integration


def test_opcheck():
    for x in (
        make_input(9, 4, 3, "logits", torch.float32),
        make_input(5, 2, 7, "logits", torch.float64),
        make_input(6, 3, 5, "logits", torch.bfloat16),
        make_input(33, 20, 10, "logits", torch.float32).transpose(0, 1).contiguous().transpose(0, 1),
    ):
        torch.library.opcheck(
            torch.ops.fastbald.pool_scores.default,
            (x, 0, 127, True, 1e-4),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
        )


def test_torch_compile_fullgraph():
    def f(x):
        out = pool_scores_op(torch.log_softmax(x, -1), input_kind="log_probs")
        return out[2] * 2

    x = make_input(40, 20, 10, "logits", torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), f(x))
    x[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="pool item 3"):
        compiled(x)  # the NaN check lives in the op, so it survives compilation


# ------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "x, kwargs, exc, match",
    [
        (torch.randn(4, 5), {}, ValueError, "3 dimensions"),
        (torch.randn(2, 3, 4, 5), {}, ValueError, "3 dimensions"),
        (torch.randn(4, 0, 3), {}, ValueError, "T >= 1"),
        (torch.randn(4, 3, 0), {}, ValueError, "C >= 1"),
        (torch.ones(4, 3, 2, dtype=torch.int64), {}, TypeError, "int64"),
        (torch.ones(4, 3, 2, dtype=torch.bool), {}, TypeError, "bool"),
        (torch.randn(4, 3, 2), {"layout": "CTN"}, ValueError, "layout"),
        (torch.randn(4, 3, 2), {"input": "softmax"}, ValueError, "input"),
        (torch.randn(4, 3, 2), {"backend": "gpu"}, ValueError, "backend"),
        (torch.randn(4, 3, 2), {"metrics": ["bald", "foo"]}, ValueError, "unknown metric"),
        (torch.randn(4, 3, 2, device="meta"), {}, ValueError, "meta"),
        ([[[1.0]]], {}, TypeError, "torch.Tensor or numpy"),
        (np.ones((2, 2, 2), dtype=np.int32), {}, TypeError, "floating"),
    ],
)
def test_bad_arguments(x, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastbald.scores(x, **kwargs)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("shape", [(100, 20, 10), (20, 5, 3000)], ids=str)
def test_nan_names_first_bad_item(shape, backend):
    x = make_input(*shape, "logits", torch.float32)
    x[71 % shape[0], 3, 2] = float("nan")
    x[90 % shape[0], 1, 0] = float("nan")
    first = min(71 % shape[0], 90 % shape[0])
    t, c = (3, 2) if first == 71 % shape[0] else (1, 0)
    with pytest.raises(ValueError, match=rf"pool item {first} \(sample {t}, class {c}\) is NaN"):
        fastbald.scores(x, backend=backend)
    # The check can be skipped; the other items are still right.
    ps = fastbald.scores(x, backend=backend, check_finite=False)
    good = torch.ones(shape[0], dtype=torch.bool)
    good[[71 % shape[0], 90 % shape[0]]] = False
    assert torch.allclose(ps.bald[good].double(), ref(x[good])[2], atol=1e-5)


def test_nan_reports_layout_item_not_memory_order():
    x = make_input(30, 20, 10, "logits", torch.float32)
    x[17, 4, 6] = float("nan")
    with pytest.raises(ValueError, match=r"pool item 17 \(sample 4, class 6\) is NaN"):
        fastbald.scores(to_layout(x, "TNC"), layout="TNC", backend="native")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_inf_and_fully_masked_rows(backend):
    x = make_input(20, 4, 5, "logits", torch.float32)
    y = x.clone()
    y[6, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"pool item 6 \(sample 1, class 1\) is \+inf"):
        fastbald.scores(y, backend=backend)
    y = x.clone()
    y[8, 2, :] = -float("inf")
    with pytest.raises(ValueError, match=r"pool item 8 \(sample 2\) masks every class \(all -inf\)"):
        fastbald.scores(y, backend=backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_probs_that_do_not_sum_to_one(backend):
    p = make_input(30, 6, 4, "probs", torch.float32)
    q = p.clone()
    q[12, 3] *= 1.5
    with pytest.raises(ValueError, match="pool item 12"):
        fastbald.scores(q, input="probs", backend=backend)
    q = p.clone()
    q[4, 0, 0] = -0.1
    q[4, 0, 1] += 0.1
    with pytest.raises(ValueError, match=r"pool item 4 \(sample 0, class 0\) is negative"):
        fastbald.scores(q, input="probs", backend=backend)
    q = p.clone()
    q[7, 2] = 0.0
    q[7, 2, 1] = 2.0  # one class with p > 1
    with pytest.raises(ValueError, match="pool item 7"):
        fastbald.scores(q, input="probs", backend=backend)
    # A looser tolerance accepts rows off by 1e-3.
    q = p.clone()
    q[5] *= 1.001
    with pytest.raises(ValueError, match="pool item 5"):
        fastbald.scores(q, input="probs", backend=backend)
    fastbald.scores(q, input="probs", backend=backend, prob_tol=1e-2)


def test_native_op_argument_checks():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="input_kind"):
        torch.ops.fastbald.pool_scores(x, 7, 127, True, 1e-4)
    with pytest.raises(ValueError, match="metrics"):
        torch.ops.fastbald.pool_scores(x, 0, 0, True, 1e-4)
    with pytest.raises(ValueError, match=r"\[N, T, C\]"):
        torch.ops.fastbald.pool_scores(x[0], 0, 127, True, 1e-4)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.fastbald.pool_scores(x.int(), 0, 127, True, 1e-4)


def test_pool_scores_op_wrapper():
    """The named wrapper passes names, not codes, and says which name is wrong."""
    x = make_input(11, 6, 4, "probs", torch.float64, seed=3)
    r = ref(x, "probs")
    out = pool_scores_op(x, metrics=["margin", "bald"], input_kind="probs", prob_tol=1e-9)
    rows = [METRICS.index("bald"), METRICS.index("margin")]
    assert torch.allclose(out[rows], r[rows], atol=1e-9)
    assert torch.isnan(out[[i for i in range(len(METRICS)) if i not in rows]]).all()
    with pytest.raises(ValueError, match="input_kind must be one of"):
        pool_scores_op(x, input_kind="probabilities")
    with pytest.raises(ValueError, match="unknown metric 'BALD'"):
        pool_scores_op(x, metrics=["BALD"])


def test_unavailable_native_backend(monkeypatch):
    from fastbald import _ops

    scores_mod = sys.modules["fastbald.scores"]

    monkeypatch.setattr(_ops, "native_available", lambda device: False)
    monkeypatch.setattr(scores_mod, "_warned_fallback", False)
    x = make_input(5, 3, 4, "logits", torch.float32)
    with pytest.raises(RuntimeError, match="unavailable"):
        fastbald.scores(x, backend="native")
    with pytest.warns(RuntimeWarning, match="pure-PyTorch backend"):
        ps = fastbald.scores(x)  # auto: falls back, warns once
    assert_close(ps, ref(x), 1e-5)


# ------------------------------------------------------------------------------------------
# Property-based


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(0, 40),
    T=st.integers(1, 40),
    C=st.integers(1, 70),
    scale=st.floats(0.01, 30),
    layout=st.sampled_from(["NTC", "TNC", "NCT"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(N, T, C, scale, layout, dtype, seed):
    x = make_input(N, T, C, "logits", dtype, scale=scale, seed=seed)
    ps = fastbald.scores(to_layout(x, layout), layout=layout, backend="native")
    assert_close(ps, ref(x), TOL[dtype], f"{(N, T, C)} {dtype} {layout}")


# ------------------------------------------------------------------------------------------
# 64-bit indexing


@pytest.mark.slow
def test_more_than_2_31_elements():
    """N*T*C > 2^31 (bfloat16, 4.3 GB): the last items must be read from the right place."""
    T, C = 20, 10
    N = (2**31) // (T * C) + 257
    try:
        x = torch.empty(N, T, C, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("not enough memory for a 4.3 GB tensor")
    g = torch.Generator().manual_seed(0)
    pattern = (torch.randn(4099, T, C, generator=g) * 3).to(torch.bfloat16)
    for i in range(0, N, 4099):
        n = min(4099, N - i)
        x[i : i + n] = pattern[:n]
    assert x.numel() > 2**31
    out = pool_scores_op(x, prob_tol=1e-2)
    tail = slice(N - 300, N)
    r = ref(x[tail].clone())
    err = (out[:, tail].double() - r).abs().max()
    assert float(err) <= 1e-5
    # A NaN beyond element 2^31 is found and named.
    x[N - 5, 7, 3] = float("nan")
    with pytest.raises(ValueError, match=f"pool item {N - 5}"):
        pool_scores_op(x, metrics=["bald"], prob_tol=1e-2)


def test_metric_table_matches_the_op_bits_and_the_reference():
    """fastbald.metrics is the one table: bit b of the op's mask fills row b, and that row is the
    metric the table names (checked against the float64 reference, one metric at a time)."""
    from fastbald.metrics import METRIC_TABLE, N_METRICS, metrics_mask, parse_metrics

    x = make_input(40, 12, 7, "logits", torch.float64, seed=21)
    r = ref(x)
    assert N_METRICS == len(METRICS) == r.shape[0]
    for m in METRIC_TABLE:
        assert metrics_mask([m.name]) == 1 << m.bit
        out = torch.ops.fastbald.pool_scores(x, 0, 1 << m.bit, True, 1e-6)
        assert out.shape == (N_METRICS, 40)
        assert torch.allclose(out[m.bit], r[m.bit], atol=1e-9), m.name
        others = [b for b in range(N_METRICS) if b != m.bit]
        assert torch.isnan(out[others]).all(), m.name
    assert metrics_mask(None) == metrics_mask("all") == (1 << N_METRICS) - 1
    assert parse_metrics(["margin", "bald", "margin"]) == ("bald", "margin")  # bit order, no repeats
    with pytest.raises(ValueError, match="unknown metric 'power'"):
        parse_metrics(["bald", "power"])
    with pytest.raises(ValueError, match="at least one"):
        parse_metrics([])
    # Small-means-uncertain agrees with the ranking acquire() uses.
    from fastbald.acquire import ASCENDING

    assert ASCENDING == {m.name for m in METRIC_TABLE if m.ascending} == {"margin"}


def test_acquisition_table():
    from fastbald.acquire import METHODS
    from fastbald.metrics import ACQUISITION_TABLE, ACQUISITIONS, acquisition, canonical_acquisition

    assert METHODS == (*METRICS, "random", "power_bald", "batchbald")
    assert ACQUISITIONS[:4] == ("bald", "variation_ratio", "entropy", "mean_std")
    for a in ACQUISITION_TABLE:
        assert canonical_acquisition(a.name) == a.name
        assert a.metric is None or a.metric in METRICS
        for al in a.aliases:
            assert canonical_acquisition(al) == a.name
    assert acquisition("Max Entropy").metric == "entropy"
    assert acquisition("Random").rule == "uniform" and acquisition("random").metric is None
    assert acquisition("margin").ascending and not acquisition("bald").ascending
    with pytest.raises(ValueError, match="unknown acquisition function 'coreset'"):
        canonical_acquisition("coreset")


def test_reference_mean_std_follows_the_definition():
    """mean_std of the oracle and of the pure-PyTorch backend is (1/C) sum_c std_t(p_tc) computed by
    its definition (numpy's two-pass std in float64), also where all samples (nearly) agree and
    E[p^2] - pbar^2 would cancel (float32: errors up to ~1e-3 before)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 20, 10, generator=g, dtype=torch.float64) * 3
    z[:32] = z[:32, :1] + 1e-4 * torch.randn(32, 20, 10, generator=g, dtype=torch.float64)
    z[40:48] *= 30  # near one-hot predictions
    p = torch.softmax(z, -1).numpy()
    want = p.std(axis=1).mean(-1)
    i = METRICS.index("mean_std")
    got64 = reference_scores(z, "logits", dtype=torch.float64)[i].numpy()
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-15)
    z32 = z.float()
    want32 = torch.softmax(z32.double(), -1).numpy().std(axis=1).mean(-1)
    got32 = fastbald.mean_std(z32, backend="torch").double().numpy()
    np.testing.assert_allclose(got32, want32, rtol=0, atol=2e-7)


def test_misspelt_cpu_kernel_variable_warns(monkeypatch):
    monkeypatch.setenv("FASTBALD_CPU_KERNEL", "AVX2")  # the values are lower case
    with pytest.warns(RuntimeWarning, match=r"FASTBALD_CPU_KERNEL='AVX2' is not one of avx512, avx2, base"):
        variant = _ops._cpu_variant()
    assert variant in _ops.CPU_VARIANTS
    monkeypatch.setenv("FASTBALD_CPU_KERNEL", "base")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ops._cpu_variant() == "base"
