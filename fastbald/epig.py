"""EPIG, the expected predictive information gain (Bickford Smith, Kirsch, Farquhar, Gal, Foster &
Rainforth, "Prediction-Oriented Bayesian Active Learning", AISTATS 2023), chunked and in
memory that does not grow with the pool.

For a pool item x and target items x*_1..x*_{N_t} (samples of the inputs the model will be used on),
with K posterior samples p_k(y|x) (MC dropout, ensembles, ...)::

    EPIG(x) = (1/N_t) sum_t I(y; y*_t | x, x*_t)
            = (1/N_t) sum_t sum_{c,c'} P_t(c,c') log( P_t(c,c') / (p(c) q_t(c')) )
    P_t(c,c') = (1/K) sum_k p_k(y=c|x) p_k(y*=c'|x*_t),  p = (1/K) sum_k p_k(y|x),  q_t likewise.

How it is computed (``epig``): per chunk of pool items, one matrix product gives the ratios
``R = P / (p q)`` directly (the pool rows are pre-scaled by 1/p, the target columns by 1/(K q)),
and the score is ``(1/N_t) sum_{c,t,c'} p(c) q_t(c') f(R)`` with ``f(R) = R log R - R + 1 >= 0``
(the KL integrand; the ``-R + 1`` part sums to 0). Every term is non-negative, so nothing cancels:
baal's and the epig repository's ``H[p] + E_t H[q_t] - E_t H[P_t]`` subtracts entropies of a few
nats to get EPIGs that are often 1e-3 or smaller. The ``[chunk, C, N_t, C]`` block is the only
temporary of that size (at most ``chunk_bytes``; the targets are split into blocks too when one
pool item's ``[C, N_t, C]`` exceeds it); ``[N_p, N_t, C, C]`` or ``[N_p, C, N_t * C]`` is never
materialised. Scores are clamped to ``[0, log C]`` (the MI of a C-class variable), float32 for
float32/half input, float64 for float64.

On the CPU the inner loop is native (``torch.ops.fastbald.epig_block``, csrc/cpu/epig_cpu.cpp, in
its own extension ``fastbald._epig_cpu``): per task of a few dozen pool items, in one parallel
region, the softmax and scaling, the product by oneDNN's float32 matmul (about twice MKL's sgemm
on AMD CPUs), and ONE pass over the block (default 2 MB per thread, in cache) that evaluates f with
a vectorised AVX-512 logarithm and sums it, instead of six elementwise PyTorch passes; the product
(``2 K`` flops per joint entry) is then most of the time. The PyTorch loop below is the fallback
(other devices, or the extension not built) and the reference the native path is tested against.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from . import _ops

__all__ = ["epig", "epig_reference"]

_INPUTS = ("log_probs", "probs", "logits")

_NATIVE: dict[str, Any] = {}
# Bytes of the native path's [items, C, t, C] block per thread: stays in L2/L3 (the product is at
# oneDNN's peak with 1-2.5 MB blocks on this project's CPU, and 4x slower at 10 MB, memory-bound).
_NATIVE_BLOCK_BYTES = 2 << 20


def _native_op():
    """``torch.ops.fastbald.epig_block`` when the CPU extension is built, else None."""
    return _ops.extension_op("fastbald._epig_cpu", "epig_block", _NATIVE)


def _tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach(), False


def _log_probs_tol(dtype: torch.dtype) -> float:
    """How far from 0 the logsumexp of a sample may be for ``input='log_probs'`` (the input
    dtype's rounding), in the PyTorch check and in the native op."""
    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def _probs(x: torch.Tensor, input: str, name: str, dtype: torch.dtype) -> torch.Tensor:
    """[N, K, C] probabilities in ``dtype``, checked: finite, and (``probs``) rows summing to 1."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values, got {x.dtype}")
    bad = torch.isnan(x) | (torch.isposinf(x))
    if input == "probs":
        bad |= torch.isinf(x) | (x < 0)
    if bool(bad.any()):
        n, k, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite{' and >= 0' if input == 'probs' else ''}: item {n} "
            f"(sample {k}, class {c}) is {x[n, k, c].item()}"
        )
    if input == "probs":
        p = x.to(dtype)
        s = p.sum(-1)
        tol = 1e-3 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
        off = (s - 1).abs() > tol
        if bool(off.any()):
            n, k = (int(v) for v in off.nonzero()[0])
            raise ValueError(
                f"{name}: probabilities must sum to 1 over classes; item {n}, sample {k} sums to "
                f"{s[n, k].item():.6g} (pass input='log_probs' or 'logits' for log-space input)"
            )
        return p / s.unsqueeze(-1)
    # log_probs or logits: normalise per sample (for log-probs only rounding is removed).
    xd = x.to(dtype)
    lse = torch.logsumexp(xd, -1, keepdim=True)
    if bool(torch.isneginf(lse).any()):  # a sample with every class at -inf
        n, k = (int(v) for v in torch.isneginf(lse).squeeze(-1).nonzero()[0])
        raise ValueError(f"{name}: item {n}, sample {k} has every class at -inf (no probability mass)")
    if input == "log_probs":
        tol = _log_probs_tol(x.dtype)
        off = lse.squeeze(-1).abs() > tol
        if bool(off.any()):
            n, k = (int(v) for v in off.nonzero()[0])
            raise ValueError(
                f"{name}: input='log_probs' but item {n}, sample {k} has logsumexp "
                f"{lse[n, k, 0].item():.6g}, not 0 (tolerance {tol:g}): pass input='probs' for "
                "probabilities, input='logits' for unnormalised scores"
            )
    return xd.sub_(lse).exp_() if xd is not x else (xd - lse).exp_()


def _check_shapes(pool: torch.Tensor, targ: torch.Tensor) -> None:
    for name, x in (("pool", pool), ("target", targ)):
        if x.dim() != 3:
            raise ValueError(
                f"{name} predictions must be [N, K, C] (items, posterior samples, classes), got "
                f"shape {tuple(x.shape)}"
            )
    if pool.shape[1] != targ.shape[1]:
        raise ValueError(
            f"pool and target predictions must come from the same K posterior samples: pool has "
            f"K={pool.shape[1]}, target K={targ.shape[1]} (shapes {tuple(pool.shape)}, "
            f"{tuple(targ.shape)})"
        )
    if pool.shape[2] != targ.shape[2]:
        raise ValueError(
            f"pool and target predictions must have the same classes: pool has C={pool.shape[2]}, "
            f"target C={targ.shape[2]}"
        )
    if pool.shape[1] < 1 or pool.shape[2] < 1:
        raise ValueError(f"need K >= 1 samples and C >= 1 classes, got shape {tuple(pool.shape)}")
    if targ.shape[0] < 1:
        raise ValueError("need at least one target item (target predictions [N_t >= 1, K, C])")


def epig(
    pool: Any,
    target: Any,
    *,
    input: str = "log_probs",
    chunk_bytes: int | None = None,
) -> Any:
    """EPIG of every pool item, ``[N_p]``, in nats, clamped to ``[0, log C]``.

    Args:
        pool: ``[N_p, K, C]`` predictions on the pool (tensor or numpy array).
        target: ``[N_t, K, C]`` predictions on target inputs, from the same K posterior samples
            (sample k of both must be the same model / dropout mask).
        input: ``"log_probs"`` (default; each sample's logsumexp must be 0 within 1e-3, 5e-2
            for float16/bfloat16, else ValueError naming the item), ``"logits"`` (each sample is
            normalised) or ``"probs"`` (each sample must sum to 1 within 1e-4).
        chunk_bytes: bound on the ``[chunk, C, t, C]`` block of ``chunk`` pool items by ``t``
            target items (two such buffers; the targets are split into blocks of ``t`` items only
            when one pool item's ``[C, N_t, C]`` exceeds it; at least one item by one target
            item, ``C^2`` elements). Native CPU path: one such block per thread (the product's
            output; default 2 MB, in cache), plus per thread the block's scaled pool
            probabilities (``[chunk * C, K]``), and the pool converted to float32/float64 in
            pieces of 16 MB when it is another dtype (or ``input='probs'``). PyTorch path
            (other devices, extension not built): two such buffers, default 8 MB with one torch
            thread, 64 MB with more (fewer parallel regions: measured 4x faster with 2 threads
            on a busy machine, where every region waits for its slowest thread), plus one pool
            chunk's probabilities (``[chunk, K, C]``, three times). Both: the targets'
            probabilities (``[N_t, K, C]``, twice); nothing grows with ``N_p``.
    Returns: float32 scores (float64 for float64 input), numpy if ``pool`` was numpy.
    """
    if input not in _INPUTS:
        raise ValueError(f"input must be one of {_INPUTS}, got {input!r}")
    x, was_numpy = _tensor(pool, "pool")
    y, _ = _tensor(target, "target")
    _check_shapes(x, y)
    if x.device != y.device:
        raise ValueError(f"pool and target must be on the same device, got {x.device} and {y.device}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    K, C = x.shape[1], x.shape[2]
    q_t = _probs(y, input, "target", dtype)  # [N_t, K, C]
    qbar = q_t.mean(1)  # [N_t, C]
    tiny = torch.finfo(dtype).tiny
    # Target columns scaled by 1 / (K q): R = (A / p)^T (B / (K q)) = P / (p q). A mean probability
    # below the smallest normal number (a class at log-prob < ~-87 in every sample in float32,
    # ~-708 in float64) counts as 0: its 1/q would overflow to inf (EPIG NaN), and its whole
    # contribution is below 1e-36 nats (1e-306 in float64).
    inv_q = torch.where(qbar >= tiny, 1.0 / (K * qbar), torch.zeros_like(qbar))
    b_all = q_t * inv_q[:, None, :]  # [N_t, K, C]: target probabilities / (K q)
    del q_t
    op = _native_op() if x.device.type == "cpu" else None
    if op is not None:
        out = _epig_native(op, x, input, b_all, qbar, chunk_bytes, dtype)
    else:
        out = _epig_torch(x, input, b_all, qbar, chunk_bytes, dtype)
    out.clamp_(0.0, math.log(C))
    return out.cpu().numpy() if was_numpy else out


def _blocking(N_p: int, N_t: int, C: int, dtype: torch.dtype, chunk_bytes: int) -> tuple[int, int]:
    """(pool items, target items) per ``[chunk, C, t, C]`` block of at most ``chunk_bytes`` (at
    least one by one); the targets are split only when one pool item's ``[C, N_t, C]`` exceeds it."""
    pair = C * C * (torch.finfo(dtype).bits // 8)  # bytes of one pool item by one target item
    t_blk = max(1, min(N_t, int(chunk_bytes) // pair))
    return max(1, min(N_p, int(chunk_bytes) // (pair * t_blk))), t_blk


def _epig_native(
    op: Any, x: torch.Tensor, input: str, b_all: torch.Tensor, qbar: torch.Tensor, chunk_bytes: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Unclamped EPIG by ``torch.ops.fastbald.epig_block`` (CPU), in pieces of ~16 MB of pool."""
    if not x.is_floating_point():
        raise TypeError(f"pool must hold floating-point values, got {x.dtype}")
    N_p, K, C = x.shape
    N_t = qbar.shape[0]
    items, t_blk = _blocking(N_p, N_t, C, dtype, _NATIVE_BLOCK_BYTES if chunk_bytes is None else chunk_bytes)
    bt = b_all.permute(0, 2, 1).reshape(N_t * C, K).contiguous()  # rows (t, c')
    w = (qbar / N_t).reshape(N_t * C).contiguous()
    if input == "log_probs":
        tol = _log_probs_tol(x.dtype)
    else:
        tol = math.inf  # logits: any offset; probs: checked by _probs, then passed as logs
    piece = max(items * 64, (16 << 20) // (K * C * (torch.finfo(dtype).bits // 8)))
    out = torch.empty(N_p, dtype=dtype)
    for s in range(0, N_p, piece):
        e = min(N_p, s + piece)
        if input == "probs":
            try:
                xs = _probs(x[s:e], input, "pool", dtype).log_()
            except ValueError as err:
                raise _shift_item(err, s) from None
        else:
            xs = x[s:e].to(dtype)
        o, bad_t = op(xs, bt, w, items, t_blk * C, tol, 1)
        bad = int(bad_t[0])
        if bad >= 0:  # name the item as the PyTorch path does
            try:
                _probs(x[s + bad : s + bad + 1], input, "pool", dtype)
            except ValueError as err:
                raise _shift_item(err, s + bad) from None
            # The two checks disagree only by rounding (a logsumexp at the tolerance): the
            # PyTorch path decides this piece.
            o = _epig_torch(x[s:e], input, b_all, qbar, chunk_bytes, dtype, offset=s)
        out[s:e] = o
    return out


def _epig_torch(
    x: torch.Tensor, input: str, b_all: torch.Tensor, qbar: torch.Tensor, chunk_bytes: int | None,
    dtype: torch.dtype, offset: int = 0,
) -> torch.Tensor:
    """Unclamped EPIG by PyTorch operations (any device): the fallback and the native path's
    reference. ``offset``: index of x's first item in the whole pool (error messages)."""
    N_p, K, C = x.shape
    N_t = qbar.shape[0]
    tiny = torch.finfo(dtype).tiny
    if chunk_bytes is None:
        chunk_bytes = (8 << 20) if torch.get_num_threads() == 1 else (64 << 20)
    chunk, t_blk = _blocking(N_p, N_t, C, dtype, chunk_bytes)
    # [K, t * C] target columns per block (contiguous), and the target weights q_t(c') / N_t.
    b_ktc = b_all.permute(1, 0, 2)  # [K, N_t, C]
    blocks = [
        (b_ktc[:, j : j + t_blk].reshape(K, -1).contiguous(), (qbar[j : j + t_blk] / N_t).reshape(-1, 1))
        for j in range(0, N_t, t_blk)
    ]
    del b_ktc
    out = torch.empty(N_p, dtype=dtype, device=x.device)
    # Two [chunk * C, t * C] buffers reused by every chunk (no allocation, no page faults).
    r_buf = torch.empty(chunk * C * t_blk * C, dtype=dtype, device=x.device)
    f_buf = torch.empty_like(r_buf)
    for s in range(0, N_p, chunk):
        e = min(N_p, s + chunk)
        try:
            a = _probs(x[s:e], input, "pool", dtype)  # [B, K, C]
        except ValueError as err:  # name the pool item by its index in the whole pool
            raise _shift_item(err, offset + s) from None
        p = a.mean(1)  # [B, C]
        inv_p = torch.where(p >= tiny, 1.0 / p, torch.zeros_like(p))  # subnormal p: 0 (see inv_q)
        a_t = (a * inv_p[:, None, :]).transpose(1, 2).reshape((e - s) * C, K)  # [B*C, K]
        s_bc = None
        for b, w_tc in blocks:
            rows, cols = (e - s) * C, b.shape[1]
            r = torch.matmul(a_t, b, out=r_buf[: rows * cols].view(rows, cols))  # P / (p q)
            # f(R) = R log R - R + 1 (>= 0); R = 0 (P = 0) gives its limit 1.
            f = torch.log(r.clamp_min_(tiny), out=f_buf[: rows * cols].view(rows, cols))
            f.mul_(r).sub_(r).add_(1.0)
            part = f @ w_tc  # [B*C, 1]: sum over the block's (t, c') of q_t(c') f / N_t
            s_bc = part if s_bc is None else s_bc.add_(part)
        assert s_bc is not None
        out[s:e] = (s_bc.view(e - s, C) * p).sum(1)
    return out


def _shift_item(err: ValueError, offset: int) -> ValueError:
    msg = re.sub(r"item (\d+)", lambda m: f"item {int(m.group(1)) + offset}", str(err), count=1)
    return ValueError(msg)


def epig_reference(pool: torch.Tensor, target: torch.Tensor, input: str = "log_probs") -> torch.Tensor:
    """EPIG by its definition in float64, materialising ``[N_p, N_t, C, C]``: a test oracle for
    small inputs only."""
    _check_shapes(pool, target)
    a = _probs(pool, input, "pool", torch.float64)
    b = _probs(target, input, "target", torch.float64)
    K = a.shape[1]
    joint = torch.einsum("pkc,tkd->ptcd", a, b) / K  # [N_p, N_t, C, C]
    indep = a.mean(1)[:, None, :, None] * b.mean(1)[None, :, None, :]
    mi = torch.where(joint > 0, joint * (torch.log(joint) - torch.log(indep)), torch.zeros_like(joint))
    return mi.sum((-2, -1)).mean(1)
