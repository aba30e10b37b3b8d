"""The CUDA kernels of fastbald::batchbald (csrc/cuda/batchbald_kernels.h) in the host emulator.

The emulator (csrc/cuda/emu/batchbald_emu.cpp, built here with g++) runs the very kernel bodies and
host driver (``bb::drive``) that the CUDA op runs, each block's threads as fibers that yield at
``__syncthreads``, in a seeded shuffled order, with shared memory and the workspace poisoned (NaN)
beforehand. Every case is compared with the CPU op (``torch.ops.fastbald.batchbald``, lazy=False:
the CUDA op evaluates every candidate at every step): the SAME indices, scores within
``SCORE_TOL`` (float64 compute: 1e-9; float32: 2e-5, the CPU op's own float32-vs-float64 tolerance
of tests/test_batchbald.py), the same per-step evaluation counts, and, for the exact regime, the
CPU's lazy greedy and the float64 brute-force joint MI too. On a CUDA machine the real op is
compared the same way (``test_cuda_op_matches_cpu``).
"""

from __future__ import annotations

import math
import struct
import subprocess
import tempfile
from pathlib import Path

import emulator_build
import numpy as np
import pytest
import torch
from emulator_build import EMU_ENV
from test_batchbald import joint_mi, make_log_probs

from fastbald import _ops

pytestmark = pytest.mark.skipif(not _ops.load()["native"], reason="native extension not built")

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = [
    CSRC / "cuda" / "emu" / "batchbald_emu.cpp",
    CSRC / "cuda" / "emu" / "scheduler.h",
    CSRC / "cuda" / "batchbald_kernels.h",
    CSRC / "cuda" / "device_compat.h",
    CSRC / "batchbald_math.h",
    CSRC / "host_device.h",
]
SCORE_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def build_emulator(flavour: str = "plain") -> Path:
    """The BatchBALD emulator of the given flavour (see tests/emulator_build.py)."""
    return emulator_build.build_emulator(SOURCES, "bbemu", flavour, timeout=600)


@pytest.fixture(scope="module")
def emulator() -> Path:
    return build_emulator()


def emu_batchbald(
    exe: Path,
    lp: torch.Tensor,
    b: int,
    M: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    prob_tol: float = 1e-3,
    max_block: int = 0,
    max_grid: int = 0,
    force_scratch: bool = False,
    sched_seed: int = 1,
    lazy: bool = False,
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the emulated CUDA BatchBALD on lp ([N, K, C] float32/float64 view of any strides)."""
    assert lp.dtype in (torch.float32, torch.float64)
    N, K, C = lp.shape
    st = lp.untyped_storage()
    isz = lp.element_size()
    numel = st.nbytes() // isz
    base = torch.empty(0, dtype=lp.dtype).set_(st, 0, (numel,), (1,))
    raw = base.numpy().tobytes()
    hdr = struct.pack(
        "<8s18qd",
        b"FBBBEM1\0",
        1 if lp.dtype == torch.float64 else 0,
        N, K, C, *lp.stride(), numel, lp.storage_offset(), b, M, seed,
        int(dtype == torch.float64), max_block, max_grid, int(force_scratch), sched_seed, int(lazy),
        prob_tol,
    )
    with tempfile.TemporaryDirectory() as d:
        fi, fo = Path(d) / "in", Path(d) / "out"
        fi.write_bytes(hdr + raw)
        r = subprocess.run([str(exe), str(fi), str(fo)], capture_output=True, text=True, timeout=300, env=EMU_ENV)
        assert r.returncode == 0, f"emulator exit {r.returncode}: {r.stderr[-2000:]}"
        out = fo.read_bytes()
    info = dict(zip(("status", "bad", "CB", "smem_p", "rows", "launches"), struct.unpack("<6q", out[:48]), strict=True))
    o = 48
    idx = torch.from_numpy(np.frombuffer(out[o : o + 8 * b], dtype=np.int64).copy())
    scores = torch.from_numpy(np.frombuffer(out[o + 8 * b : o + 16 * b], dtype=np.float64).copy())
    nev = torch.from_numpy(np.frombuffer(out[o + 16 * b : o + 24 * b], dtype=np.int64).copy())
    return info, idx, scores, nev


def cpu_op(lp, b, M, seed=0, dtype=torch.float32, lazy=False, prob_tol=1e-3):
    return torch.ops.fastbald.batchbald(lp, b, M, seed, dtype == torch.float64, lazy, prob_tol)


def check_same_as_cpu(exe, lp, b, M, *, seed=0, dtype=torch.float32, exact=None, **emu):
    info, idx, scores, nev = emu_batchbald(exe, lp, b, M, seed=seed, dtype=dtype, **emu)
    assert info["status"] == 0, info
    ci, cs, cn = cpu_op(lp, b, M, seed, dtype)
    assert idx.tolist() == ci.tolist(), (info, idx.tolist(), ci.tolist(), scores.tolist(), cs.tolist())
    torch.testing.assert_close(scores, cs, rtol=0, atol=SCORE_TOL[dtype])
    assert nev.tolist() == cn.tolist()
    assert len(set(idx.tolist())) == b
    if exact:
        # exact regime: also the CPU's lazy greedy and the brute-force joint MI of every prefix
        li, _, _ = cpu_op(lp, b, M, seed, dtype, lazy=True)
        assert idx.tolist() == li.tolist()
        # (float32 input: its rows sum to 1 only to ~1e-7, which the brute force sees)
        tol = max(10 * SCORE_TOL[dtype], 1e-6 if lp.dtype == torch.float32 else 0.0)
        for i in range(b):
            assert abs(scores[i].item() - joint_mi(lp[idx[: i + 1]].double())) < tol
    return info, idx, scores


def with_duplicates(lp: torch.Tensor, seed: int) -> torch.Tensor:
    """Copies of the pool's most informative items at later indices (exactly equal rows)."""
    lp = lp.clone()
    p = lp.double().exp()
    pbar = p.mean(1)
    bald = -(pbar * pbar.clamp_min(1e-300).log()).sum(-1) + (p * lp.double()).nan_to_num().sum(-1).mean(-1)
    top = bald.argsort(descending=True)[:3].tolist()
    N = lp.shape[0]
    g = torch.Generator().manual_seed(seed)
    dst = torch.randperm(N, generator=g)[:6].tolist()
    for j, d in enumerate(dst):
        if d not in top:
            lp[d] = lp[top[j % 3]]
    return lp


# (N, K, C, b, M, seed, input dtype, compute dtype, extra emulator settings)
EXACT_CASES = [
    (40, 6, 2, 6, 64, 0, torch.float64, torch.float64, {}),
    (37, 5, 3, 5, 100, 1, torch.float32, torch.float32, {}),
    (50, 8, 4, 4, 100, 2, torch.float64, torch.float32, {"max_block": 32}),
    (30, 7, 5, 3, 64, 3, torch.float32, torch.float64, {"max_grid": 3}),
    (29, 4, 10, 3, 200, 4, torch.float64, torch.float64, {"force_scratch": True, "max_grid": 2}),
    (33, 6, 7, 3, 100, 5, torch.float32, torch.float32, {}),
]
SAMPLED_CASES = [
    # C**n > M from the second/third step: M' = K * (M // K) sampled configurations
    (45, 6, 3, 6, 40, 0, torch.float64, torch.float64, {}),
    (40, 8, 2, 10, 300, 1, torch.float32, torch.float32, {"max_block": 64}),
    (30, 5, 10, 4, 8, 5, torch.float32, torch.float32, {}),  # sampled from the first update on
    (32, 4, 3, 7, 400, 6, torch.float32, torch.float32, {"max_block": 32}),  # 4 row passes per thread
    (36, 5, 10, 4, 53, 2, torch.float64, torch.float32, {"max_grid": 4}),
    (30, 4, 6, 4, 40, 3, torch.float32, torch.float64, {"force_scratch": True, "max_grid": 2}),
    (41, 10, 5, 5, 600, 4, torch.float64, torch.float64, {}),
]


def _id(c):
    N, K, C, b, M, seed, tin, tc, extra = c
    name = f"N{N}-K{K}-C{C}-b{b}-M{M}-{str(tin)[6:]}-{str(tc)[6:]}"
    return name + "".join(f"-{k}{int(v)}" for k, v in extra.items())


@pytest.mark.parametrize("case", EXACT_CASES, ids=[_id(c) for c in EXACT_CASES])
def test_emulated_exact_regime_same_batch_as_cpu(emulator, case):
    N, K, C, b, M, seed, tin, tc, extra = case
    assert C ** (b - 1) <= M  # every step exact
    lp = with_duplicates(make_log_probs(N, K, C, 100 + seed, spread=2.5), seed).to(tin)
    info, idx, _ = check_same_as_cpu(emulator, lp, b, M, seed=seed, dtype=tc, exact=True, **extra)
    assert info["smem_p"] == (0 if extra.get("force_scratch") else 1)
    assert info["rows"] == C ** (b - 1)


@pytest.mark.parametrize("case", SAMPLED_CASES, ids=[_id(c) for c in SAMPLED_CASES])
def test_emulated_sampled_regime_same_batch_as_cpu(emulator, case):
    N, K, C, b, M, seed, tin, tc, extra = case
    assert C ** (b - 1) > M  # the last steps are sampled
    lp = with_duplicates(make_log_probs(N, K, C, 200 + seed, spread=2.5), seed).to(tin)
    info, idx, scores = check_same_as_cpu(emulator, lp, b, M, seed=7 + seed, dtype=tc, **extra)
    assert info["rows"] == K * (M // K)
    # another seed draws other configurations: the sampled scores change (the seed is used)
    _, _, s2, _ = emu_batchbald(emulator, lp, b, M, seed=8 + seed, dtype=tc, **extra)
    last = b - 1
    assert s2[last].item() != scores[last].item()


@pytest.mark.parametrize("which", ["exact", "sampled"])
def test_emulated_lazy_greedy_same_batch(emulator, which):
    # Lazy greedy on the device (exact regime: probe the largest bound, then every candidate whose
    # bound reaches the probe's gain): the batch of the full evaluation and of the CPU's lazy greedy,
    # with fewer candidates evaluated; in the sampled regime every candidate is evaluated.
    cases = EXACT_CASES[:4] if which == "exact" else SAMPLED_CASES[:3]
    for N, K, C, b, M, seed, tin, tc, extra in cases:
        lp = with_duplicates(make_log_probs(N, K, C, (100 if which == "exact" else 200) + seed, spread=2.5), seed).to(tin)
        info, idx, scores, nev = emu_batchbald(emulator, lp, b, M, seed=seed, dtype=tc, lazy=True, **extra)
        ci, cs, cn = cpu_op(lp, b, M, seed, tc)
        assert idx.tolist() == ci.tolist()
        torch.testing.assert_close(scores, cs, rtol=0, atol=SCORE_TOL[tc])
        rows, n_exact = 1, 1  # steps 0 .. n_exact - 1 use the exact table (step 0: BALD)
        while n_exact < b and rows * C <= M:
            rows *= C
            n_exact += 1
        assert nev[0].item() == N
        for s in range(1, b):
            if s < n_exact:
                assert 1 <= nev[s].item() <= N - s
            else:
                assert nev[s].item() == N - s
        if which == "exact":
            li, _, _ = cpu_op(lp, b, M, seed, tc, lazy=True)
            assert idx.tolist() == li.tolist()
    # a larger pool: most candidates are never re-evaluated
    lp = make_log_probs(400, 6, 4, 77, spread=2.5)
    _, idx, _, nev = emu_batchbald(emulator, lp, 4, 100, dtype=torch.float64, lazy=True)
    assert idx.tolist() == cpu_op(lp, 4, 100, 0, torch.float64)[0].tolist()
    if which == "exact":
        assert nev[1:].sum().item() < 0.5 * sum(400 - s for s in range(1, 4)), nev.tolist()


def test_emulated_duplicates_never_chosen_twice_whole_pool(emulator):
    # Every item of a pool made of 4 distinct items x 5 copies: the batch is the whole pool, each
    # index once, identical items in increasing index order (ties go to the lower index).
    base = make_log_probs(4, 5, 3, 21, spread=2.0)
    lp = base.repeat(5, 1, 1)
    info, idx, _, _ = emu_batchbald(emulator, lp, 20, 30, seed=1, dtype=torch.float64)
    assert sorted(idx.tolist()) == list(range(20))
    ci, _, _ = cpu_op(lp, 20, 30, 1, torch.float64)
    assert idx.tolist() == ci.tolist()
    for r in range(4):
        copies = [i for i in idx.tolist() if i % 4 == r]
        assert copies == sorted(copies)


def test_emulated_strided_input_and_scheduling_order(emulator):
    lp = make_log_probs(30, 6, 4, 31, spread=2.5).float()
    strided = lp.transpose(0, 1).contiguous().transpose(0, 1)  # [N, K, C] view of a [K, N, C] buffer
    assert not strided.is_contiguous()
    a = emu_batchbald(emulator, lp, 5, 70, seed=2)
    b = emu_batchbald(emulator, strided, 5, 70, seed=2, sched_seed=99, max_block=32)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_emulated_first_step_is_bald_and_invalid_items(emulator):
    lp = make_log_probs(25, 5, 3, 41)
    info, idx, scores, nev = emu_batchbald(emulator, lp, 1, 100, dtype=torch.float64)
    p = lp.exp()
    pbar = p.mean(1)
    bald = -(pbar * pbar.log()).sum(-1) + (p * lp).sum(-1).mean(-1)
    assert idx.item() == int(bald.argmax()) and nev.item() == 25
    assert scores.item() == pytest.approx(float(bald.max()), abs=1e-12)
    bad = lp.clone()
    bad[17, 2, 1] = float("nan")
    bad[21, 0, 0] = float("inf")
    info, *_ = emu_batchbald(emulator, bad, 3, 100)
    assert info["status"] == 1 and info["bad"] == 17
    info, *_ = emu_batchbald(emulator, lp + 0.5, 3, 100)  # not normalised
    assert info["status"] == 1 and info["bad"] == 0
    info, idx, _, _ = emu_batchbald(emulator, lp + 0.5, 3, 100, prob_tol=math.inf)
    assert info["status"] == 0 and len(set(idx.tolist())) == 3


def test_emulated_under_address_sanitizer():
    # One exact, one sampled (rows > threads) and one global-scratch case on the sanitizer build.
    exe = build_emulator("asan")
    for case, seed0 in ((EXACT_CASES[2], 100), (SAMPLED_CASES[-1], 200), (SAMPLED_CASES[3], 200)):
        N, K, C, b, M, seed, tin, tc, extra = case
        lp = with_duplicates(make_log_probs(N, K, C, seed0 + seed, spread=2.5), seed).to(tin)
        check_same_as_cpu(exe, lp, b, M, seed=7 + seed if seed0 == 200 else seed, dtype=tc, **extra)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_op_matches_cpu():
    for N, K, C, b, M, tin, tc in [(500, 10, 10, 6, 1000, torch.float32, torch.float32),
                                   (300, 8, 3, 8, 40, torch.float64, torch.float64)]:
        lp = with_duplicates(make_log_probs(N, K, C, 5, spread=2.5), 5).to(tin)
        gi, gs, gn = torch.ops.fastbald.batchbald(lp.cuda(), b, M, 3, tc == torch.float64, False, 1e-3)
        ci, cs, cn = cpu_op(lp, b, M, 3, tc)
        assert gi.cpu().tolist() == ci.tolist()
        torch.testing.assert_close(gs.cpu(), cs, rtol=0, atol=SCORE_TOL[tc])
        assert gn.cpu().tolist() == cn.tolist()
        # the public API runs the CUDA op on a CUDA tensor (the result stays there)
        from fastbald.batchbald import batchbald_batch

        r = batchbald_batch(lp.cuda(), b, M, seed=3, dtype=tc)
        assert r.indices.is_cuda and r.indices.cpu().tolist() == ci.tolist()
    lp = make_log_probs(40, 5, 3, 18).float().cuda()
    torch.library.opcheck(torch.ops.fastbald.batchbald.default, (lp, 4, 100, 0, False, False, 1e-3))
    bad = lp.clone()
    bad[13, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"log_probs\[13, 2, 1\] is NaN"):
        torch.ops.fastbald.batchbald(bad, 3, 100, 0, False, False, 1e-3)
