"""Gradients of the scores: the native op's registered backward against finite differences and the
pure-PyTorch backend, masked classes and zero probabilities (zero gradients, never NaN), the
greedy BatchBALD op (refuses), and the ops' availability right after ``import fastbald``.

The native kernels compute no gradients; ``fastbald::pool_scores``'s backward is the pure-PyTorch
implementation's (the same math), so the two backends must give the same gradient.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbald

pytestmark = pytest.mark.usefixtures("native_cpu")

REPO = Path(__file__).resolve().parents[1]
SMOOTH = ("entropy", "expected_entropy", "bald", "mean_std", "margin", "least_confidence")


def _pool(kind: str, N: int = 5, T: int = 4, C: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, T, C, generator=g, dtype=torch.float64) * 2
    if kind == "log_probs":
        z = torch.log_softmax(z, -1)
    elif kind == "probs":
        z = torch.softmax(z, -1)
    return z.requires_grad_(True)


def _grad(x: torch.Tensor, metric: str, kind: str, backend: str) -> torch.Tensor:
    """d sum_n w_n score_n / dx for fixed weights w (so that items do not share one gradient)."""
    x = x.detach().requires_grad_(True)
    s = getattr(fastbald.scores(x, input=kind, backend=backend, metrics=[metric]), metric)
    w = torch.linspace(0.5, 1.5, s.shape[0], dtype=s.dtype)
    (g,) = torch.autograd.grad((s * w).sum(), x)
    return g


@pytest.mark.parametrize("kind", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("metric", SMOOTH)
def test_native_gradient_passes_gradcheck_and_equals_the_torch_backend(kind: str, metric: str) -> None:
    x = _pool(kind)
    # gradcheck moves probabilities off the simplex by eps: loosen the sum check for it.
    f = lambda t: getattr(  # noqa: E731
        fastbald.scores(t, input=kind, backend="native", metrics=[metric], prob_tol=1e-3), metric
    )
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, check_undefined_grad=False)
    native, torch_ = _grad(x, metric, kind, "native"), _grad(x, metric, kind, "torch")
    assert native.abs().max() > 0
    assert torch.equal(native, torch_)


def test_variation_ratio_has_zero_gradient_and_unasked_metrics_do_not_leak() -> None:
    x = _pool("logits")
    assert torch.equal(_grad(x, "variation_ratio", "logits", "native"), torch.zeros_like(x))
    # A backward through the BALD row alone equals the BALD-only computation's.
    x2 = x.detach().requires_grad_(True)
    all_rows = fastbald.scores(x2)  # every metric computed
    (g,) = torch.autograd.grad(all_rows.bald.sum(), x2)
    (g_only,) = torch.autograd.grad(fastbald.bald(x2).sum(), x2)
    assert torch.allclose(g, g_only, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_masked_classes_get_zero_gradient_and_the_rest_that_of_the_unmasked_problem(backend: str) -> None:
    """A -inf logit is a class that does not exist: the scores (so their gradients) equal those of
    the pool without it, and the masked entries get gradient 0, not NaN (the unguarded formulas
    multiply a zero gradient by -inf)."""
    x = _pool("logits", N=4, T=5, C=6).detach()
    masked = x.clone()
    masked[:, :, 0] = -math.inf  # class 0 gone everywhere
    for metric in SMOOTH:
        if metric == "margin":  # the margin's top-2 of 5 vs 6 classes is the same here only by luck
            continue
        g = _grad(masked, metric, "logits", backend)
        assert torch.isfinite(g).all(), metric
        assert torch.equal(g[:, :, 0], torch.zeros_like(g[:, :, 0])), metric
        g_small = _grad(x[:, :, 1:], metric, "logits", backend)
        if metric == "mean_std":  # a mean over classes: the dead class counts with std 0
            g_small = g_small * 5 / 6
        assert torch.allclose(g[:, :, 1:], g_small, rtol=0, atol=1e-12), metric


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_zero_probabilities_partial_masks_and_t1_give_finite_gradients(backend: str) -> None:
    p = torch.softmax(_pool("logits", N=3, T=4, C=5).detach(), -1)
    p[:, :, 1] = 0.0
    p = p / p.sum(-1, keepdim=True)
    z = _pool("logits", N=3, T=4, C=5).detach()
    z[0, 0, :3] = -math.inf  # masked in one sample only
    one = _pool("logits", N=3, T=1, C=5).detach()  # T = 1: every variance is 0 (sqrt's kink)
    for x, kind in ((p, "probs"), (z, "logits"), (one, "logits")):
        for metric in SMOOTH:
            assert torch.isfinite(_grad(x, metric, kind, backend)).all(), (kind, metric)


def test_half_precision_gradient_is_that_of_float32() -> None:
    x = _pool("logits").detach().float()
    g32 = _grad(x, "bald", "logits", "native")
    g16 = _grad(x.bfloat16(), "bald", "logits", "native")
    assert g16.dtype == torch.bfloat16
    assert torch.allclose(g16.float(), g32, atol=2e-2 * g32.abs().max().item())


def test_opcheck_with_autograd() -> None:
    from fastbald._ops import load

    load()
    for x in (_pool("logits"), _pool("probs").detach().float().requires_grad_(True)):
        kind = 0 if x.dtype == torch.float64 else 2
        torch.library.opcheck(torch.ops.fastbald.pool_scores.default, (x, kind, 127, True, 1e-4))


def test_batchbald_op_refuses_to_differentiate() -> None:
    lp = torch.log_softmax(_pool("logits", N=8, T=6, C=3), -1)
    idx, scores, _ = torch.ops.fastbald.batchbald.default(lp, 2, 100, 0, True, False, 1e-4)
    with pytest.raises(RuntimeError, match="batchbald is not differentiable"):
        scores.sum().backward()


def test_ops_exist_and_compile_right_after_import() -> None:
    """In a fresh process: the ops are registered by ``import fastbald`` alone, and
    ``torch.compile(fullgraph=True)`` traces ``fastbald.scores`` and its backward (the tests'
    conftest loads the extension early, which hid a lazy load inside the traced function)."""
    code = (
        "import torch, fastbald\n"
        "assert hasattr(torch.ops.fastbald, 'pool_scores')\n"
        "f = torch.compile(lambda x: fastbald.scores(x, metrics=['bald']).bald.sum(), fullgraph=True,"
        " backend='aot_eager')\n"
        "x = torch.randn(50, 5, 4, requires_grad=True)\n"
        "y = f(x); y.backward()\n"
        "x2 = x.detach().requires_grad_(True); fastbald.bald(x2).sum().backward()\n"
        "assert torch.allclose(y, fastbald.bald(x).sum()) and torch.allclose(x.grad, x2.grad)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_branchless_reference_gives_the_same_scores(kind: str) -> None:
    """The backward's trace-friendly reference (no branch on NaN / invalid rows) computes what
    the torch backend does, NaN and invalid items included."""
    from fastbald.reference import _scores_chunk

    x = _pool(kind, N=6, T=3, C=4).detach()
    x[1, 0, 2] = math.nan
    x[2, 1, :] = -math.inf if kind == "logits" else 0.0
    x[3, 2, 0] = math.inf
    a = _scores_chunk(x, kind, torch.float64)
    b = _scores_chunk(x, kind, torch.float64, branchless=True)
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.isnan(a).any()
    assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))


@pytest.mark.parametrize("metric", ["bald", "entropy", "mean_std"])
def test_second_order_gradients_through_the_native_op(metric: str) -> None:
    """create_graph=True: the native op's gradient is itself differentiable (gradgradcheck), and
    its second order equals the torch backend's."""
    x = _pool("logits", N=3, T=3, C=4)
    f = lambda t: getattr(fastbald.scores(t, backend="native", metrics=[metric]), metric)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-5)

    def hvp(backend: str) -> torch.Tensor:
        xx = x.detach().requires_grad_(True)
        s = getattr(fastbald.scores(xx, backend=backend, metrics=[metric]), metric).sum()
        (g,) = torch.autograd.grad(s, xx, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), xx)
        return h

    h = hvp("native")
    assert h.abs().max() > 0 and torch.allclose(h, hvp("torch"), rtol=0, atol=1e-12)
