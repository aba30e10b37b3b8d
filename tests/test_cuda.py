"""The CUDA kernels of fastbald::pool_scores (csrc/cuda/).

Four groups:

* **Host emulation** (runs on any machine with g++, no GPU): csrc/cuda/kernels.h and plan.h, the
  very sources nvcc compiles, built against a std::thread implementation of the device primitives
  (csrc/cuda/device_compat.h, csrc/cuda/emu/emu_main.cpp). Every case of ``CASES`` runs through the
  emulated kernels at block 64 and at the production block 256 and is compared with the float64
  reference, with the output pre-filled with a sentinel (an element the kernels forget to write
  fails) and shared memory poisoned before every block. A shuffle or barrier reached by only part
  of a warp/block deadlocks the emulator: the subprocess timeout turns that into a failure. A
  seeded random fuzz (``fuzz_case``: shapes, dtypes, axis orders, strided/padded/broadcast views
  with NaN in the gaps, storage offsets, kinds, metric subsets, forced plans, block sizes, device
  limits, bad items) checks the same way; the table and the fuzz run again on an ASan/UBSan build
  whose input storage and shared memory have their exact sizes (out-of-bounds accesses abort).
* **Plans** (emulator in plan-only mode): which kernel and configuration real GPU sizes get, with
  H100 and A100 shared-memory limits.
* **CUDA** (``pytest.mark.cuda``, skipped without a CUDA device): every case of ``CASES`` on the
  device through the real op (kernel paths forced with FASTBALD_CUDA_PLAN), outputs poisoned through
  the caching allocator, CPU-vs-CUDA agreement, the bad-input errors (same message as the CPU op),
  streams/devices, opcheck, the public API, C = 100,000, and N*T*C > 2^31.
* The self-test's CPU path (``fastbald.selftest``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import emulator_build
import numpy as np
import pytest
import torch
from emulator_build import EMU_ENV

import fastbald
from fastbald import _ops
from fastbald.reference import INPUT_KINDS, METRICS
from fastbald.selftest import oracle

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# The emulator's main file first, then every header it may include (the build is cached by their
# hash: a new header under csrc/cuda is picked up without a change here).
EMU_SOURCES = [
    CSRC / "cuda" / "emu" / "emu_main.cpp",
    *sorted((CSRC / "cuda").glob("*.h")),
    *sorted((CSRC / "cuda" / "emu").glob("*.h")),
    *sorted(CSRC.glob("*.h")),
]
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
SENTINEL = -777.0
ALL = (1 << 7) - 1


# ---------------------------------------------------------------------------------------------
# Cases shared by the emulator and the GPU tests.


@dataclass
class Case:
    id: str
    shape: tuple[int, int, int]  # logical N, T, C
    dtype: torch.dtype = torch.float32
    layout: str = "NTC"  # physical axis order of the stored tensor
    kind: str = "logits"
    metrics: int = ALL
    scale: float = 3.0
    offset: int = 0  # storage offset in elements (misaligned starts)
    # "masks" | "sliced" | "sliced_t" | "transposed" | "identical" | "disagree<L>" (every sample
    # favours class 1 by L logits, except sample 0: class 0 by L)
    special: str = ""
    plan: dict = field(default_factory=dict)  # PlanOverrides (emulator) / FASTBALD_CUDA_PLAN
    block: int = 64  # emulator threads per block (the GPU uses 256 unless plan says otherwise)
    seed: int = 0


def _cases() -> list[Case]:
    cs: list[Case] = []
    for layout in ("NTC", "TNC", "NCT"):
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            cs.append(Case(f"{layout}-{str(dt)[6:]}", (37, 7, 10), dt, layout))
    for C in (1, 2, 3, 4, 8, 16, 31, 32, 33, 64, 200):
        cs.append(Case(f"C{C}", (23, 5, C)))
    for C in (1, 4, 32, 33):
        cs.append(Case(f"C{C}-TNC", (23, 5, C), layout="TNC"))
    for T in (1, 2, 33, 100):
        cs.append(Case(f"T{T}", (11, T, 10)))
    cs += [
        Case("N1-T1-C1", (1, 1, 1)),
        Case("N1", (1, 3, 5)),
        Case("N1-T50-C2-lanes", (1, 50, 2)),
        Case("T100-C3-lanes8", (13, 100, 3), plan={"force_kk": 2}),
        Case("sliced-rows", (19, 6, 28), special="sliced"),
        Case("sliced-rows-Tstride", (19, 3, 4), special="sliced_t"),
        Case("transposed-generic", (19, 17, 6), special="transposed"),
        Case("masks-extreme", (17, 8, 10), special="masks", scale=3.0),
        Case("masks-extreme-warp", (9, 8, 60), special="masks"),
        Case("masks-extreme-stream", (9, 8, 10), special="masks", plan={"force_path": 1}),
        Case("identical-samples", (12, 9, 10), special="identical"),
        Case("identical-samples-warp", (6, 9, 70), special="identical"),
        Case("scale50", (21, 6, 10), scale=50.0),
        Case("scale0.01", (21, 6, 10), scale=0.01),
    ]
    for off in (1, 2, 3):
        cs.append(Case(f"offset{off}", (29, 6, 10), offset=off))
        cs.append(Case(f"offset{off}-f16-TNC", (29, 6, 12), torch.float16, "TNC", offset=off))
    for kind in INPUT_KINDS:
        for layout in ("NTC", "NCT"):
            cs.append(Case(f"{kind}-{layout}", (21, 6, 9), layout=layout, kind=kind))
    cs.append(Case("probs-stream", (7, 6, 40), kind="probs", plan={"force_path": 1}))
    for m in range(7):
        cs.append(Case(f"only-{METRICS[m]}", (21, 6, 9), metrics=1 << m))
    for m in (1 << 3, 1 << 1, (1 << 2) | (1 << 4), 0b1010101):
        cs.append(Case(f"metrics{m}-warp", (5, 6, 50), metrics=m))
        cs.append(Case(f"metrics{m}-stream", (5, 6, 9), metrics=m, plan={"force_path": 1}))
    cs.append(Case("only-variation_ratio-probs", (21, 6, 9), kind="probs", metrics=1 << 3))
    plans = [
        {"force_generic": 1},
        {"force_one_array": 1},
        {"max_grid": 2},
        {"max_grid": 1, "force_kk": 2},
        {"force_kk": 3},
        {"force_path": 1},
        {"force_path": 1, "force_args": 1},
        {"tile_budget": 3000},
    ]
    for p in plans:
        tag = ",".join(f"{k}={v}" for k, v in p.items())
        cs.append(Case(f"[{tag}]-C10", (31, 9, 10), plan=p))
        cs.append(Case(f"[{tag}]-C70-TNC", (13, 9, 70), layout="TNC", plan=p))
        cs.append(Case(f"[{tag}]-C12-NCT-bf16", (13, 9, 12), torch.bfloat16, "NCT", plan=p))
    # One block walks 4 chunks of 8 items, 4 items per warp: the order of the end-of-chunk barrier
    # against the next chunk's counter reset matters (a missing barrier fails here).
    cs.append(Case("multichunk-kk8", (31, 9, 10), plan={"max_grid": 1, "force_kk": 8}))
    cs.append(Case("multichunk-kk8-warp", (31, 5, 40), plan={"max_grid": 1, "force_kk": 8}))
    for G, C in ((2, 10), (8, 33), (16, 100), (32, 40), (32, 100)):
        cs.append(Case(f"lanes{G}-C{C}", (9, 5, C), plan={"row_lanes": G}))
    cs.append(
        Case(
            "lanes32-C40-TNC-probs", (9, 5, 40), layout="TNC", kind="probs", plan={"row_lanes": 32}
        )
    )
    cs.append(Case("block256-C10", (300, 20, 10), block=256))
    cs.append(Case("block256-C100", (9, 20, 100), block=256))
    cs.append(Case("stream-f64-Tsmall", (3, 3, 45), torch.float64, plan={"force_path": 1}))
    return cs


CASES = _cases()


def make_input(case: Case) -> torch.Tensor:
    """The case's pool as a logical [N, T, C] view (strides as the case says, values rounded to
    its dtype)."""
    g = torch.Generator().manual_seed(case.seed)
    N, T, C = case.shape
    z = torch.randn(N, T, C, generator=g, dtype=torch.float64) * case.scale
    if case.special == "masks":
        z[min(3, N - 1), :, min(2, C - 1)] = -math.inf
        if C > 1:
            z[min(5, N - 1), min(2, T - 1), : C - 1] = -math.inf
        z[min(7, N - 1)] *= 3000.0 / case.scale  # logits of order 1e4
    if case.special == "identical":
        z[:] = z[:, :1]
    if case.special.startswith("disagree"):
        gap = float(case.special[len("disagree") :])
        z[:, 1:, 1] += gap
        z[:, 0, 0] += gap
    if case.kind == "log_probs":
        z = torch.log_softmax(z, -1)
    elif case.kind == "probs":
        z = torch.softmax(z, -1)
    if case.special in ("sliced", "sliced_t"):
        step = 2 if case.special == "sliced_t" else 1
        big = torch.randn(N, T * step, C + 12, generator=g, dtype=torch.float64) * case.scale
        big[:, ::step, 3 : 3 + C] = z
        return big.to(case.dtype)[:, ::step, 3 : 3 + C]
    if case.special == "transposed":
        big = torch.randn(N, C, T + 5, generator=g, dtype=torch.float64)
        big[:, :, 2 : 2 + T] = z.transpose(1, 2)
        return big.to(case.dtype).transpose(1, 2)[:, 2 : 2 + T, :]
    perm = {"NTC": (0, 1, 2), "TNC": (1, 0, 2), "NCT": (0, 2, 1)}[case.layout]
    inv = [perm.index(i) for i in range(3)]
    phys = z.permute(*perm).contiguous().to(case.dtype)
    if case.offset:
        flat = torch.zeros(phys.numel() + case.offset, dtype=case.dtype)
        flat[case.offset :] = phys.reshape(-1)
        phys = flat[case.offset :].view(phys.shape)
    return phys.permute(*inv)


def tolerance(case: Case) -> float:
    return 1e-9 if case.dtype == torch.float64 else 1e-5


def check_against_reference(case: Case, x: torch.Tensor, out: torch.Tensor) -> None:
    ref = oracle(x.detach().cpu().to(torch.float64), case.kind)
    out = out.detach().cpu()
    assert out.shape == (7, case.shape[0])
    assert out.dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
    assert not (out == SENTINEL).any(), "an output element was never written"
    for i, m in enumerate(METRICS):
        if case.metrics >> i & 1:
            err = (out[i].to(torch.float64) - ref[i]).abs().max().item()
            assert err <= tolerance(case), f"{m}: max abs error {err:.3e}"
        else:
            assert torch.isnan(out[i]).all(), f"{m} was not requested but is not NaN"


# ---------------------------------------------------------------------------------------------
# Host emulation.

_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_INFO = (
    "status",
    "bad",
    "path",
    "kk",
    "load_mode",
    "row_lanes",
    "two_arrays",
    "col_lanes",
    "smem",
    "grid",
    "cnt_mode",
    "Cp",
    "gen_order",
    "tnc_rows",
    "block",
    "st_nv",
    "st_mode",
)
_PLAN_KEYS = (
    "force_path",
    "force_generic",
    "force_one_array",
    "tile_budget",
    "block",
    "max_grid",
    "force_args",
    "force_kk",
    "smem_optin",
    "smem_per_sm",
    "plan_only",
    "seed",
    "row_lanes",
)


def build_emulator(flavour: str = "plain") -> Path:
    """Builds (once per source hash) and returns the score-kernel emulator of the given flavour
    ("plain" or "asan": see tests/emulator_build.py)."""
    return emulator_build.build_emulator(EMU_SOURCES, "emu", flavour, timeout=900)


@pytest.fixture(scope="session")
def emulator() -> Path:
    return build_emulator("plain")


@pytest.fixture(scope="session")
def emulator_asan() -> Path:
    return build_emulator("asan")


def emu_run(
    exe: Path,
    x: torch.Tensor | None,
    *,
    kind: int = 0,
    metrics: int = ALL,
    check: bool = True,
    tol: float = 1e-4,
    shape: tuple | None = None,
    strides: tuple | None = None,
    dtype: torch.dtype | None = None,
    offset: int = 0,
    timeout: float = 300,
    **plan,
) -> tuple[dict, torch.Tensor]:
    """Runs the emulated kernels on x (a logical [N, T, C] view of any strides); returns the plan
    info and the [7, N] output. x=None with shape/strides/dtype: plan only."""
    if x is not None:
        N, T, C = x.shape
        strides, dtype = x.stride(), x.dtype
        st = x.untyped_storage()
        isz = x.element_size()
        numel = st.nbytes() // isz
        base = torch.empty(0, dtype=x.dtype).set_(st, 0, (numel,), (1,))
        raw = base.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[isz]).numpy().tobytes()
        offset = x.storage_offset()
    else:
        N, T, C = shape
        numel, raw = 0, b""
        plan["plan_only"] = 1
    vals = [plan.get(k, -1 if k == "force_path" else 0) for k in _PLAN_KEYS]
    hdr = struct.pack(
        "<8s12qd13q",
        b"FBEMU1\0\0",
        _DT[dtype],
        N,
        T,
        C,
        *strides,
        numel,
        offset,
        kind,
        metrics,
        int(check),
        tol,
        *vals,
    )
    with tempfile.TemporaryDirectory() as d:
        fi, fo = Path(d) / "in", Path(d) / "out"
        fi.write_bytes(hdr + raw)
        r = subprocess.run(
            [str(exe), str(fi), str(fo)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=EMU_ENV,
        )
        assert r.returncode == 0, f"emulator exit {r.returncode}: {r.stderr[-2000:]}"
        b = fo.read_bytes()
    info = dict(zip(_INFO, struct.unpack(f"<{len(_INFO)}q", b[: 8 * len(_INFO)]), strict=True))
    acc = np.float64 if dtype == torch.float64 else np.float32
    out = torch.from_numpy(np.frombuffer(b[8 * len(_INFO) :], dtype=acc).copy())
    return info, (out.view(7, N) if out.numel() else out)


def _emu_plan(case: Case) -> dict:
    return {**case.plan, "block": case.block}


# Every case at the emulator's small block (64: cheap, and more blocks per grid) and at the
# production block size (256).
EMU_TABLE = [
    dataclasses.replace(c, block=b)
    for c in CASES
    for b in ((64, 256) if c.block == 64 else (c.block,))
]


def _table_id(c: Case) -> str:
    return c.id if c.id.startswith("block") else f"{c.id}-b{c.block}"


@pytest.mark.parametrize("case", EMU_TABLE, ids=[_table_id(c) for c in EMU_TABLE])
def test_emulated_kernels_match_reference(emulator: Path, case: Case) -> None:
    x = make_input(case)
    # The seed drives the emulator's thread schedule; cases built to expose barrier bugs try several.
    seeds = range(4) if case.id.startswith("multichunk") else [zlib.crc32(case.id.encode())]
    for seed in seeds:
        info, out = emu_run(
            emulator,
            x,
            kind=INPUT_KINDS.index(case.kind),
            metrics=case.metrics,
            seed=seed,
            **_emu_plan(case),
        )
        assert info["status"] == 0, info
        if case.plan.get("force_path") == 1:
            assert info["path"] == 1
        check_against_reference(case, x, out)


def test_emulator_covers_every_path(emulator: Path) -> None:
    """The case table reaches every load mode and order, row mode, storage mode, and both kernels."""
    seen: set[tuple[str, int]] = set()
    for case in CASES:
        if case.block == 256:
            continue
        x = make_input(case)
        info, _ = emu_run(
            emulator,
            None,
            shape=tuple(x.shape),
            strides=x.stride(),
            dtype=x.dtype,
            offset=x.storage_offset(),
            kind=INPUT_KINDS.index(case.kind),
            metrics=case.metrics,
            **_emu_plan(case),
        )
        if info["path"] == 0:
            seen |= {
                ("load", info["load_mode"]),
                ("row_lanes", info["row_lanes"]),
                ("two", info["two_arrays"]),
                ("lanes>1", int(info["col_lanes"] > 1)),
            }
            if info["Cp"] != x.shape[2]:
                seen.add(("pad", info["load_mode"]))
            if info["load_mode"] == 2:
                seen.add(("generic order", info["gen_order"]))
                if info["tnc_rows"]:
                    seen.add(("tnc rows, generic load", 1))
            if info["load_mode"] == 1 and x.shape[0] % info["kk"]:
                seen.add(("tnc partial last chunk", 1))
        else:
            seen |= {("stream_cnt", info["cnt_mode"])}
    want = {
        ("load", 0),
        ("load", 1),
        ("load", 2),
        ("generic order", 0),
        ("generic order", 1),
        ("generic order", 2),
        ("tnc rows, generic load", 1),
        ("tnc partial last chunk", 1),
        ("row_lanes", 1),
        ("row_lanes", 2),
        ("row_lanes", 4),
        ("row_lanes", 8),
        ("row_lanes", 16),
        ("row_lanes", 32),
        ("two", 0),
        ("two", 1),
        ("lanes>1", 1),
        ("pad", 0),
        ("pad", 1),
        ("pad", 2),
        ("stream_cnt", 0),
        ("stream_cnt", 1),
    }
    assert want <= seen, f"not reached: {sorted(want - seen)}"


@pytest.mark.skipif(
    not _ops.native_available(torch.device("cpu")), reason="native CPU kernel not built"
)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.special != "masks"][::4], ids=lambda c: c.id
)
def test_emulated_kernels_agree_with_cpu_kernel(emulator: Path, case: Case) -> None:
    x = make_input(case)
    tol = 1e-9 if case.dtype == torch.float64 else 1e-5
    _, out = emu_run(
        emulator,
        x,
        kind=INPUT_KINDS.index(case.kind),
        metrics=case.metrics,
        tol=tol,
        **_emu_plan(case),
    )
    cpu = torch.ops.fastbald.pool_scores(x, INPUT_KINDS.index(case.kind), case.metrics, True, 1e-4)
    both = ~torch.isnan(cpu)
    assert torch.equal(both, ~torch.isnan(out))
    assert (out[both].double() - cpu[both].double()).abs().max().item() <= 2 * tol


BAD_PLANS = [{}, {"force_path": 1}, {"force_generic": 1}, {"force_path": 1, "force_args": 1}]
BAD_EMU = [
    ({}, 10),
    ({}, 52),
    ({"force_path": 3, "row_lanes": 2}, 12),
    ({}, 1200),  # a whole block of 64 per row
    ({"force_path": 1}, 10),
    ({"force_generic": 1}, 12),
    ({"force_path": 1, "force_args": 1}, 40),
]


@pytest.mark.parametrize(
    ("plan", "C"),
    BAD_EMU,
    ids=[(",".join(f"{k}={v}" for k, v in p.items()) or "default") + f"-C{c}" for p, c in BAD_EMU],
)
def test_emulated_bad_items(emulator: Path, plan: dict, C: int) -> None:
    g = torch.Generator().manual_seed(C)
    N, T = 30, 4
    x = torch.randn(N, T, C, generator=g)
    x[27, 2, 4] = math.nan
    x[17, 3, 1] = math.inf
    x[25, 1, :] = -math.inf
    run = lambda x, **kw: emu_run(emulator, x, block=64, **plan, **kw)[0]  # noqa: E731
    assert run(x)["bad"] == 17  # the lowest bad index, whatever the order blocks finish in
    x[17, 3, 1] = 0.0
    assert run(x)["bad"] == 25  # a sample that masks every class
    assert run(x, check=False)["status"] == 0  # no check: no flag, no crash
    p = torch.softmax(torch.randn(N, T, C, generator=g), -1)
    p[29, 1, 0] += 0.01  # row sum off by more than tol ...
    p[12, 1, 0] = -p[12, 1, 0]  # ... a negative probability (sum off by less than tol=1) ...
    p[8, 0, :] = 0  # ... and an all-zero row: the lowest wins
    assert run(p, kind=2, tol=1.0)["bad"] == 8
    p[8, 0, 0] = 1.0
    assert run(p, kind=2, tol=1.0)["bad"] == 12
    p[12, 1, 0] = -p[12, 1, 0]
    assert run(p, kind=2)["bad"] == 29
    p[29, 1, 0] -= 0.01
    assert run(p, kind=2)["status"] == 0


def nan_rule_variation_ratio(x: torch.Tensor) -> torch.Tensor:
    """The variation ratio by the rule of scores_math.h's row_max_argmax, which also defines the
    vote of a NaN row: the argmax (ties: lowest class) is frozen at the row's first NaN, so a row
    votes for the argmax of the classes before its first NaN (class 0 when that is class 0)."""
    N, T, C = x.shape
    vr = torch.empty(N, dtype=torch.float64)
    for n in range(N):
        votes = []
        for t in range(T):
            row = x[n, t].double()
            nan = torch.nonzero(torch.isnan(row))
            f = int(nan[0]) if len(nan) else C
            votes.append(int(torch.argmax(row[:f])) if f > 0 else 0)
        vr[n] = 1.0 - max(votes.count(v) for v in set(votes)) / T
    return vr


NAN_PLANS = [
    ({}, 10),
    ({}, 40),
    ({"force_path": 3}, 12),
    ({"force_path": 3, "row_lanes": 8}, 100),
    ({"force_path": 3, "row_lanes": 64}, 300),  # a whole block of 64 per row (cross-warp reductions)
    ({"row_lanes": 4}, 37),
    ({"row_lanes": 32}, 70),
    ({"force_generic": 1}, 12),
    ({"force_path": 1}, 12),
    ({"force_path": 1, "force_args": 1}, 40),
]


@pytest.mark.parametrize(
    ("plan", "C"),
    NAN_PLANS,
    ids=[
        (",".join(f"{k}={v}" for k, v in p.items()) or "default") + f"-C{c}" for p, c in NAN_PLANS
    ],
)
def test_emulated_invalid_rows_without_check(emulator: Path, plan: dict, C: int) -> None:
    """check_finite=False with NaN / +inf / fully masked rows: the item's outputs are NaN but for
    the variation ratio, whose votes follow the CPU's rule (NaN rows included); the other items
    are scored as usual."""
    g = torch.Generator().manual_seed(C)
    N, T = 12, 5
    x = torch.randn(N, T, C, generator=g) * 3
    for n in range(8):
        for t in range(T):
            if (n + t) % 3:
                x[n, t, (n * 7 + t * 3) % C] = math.nan
    x[8, :, 0] = math.nan  # a NaN in class 0: votes for class 0
    x[9, 1, :] = -math.inf  # every class masked
    x[10, 3, 2 % C] = math.inf
    bad = torch.arange(N) < 11
    rule = nan_rule_variation_ratio(x)
    for metrics in (ALL, 1 << 3, (1 << 3) | 1):
        _, out = emu_run(emulator, x, check=False, metrics=metrics, block=64, **plan)
        assert not (out == SENTINEL).any()
        vr = out[3].double()
        assert (vr - rule).abs().max().item() <= 1e-6, (vr, rule)
        for i in range(7):
            if i != 3 and metrics >> i & 1:
                assert torch.isnan(out[i][bad]).all(), METRICS[i]
        ref = oracle(x[~bad].double(), "logits")
        for i in range(7):
            if metrics >> i & 1:
                assert (out[i][~bad].double() - ref[i]).abs().max().item() <= 1e-5, METRICS[i]
        if _ops.native_available(torch.device("cpu")):
            cpu = torch.ops.fastbald.pool_scores(x, 0, metrics, False, 1e-4)
            assert torch.equal(torch.isnan(cpu), torch.isnan(out))
            assert (cpu[3].double() - rule).abs().max().item() <= 1e-6


@pytest.mark.skipif(
    not _ops.native_available(torch.device("cpu")), reason="native CPU kernel not built"
)
def test_bad_item_message_probs_at_the_tolerance_edge() -> None:
    """report_bad_item.h (shared by the CPU and CUDA ops): a probs row whose sum is off by more
    than prob_tol in the kernel's float arithmetic but not in the host's float64 re-check gets a
    message naming the sample, its sum and the tolerance."""
    raised = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        p = torch.softmax(torch.randn(3, 4, 100, generator=g, dtype=torch.float64) * 3, -1).float()
        tol = (p.double().sum(-1) - 1).abs().max().item()  # every row within tol in float64
        try:
            torch.ops.fastbald.pool_scores(p, 2, ALL, True, tol)
        except ValueError as e:
            msg = str(e).splitlines()[0]
            n, t = map(int, re.search(r"pool item (\d+) \(sample (\d+)\)", msg).groups())
            dev = (p[n].double().sum(-1) - 1).abs()
            assert t == int(dev.argmax()), msg  # the item's sample closest to the edge
            assert f"|sum - 1| = {dev[t].item():g} in float64, within the tolerance {tol:g}" in msg
            assert "not in the kernel's float32 sum" in msg, msg
            raised += 1
    assert raised > 0, "no case reached the float64-vs-kernel edge"


H100 = {"smem_optin": 227 * 1024, "smem_per_sm": 228 * 1024}
A100 = {"smem_optin": 163 * 1024, "smem_per_sm": 164 * 1024}
H200 = H100  # same shared-memory limits per block and per SM

# Issue 10, part 1: the flat (contiguous NTC) load of a padded tile (row stride Cp != C) put the
# elements of its 16-byte vectors at the index relative to the chunk's unaligned head, so when a
# chunk did not start on a 16-byte boundary elements near row ends landed in the wrong row or the
# pad slot and unwritten shared memory was read (false "pool item k is invalid", or garbage).
# Plain contiguous inputs on the H100/H200 plans at the production block size, and any padded C
# once the storage offset is not a multiple of 16 bytes.
PADDED_FLAT = [
    (torch.bfloat16, (1000, 5, 12), 0, H100),
    (torch.bfloat16, (200, 7, 4), 0, H200),
    (torch.bfloat16, (200, 5, 20), 0, H100),
    (torch.float32, (200, 5, 33), 0, H200),
    (torch.float32, (200, 7, 50), 0, H100),
    (torch.float64, (100, 25, 33), 0, H200),
    (torch.float32, (97, 6, 12), 1, H100),
    (torch.float32, (97, 6, 12), 3, A100),
    (torch.float64, (61, 5, 12), 1, H100),
    (torch.float16, (83, 5, 8), 3, H200),
    (torch.bfloat16, (83, 3, 24), 5, A100),
]


@pytest.mark.parametrize("block", [256, 64])
@pytest.mark.parametrize(
    ("dtype", "shape", "offset", "limits"),
    PADDED_FLAT,
    ids=[f"{str(d)[6:]}-{'x'.join(map(str, s))}-off{o}" for d, s, o, _ in PADDED_FLAT],
)
def test_emulated_padded_flat_load(
    emulator: Path, dtype: torch.dtype, shape: tuple, offset: int, limits: dict, block: int
) -> None:
    case = Case("padded-flat", shape, dtype, offset=offset, block=block)
    x = make_input(case)
    assert x.is_contiguous() and x.storage_offset() == offset
    # The default plan, and the tile kernel (the one with the bug) where the default is another.
    for plan in ({}, {"force_path": 0}):
        for check in (True, False):
            info, out = emu_run(emulator, x, check=check, block=block, **limits, **plan)
            assert info["status"] == 0, f"false bad item {info['bad']} (plan {info})"
            check_against_reference(case, x, out)
        if info["path"] == 0:
            assert info["load_mode"] == 0  # the flat load
            break


# ---------------------------------------------------------------------------------------------
# Seeded random fuzz of the emulated kernels against the float64 reference: shapes, dtypes, axis
# orders, padded / strided / broadcast (stride 0) views with NaN in the storage gaps (a read
# outside the view poisons a result), storage offsets, input kinds, metric subsets, forced plans,
# block sizes, device limits, and bad items (the lowest must be flagged; the others scored).

FUZZ_CASES = int(os.environ.get("FASTBALD_EMU_FUZZ", "300"))
FUZZ_ASAN_CASES = int(os.environ.get("FASTBALD_EMU_FUZZ_ASAN", "150"))
FUZZ_MAX_ELEMS = 8_000
_FUZZ_C = (1, 2, 3, 4, 5, 7, 8, 10, 12, 16, 20, 24, 31, 32, 33, 40, 50, 64, 70, 100, 129, 300)
_FUZZ_LIMITS = (H100, A100, {"smem_optin": 48 * 1024, "smem_per_sm": 64 * 1024})


@dataclass
class FuzzCase:
    seed: int
    x: torch.Tensor  # the logical [N, T, C] view
    kind: int
    metrics: int
    check: bool
    tol: float
    plan: dict  # emulator overrides, block and device limits included
    bad: list[int]  # items made invalid (check: the lowest must be flagged)
    desc: str

    def repro(self) -> str:
        x = self.x
        return (
            f"seed={self.seed} {self.desc} shape={tuple(x.shape)} stride={x.stride()} "
            f"offset={x.storage_offset()} dtype={x.dtype} kind={INPUT_KINDS[self.kind]} "
            f"metrics={self.metrics} check={self.check} bad={self.bad} plan={self.plan}"
        )


def fuzz_case(seed: int) -> FuzzCase:
    """Random case number `seed` (deterministic)."""
    rng = np.random.default_rng([20261203, seed])
    r = rng.random
    dtype = (torch.float32, torch.float64, torch.float16, torch.bfloat16)[rng.integers(4)]
    C = int(rng.choice(_FUZZ_C)) if r() < 0.7 else int(rng.integers(1, 65))
    T = int(rng.choice([1, 2, 3, int(rng.integers(1, 12)), int(rng.integers(1, 41))]))
    N = int(rng.choice([1, 2, int(rng.integers(1, 20)), int(rng.integers(1, 200))]))
    while N * T * C > FUZZ_MAX_ELEMS and N > 1:
        N = max(1, N // 2)
    while N * T * C > FUZZ_MAX_ELEMS and T > 1:
        T = max(1, T // 2)
    kind = int(rng.integers(3))
    scale = float(rng.choice([0.01, 1.0, 3.0, 10.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, T, C, generator=g, dtype=torch.float64) * scale
    desc = []
    if C > 1 and r() < 0.2:  # masked classes (never a whole row)
        m = torch.rand(N, T, C, generator=g) < 0.3
        m[..., int(rng.integers(C))] = False
        z[m] = -math.inf
        desc.append("masks")
    if r() < 0.05:
        z[int(rng.integers(N))] *= 1e4 / scale
        desc.append("huge")
    if kind == 1:
        z = torch.log_softmax(z, -1)
    elif kind == 2:
        z = torch.softmax(z, -1)
    check = r() < 0.8
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 0.05
    bad: list[int] = []
    if r() < 0.3:
        for n in rng.choice(N, size=min(N, int(rng.integers(1, 4))), replace=False):
            n, t, c = int(n), int(rng.integers(T)), int(rng.integers(C))
            how = int(rng.integers(3))
            if kind == 2:
                if how == 0:
                    z[n, t, :] = 0.0
                elif how == 1:
                    z[n, t, c] = -0.25 - z[n, t, c]
                else:
                    z[n, t, c] += 0.5
            else:
                z[n, t, :] = -math.inf if how == 2 else z[n, t, :]
                if how < 2:
                    z[n, t, c] = math.nan if how == 0 else math.inf
            bad.append(n)
    # Physical storage: axes in a random order, each maybe padded and strided, NaN in the gaps.
    # Plain contiguous NTC (the common case, and the flat 16-byte load) 40% of the time.
    plain = r() < 0.4
    perm = [0, 1, 2] if plain else [int(a) for a in rng.permutation(3)]
    phys = z.permute(*perm)
    steps = [1, 1, 1] if plain else [int(rng.choice([1, 1, 1, 2, 3])) for _ in range(3)]
    pads = [0, 0, 0] if plain else [int(rng.choice([0, 0, 1, 2, 5])) for _ in range(3)]
    starts = [int(rng.integers(p + 1)) for p in pads]
    big_shape = [d * st + p for d, st, p in zip(phys.shape, steps, pads, strict=True)]
    off = int(rng.integers(8)) if r() < 0.6 else 0
    flat = torch.full((math.prod(big_shape) + off,), math.nan, dtype=dtype)
    big = flat[off:].view(big_shape)
    sl = tuple(
        slice(s0, s0 + d * st, st) for s0, d, st in zip(starts, phys.shape, steps, strict=True)
    )
    big[sl] = phys.to(dtype)
    x = big[sl].permute(*[perm.index(i) for i in range(3)])
    if r() < 0.06 and not bad:  # broadcast samples (stride 0 along T)
        x = x[:, :1].expand(N, T, C)
        desc.append("expanded")
    metrics = ALL if r() < 0.5 else int(rng.integers(1, ALL + 1))
    plan: dict = {}
    u = r()
    if u < 0.15 and N <= 24:  # the stream kernel: a block per item (slow to emulate)
        plan["force_path"] = 1
        if r() < 0.5:
            plan["force_args"] = 1
    elif u > 0.85:  # the item kernel (the planner falls back where it does not apply)
        plan["force_path"] = 2
    elif u > 0.75:  # the strip kernel (likewise)
        plan["force_path"] = 3
    for key, p in (("force_generic", 0.15), ("force_one_array", 0.15)):
        if r() < p:
            plan[key] = 1
    if r() < 0.15:
        plan["tile_budget"] = int(rng.integers(1500, 60_000))
    if r() < 0.2:
        plan["max_grid"] = int(rng.integers(1, 5))
    if r() < 0.15:
        plan["force_kk"] = int(rng.integers(1, 9))
    if r() < 0.15:
        plan["row_lanes"] = int(rng.choice([1, 2, 4, 8, 16, 32]))
    plan["block"] = int(rng.choice([64, 64, 256, 256, 32, 96, 128]))
    plan.update(_FUZZ_LIMITS[rng.integers(len(_FUZZ_LIMITS))])
    return FuzzCase(seed, x, kind, metrics, check, tol, plan, sorted(bad), ",".join(desc))


def check_fuzz_case(exe: Path, fc: FuzzCase) -> None:
    info, out = emu_run(
        exe,
        fc.x,
        kind=fc.kind,
        metrics=fc.metrics,
        check=fc.check,
        tol=fc.tol,
        seed=fc.seed,
        **fc.plan,
    )
    if fc.check and fc.bad:
        assert (info["status"], info["bad"]) == (2, fc.bad[0]), f"bad item not flagged: {info}"
    else:
        assert info["status"] == 0, f"status {info['status']} bad {info['bad']} (plan {info})"
    N = fc.x.shape[0]
    keep = torch.ones(N, dtype=torch.bool)
    keep[fc.bad] = False
    xs = fc.x[keep]
    ref = oracle(xs.to(torch.float64), INPUT_KINDS[fc.kind])
    o = out[:, keep]
    assert not (out == SENTINEL).any(), "an output element was never written"
    tol = 1e-9 if fc.x.dtype == torch.float64 else 1e-5
    for i, m in enumerate(METRICS):
        if fc.metrics >> i & 1:
            err = (o[i].to(torch.float64) - ref[i]).abs().max().item() if xs.shape[0] else 0.0
            assert err <= tol, f"{m}: max abs error {err:.3e} (plan {info})"
        else:
            assert torch.isnan(out[i]).all(), f"{m} was not requested but is not NaN"


def run_fuzz(exe: Path, seeds: range) -> list[str]:
    """Runs fuzz cases `seeds` on the emulator (one process per case, as many at a time as there
    are CPUs); returns a repro line per failure."""

    def one(seed: int) -> str | None:
        fc = fuzz_case(seed)
        try:
            check_fuzz_case(exe, fc)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            return f"{fc.repro()}\n    -> {str(e).splitlines()[0][:400]}"
        return None

    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        return [f for f in pool.map(one, seeds) if f is not None]


def test_emulator_fuzz(emulator: Path) -> None:
    fails = run_fuzz(emulator, range(FUZZ_CASES))
    assert not fails, f"{len(fails)} of {FUZZ_CASES} fuzz cases failed:\n" + "\n".join(fails[:20])


def test_fuzz_reaches_plans(emulator: Path) -> None:
    """The fuzz is not confined to one path: its plans cover both kernels and every load mode."""
    seen = set()
    for seed in range(FUZZ_CASES):
        fc = fuzz_case(seed)
        x = fc.x
        info, _ = emu_run(
            emulator,
            None,
            shape=tuple(x.shape),
            strides=x.stride(),
            dtype=x.dtype,
            offset=x.storage_offset(),
            kind=fc.kind,
            metrics=fc.metrics,
            **fc.plan,
        )
        seen.add(("path", info["path"]))
        if info["path"] == 0:
            seen.add(("load", info["load_mode"]))
            seen.add(("pad", int(info["Cp"] != x.shape[2])))
    want = {("path", p) for p in range(4)} | {("load", m) for m in range(3)} | {("pad", 1)}
    assert want <= seen, f"not reached: {sorted(want - seen)}"


# ---- the sanitizer build: the table and the fuzz under ASan + UBSan ----


def test_asan_build_catches_out_of_bounds(emulator_asan: Path) -> None:
    """The sanitizer is really on and the buffers really have no slack: one byte past an
    exact-size buffer aborts the sanitizer build."""
    r = subprocess.run(
        [str(emulator_asan), "--selftest-oob"], capture_output=True, text=True, env=EMU_ENV
    )
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, r.stderr[-2000:]


def asan_failures(
    exe: Path, cases: list[Case], path: int | None = None, label: Callable[[Case], str] = lambda c: c.id
) -> list[str]:
    """Runs ``cases`` on the sanitizer build (as many at a time as there are CPUs), each checked
    against the reference and, with ``path``, for the kernel its plan took; a line per failure."""

    def one(case: Case) -> str | None:
        x = make_input(case)
        try:
            info, out = emu_run(
                exe,
                x,
                kind=INPUT_KINDS.index(case.kind),
                metrics=case.metrics,
                seed=zlib.crc32(case.id.encode()),
                **_emu_plan(case),
            )
            assert info["status"] == 0 and path in (None, info["path"]), info
            check_against_reference(case, x, out)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            return f"{label(case)}: {str(e)[-1500:]}"
        return None

    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        return [f for f in pool.map(one, cases) if f is not None]


def test_asan_table(emulator_asan: Path) -> None:
    cases = [c for c in EMU_TABLE if c.block == 64 or c.id.startswith("block")]
    cases += [dataclasses.replace(c, block=256) for c in CASES[::7] if c.block == 64]
    fails = asan_failures(emulator_asan, cases, label=_table_id)
    assert not fails, f"{len(fails)} of {len(cases)} cases failed under ASan/UBSan:\n" + "\n".join(
        fails[:10]
    )


def test_asan_fuzz(emulator_asan: Path) -> None:
    fails = run_fuzz(emulator_asan, range(FUZZ_ASAN_CASES))
    assert not fails, f"{len(fails)} of {FUZZ_ASAN_CASES} fuzz cases failed under ASan/UBSan:\n" + (
        "\n".join(fails[:20])
    )


def _plan(emulator: Path, shape, dtype=torch.float32, layout="NTC", limits=H100, **kw) -> dict:
    N, T, C = shape
    st = {"NTC": (T * C, C, 1), "TNC": (C, N * C, 1), "NCT": (C * T, 1, T)}[layout]
    return emu_run(emulator, None, shape=shape, strides=st, dtype=dtype, **limits, **kw)[0]


def test_plans_at_gpu_sizes(emulator: Path) -> None:
    p = _plan(emulator, (1_000_000, 20, 10))  # the item kernel (issue 10 part 3): 2 lanes per item
    assert (p["status"], p["path"], p["row_lanes"], p["kk"]) == (0, 2, 2, 128)
    p = _plan(emulator, (1_000_000, 20, 10), force_path=0)  # the tile kernel, forced
    assert (p["status"], p["path"], p["row_lanes"], p["two_arrays"], p["load_mode"]) == (
        0,
        0,
        1,
        1,
        0,
    )
    assert p["smem"] <= 48 * 1024 and p["kk"] >= 16
    p = _plan(emulator, (1_000_000, 20, 10), torch.bfloat16, "TNC")
    assert (p["path"], p["load_mode"]) == (0, 1)
    p = _plan(emulator, (1_000_000, 20, 10), layout="NCT")
    assert (p["load_mode"], p["gen_order"]) == (2, 1)
    # C = 100 and 1000 take the strip kernel (issue 10 part 3); the tile kernel's plans, forced:
    assert _plan(emulator, (1_000_000, 20, 100))["path"] == STRIP
    p = _plan(emulator, (1_000_000, 20, 100), force_path=0)
    assert (p["path"], p["two_arrays"]) == (0, 1) and p["row_lanes"] in (4, 8)
    assert _plan(emulator, (100_000, 20, 1000))["path"] == STRIP
    p = _plan(emulator, (100_000, 20, 1000), force_path=0)
    assert (p["path"], p["kk"]) == (0, 1) and p["smem"] <= 113 * 1024  # two blocks per H100 SM
    p = _plan(emulator, (100_000, 20, 1000), limits=A100, force_path=0)
    assert p["path"] == 0 and p["smem"] <= 163 * 1024
    p = _plan(emulator, (100_000, 100, 10))
    assert p["path"] == 2
    p = _plan(emulator, (100_000, 100, 10), force_path=0)
    assert p["path"] == 0
    p = _plan(emulator, (2, 20, 100_000))
    assert (p["path"], p["cnt_mode"]) == (1, 0)  # 400 KB of counters do not fit: argmax indices
    p = _plan(emulator, (2, 1000, 100_000))
    assert (p["status"], p["path"]) == (0, 1)
    p = _plan(emulator, (4, 20_000, 2))
    assert (p["status"], p["path"], p["cnt_mode"]) == (0, 1, 1)
    p = _plan(emulator, (2, 100_000, 1000))
    assert (p["status"], p["path"]) == (0, STRIP)  # the strip kernel keeps no per-sample state
    p = _plan(emulator, (2, 100_000, 1000), torch.float64)
    assert p["status"] == 1  # per-sample stats exceed shared memory: a clear error, not a crash
    p = _plan(emulator, (1_000_000, 20, 10), torch.float64)
    assert (p["path"], p["two_arrays"]) == (0, 1)


# ---------------------------------------------------------------------------------------------
# CUDA.


def _plan_env(plan: dict) -> str:
    m = {
        "force_path": lambda v: f"path={ {0: 'tile', 1: 'stream', 2: 'item', 3: 'strip'}[v] }",
        "force_generic": lambda v: f"generic={v}",
        "force_one_array": lambda v: f"one_array={v}",
        "tile_budget": lambda v: f"budget={v}",
        "max_grid": lambda v: f"grid={v}",
        "force_args": lambda v: f"args={v}",
        "force_kk": lambda v: f"kk={v}",
        "block": lambda v: f"block={v}",
        "row_lanes": lambda v: f"lanes={v}",
    }
    return ",".join(m[k](v) for k, v in plan.items())


@contextlib.contextmanager
def cuda_plan(plan: dict):
    old = os.environ.get("FASTBALD_CUDA_PLAN")
    os.environ["FASTBALD_CUDA_PLAN"] = _plan_env(plan)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTBALD_CUDA_PLAN", None)
        else:
            os.environ["FASTBALD_CUDA_PLAN"] = old


def _cuda_native() -> None:
    if not _ops.native_available(torch.device("cuda")):
        pytest.fail(
            f"CUDA device present but the CUDA kernels are not built: {_ops.why_not('cuda')}"
        )


def cuda_op(
    x: torch.Tensor,
    kind: int = 0,
    metrics: int = ALL,
    check: bool = True,
    tol: float = 1e-4,
    plan: dict | None = None,
) -> torch.Tensor:
    """The CUDA op with its output poisoned: a block of the output's size filled with SENTINEL is
    freed just before the call, so the caching allocator hands it to the op's output."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    poison = torch.full((7, x.shape[0]), SENTINEL, dtype=acc, device=x.device)
    del poison
    with cuda_plan(plan or {}):
        out = torch.ops.fastbald.pool_scores(x, kind, metrics, check, tol)
    torch.cuda.synchronize(x.device)
    return out


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_matches_reference(case: Case) -> None:
    _cuda_native()
    x = make_input(case)
    plan = dict(case.plan)
    if case.block != 64 and case.block != 256:
        plan["block"] = case.block
    out = cuda_op(x.cuda(), INPUT_KINDS.index(case.kind), case.metrics, plan=plan)
    check_against_reference(case, x, out)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize(
    "plan", [{}, {"block": 64}, {"force_path": 1}], ids=["default", "block64", "stream"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_agrees_with_cpu(dtype: torch.dtype, plan: dict) -> None:
    _cuda_native()
    if not _ops.native_available(torch.device("cpu")):
        pytest.skip("native CPU kernel not built")
    g = torch.Generator().manual_seed(1)
    for shape in [(1000, 20, 10), (300, 7, 100), (20, 20, 1000), (3, 5, 100_000)]:
        if plan.get("force_path") == 1 and shape[2] <= 10:
            shape = (50, 20, 10)
        x = (torch.randn(*shape, generator=g) * 4).to(dtype)
        cpu = torch.ops.fastbald.pool_scores(x, 0, ALL, True, 1e-4)
        gpu = cuda_op(x.cuda(), plan=plan).cpu()
        tol = 1e-9 if dtype == torch.float64 else (2e-5 if shape[2] <= 1000 else 1e-4)
        assert (gpu.double() - cpu.double()).abs().max().item() <= tol, shape


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("plan", BAD_PLANS, ids=lambda p: _plan_env(p) or "default")
def test_cuda_bad_inputs_raise_like_cpu(plan: dict) -> None:
    _cuda_native()
    g = torch.Generator().manual_seed(2)
    cases = []
    x = torch.randn(40, 6, 10, generator=g)
    x[33, 2, 4] = math.nan
    x[17, 5, 1] = math.nan
    cases.append((x, 0, 1e-4, "pool item 17"))
    x = torch.randn(40, 6, 50, generator=g)
    x[21, 1, 7] = math.inf
    cases.append((x, 0, 1e-4, "pool item 21"))
    x = torch.randn(40, 6, 10, generator=g)
    x[25, 3, :] = -math.inf
    cases.append((x, 0, 1e-4, "pool item 25"))
    p = torch.softmax(torch.randn(40, 6, 10, generator=g), -1)
    p[30, 1, 0] += 0.01
    cases.append((p, 2, 1e-4, "pool item 30"))
    p = torch.softmax(torch.randn(40, 6, 10, generator=g), -1)
    p[12, 1, 0] = -p[12, 1, 0]
    cases.append((p, 2, 1.0, "pool item 12"))
    for x, kind, tol, needle in cases:
        with pytest.raises(ValueError, match=needle) as gpu_err:
            cuda_op(x.cuda(), kind, tol=tol, plan=plan)
        if _ops.native_available(torch.device("cpu")):
            with pytest.raises(ValueError) as cpu_err:
                torch.ops.fastbald.pool_scores(x, kind, ALL, True, tol)
            assert str(gpu_err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]
        out = cuda_op(x.cuda(), kind, check=False, tol=tol, plan=plan)  # no check: no error
        assert out.shape == (7, 40)
        if _ops.native_available(torch.device("cpu")):  # invalid items: NaN where the CPU has NaN
            cpu = torch.ops.fastbald.pool_scores(x, kind, ALL, False, tol)
            assert torch.equal(torch.isnan(out.cpu()), torch.isnan(cpu))
    # Public API: ValueError too, on every layout.
    x = torch.randn(9, 4, 10, generator=g)
    x[5, 2, 3] = math.nan
    for layout, xx in (
        ("NTC", x),
        ("TNC", x.transpose(0, 1).contiguous()),
        ("NCT", x.transpose(1, 2).contiguous()),
    ):
        with pytest.raises(ValueError, match="pool item 5"):
            fastbald.scores(xx.cuda(), layout=layout)


@cuda
@pytest.mark.cuda
def test_cuda_streams_devices_and_empty() -> None:
    _cuda_native()
    x = torch.randn(5000, 20, 10, device="cuda")
    want = cuda_op(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = torch.ops.fastbald.pool_scores(x, 0, ALL, False, 1e-4)
    s.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # deterministic, on any stream
    got2 = torch.ops.fastbald.pool_scores(x, 0, ALL, False, 1e-4)
    assert torch.equal(got2, want)
    e = torch.ops.fastbald.pool_scores(torch.empty(0, 20, 10, device="cuda"), 0, ALL, True, 1e-4)
    assert e.shape == (7, 0) and e.is_cuda
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        with torch.cuda.device(0):
            got = torch.ops.fastbald.pool_scores(x1, 0, ALL, True, 1e-4)
        assert got.device == x1.device
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture() -> None:
    """check_finite=False works inside a CUDA graph (replays follow the input); check_finite=True
    raises a clear error at capture instead of breaking it with a host synchronisation."""
    _cuda_native()
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3000, 20, 10, generator=g) * 3).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture, as torch.cuda.graphs asks
        torch.ops.fastbald.pool_scores(x, 0, ALL, False, 1e-4)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastbald.pool_scores(x, 0, ALL, False, 1e-4)
    for scale in (1.0, 0.5):
        x.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        want = torch.ops.fastbald.pool_scores(x, 0, ALL, True, 1e-4)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    graph2 = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="check_finite=True cannot run while the CUDA stream"):
        with torch.cuda.graph(graph2):
            torch.ops.fastbald.pool_scores(x, 0, ALL, True, 1e-4)
    torch.cuda.synchronize()
    f = torch.compile(lambda x: fastbald.scores(x, check_finite=False).bald, mode="reduce-overhead")
    for _ in range(3):
        torch.testing.assert_close(f(x), fastbald.bald(x))


@cuda
@pytest.mark.cuda
def test_cuda_opcheck_and_compile() -> None:
    _cuda_native()
    x = torch.randn(64, 8, 10, device="cuda")
    torch.library.opcheck(torch.ops.fastbald.pool_scores.default, (x, 0, ALL, True, 1e-4))
    f = torch.compile(lambda x: fastbald.scores(x).bald, fullgraph=True)
    torch.testing.assert_close(f(x), fastbald.bald(x))


@cuda
@pytest.mark.cuda
def test_cuda_public_api_and_acquire() -> None:
    _cuda_native()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 20, 10, generator=g) * 3
    s = fastbald.scores(x.cuda(), backend="native")
    assert all(v.is_cuda for v in s)
    ref = oracle(x.double(), "logits")
    for i, m in enumerate(METRICS):
        assert (getattr(s, m).cpu().double() - ref[i]).abs().max().item() <= 1e-5, m
    idx = fastbald.acquire(x.cuda(), 10, "bald")
    assert idx.is_cuda and idx.shape == (10,)
    kth = torch.topk(ref[2], 10).values[-1]
    assert (ref[2][idx.cpu()] >= kth - 2e-5).all()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_huge_classes(dtype: torch.dtype) -> None:
    """C = 100,000 (stream kernel) against the float64 reference computed on the device."""
    _cuda_native()
    g = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(3, 5, 100_000, device="cuda", generator=g) * 3).to(dtype)
    out = cuda_op(x)
    ref = oracle(x.double(), "logits").cpu()
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-4


@cuda
@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_huge_tile_T1000_C100000() -> None:
    _cuda_native()
    if torch.cuda.get_device_properties(0).total_memory < 30e9:
        pytest.skip("needs 30 GB of device memory")
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 1000, 100_000, device="cuda", generator=g) * 3
    out = cuda_op(x)
    ref = torch.stack([oracle(x[i : i + 1].double(), "logits")[:, 0] for i in range(2)], 1).cpu()
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-4


@cuda
@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_more_than_2_to_31_elements() -> None:
    """64-bit indexing: N*T*C > 2^31 (bf16, 4.4 GB); items at the end compared with the reference."""
    _cuda_native()
    if torch.cuda.get_device_properties(0).total_memory < 16e9:
        pytest.skip("needs 16 GB of device memory")
    N, T, C = (1 << 31) // 200 + 4096, 20, 10
    x = torch.empty(N, T, C, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(6)
    for i in range(0, N, 1 << 22):
        x[i : i + (1 << 22)] = torch.randn(min(1 << 22, N - i), T, C, device="cuda", generator=g)
    assert x.numel() > 2**31
    out = cuda_op(x)
    for sl in (slice(0, 1000), slice(N - 5000, N)):
        ref = oracle(x[sl].double(), "logits").cpu()
        assert (out[:, sl].cpu().double() - ref).abs().max().item() <= 1e-5
    del x


# ---------------------------------------------------------------------------------------------
# Self-test (CPU path here; every device on a GPU machine).


def test_selftest_passes_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from fastbald import selftest

    assert selftest.main(["--devices", "cpu", "--dtypes", "float32,bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "bald" in out and "cpu/float32" in out


def test_selftest_reports_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastbald import selftest

    real = selftest.scores

    def broken(x, **kw):
        s = real(x, **kw)
        return s._replace(bald=s.bald + 1e-3)

    monkeypatch.setattr(selftest, "scores", broken)
    assert selftest.main(["--devices", "cpu", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_selftest_usage_errors() -> None:
    from fastbald import selftest

    assert selftest.main(["--dtypes", "int8"]) == 2
    assert selftest.main(["--bogus"]) == 2


@cuda
@pytest.mark.cuda
def test_selftest_passes_on_cuda() -> None:
    _cuda_native()
    from fastbald import selftest

    assert selftest.main(["--devices", "cuda"]) == 0


# ---------------------------------------------------------------------------------------------
# Item kernel (issue 10 part 3; csrc/cuda/item_kernel.h): a lane group per pool item, C known at
# compile time. These cases force or expect path 2 and compare with the float64 reference through
# the same emulator (blocks of 64 and 256 threads).

ITEM = 2


def _item_cases() -> list[Case]:
    cs: list[Case] = []
    for block in (64, 256):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            cs.append(Case(f"item-b{block}-{str(dt)[6:]}-20x10", (300, 20, 10), dt, block=block))
        for C in (2, 3, 4, 5, 6, 8, 16):
            cs.append(Case(f"item-b{block}-C{C}", (70, 9, C), block=block))
    for G in (1, 2, 4, 8, 16, 32):
        cs.append(Case(f"item-G{G}-T37", (45, 37, 6), plan={"force_path": ITEM, "row_lanes": G}))
    for T in (1, 2, 3, 65):
        cs.append(Case(f"item-T{T}", (41, T, 10)))
    cs += [
        # Scalar (not 16-byte) load: misaligned start, or T*C not a whole number of vectors.
        Case("item-offset1", (33, 8, 10), offset=1),
        Case("item-offset3-bf16", (33, 8, 10), torch.bfloat16, offset=3),
        Case("item-TC-odd", (33, 7, 5)),
        Case("item-TC-odd-f16", (33, 5, 6), torch.float16),
        Case("item-grid1-multichunk", (150, 6, 10), plan={"max_grid": 1}),
        Case("item-grid3-b256", (700, 4, 16), plan={"max_grid": 3}, block=256),
        Case("item-N1", (1, 20, 10)),
        # Votes are packed into 64 / C bits per class and unpacked every 2^(64/C) - 1 rows of a lane.
        Case("item-vote-unpack-C10", (20, 70, 10), plan={"force_path": ITEM, "row_lanes": 1}),
        Case("item-vote-unpack-C16", (20, 37, 16), metrics=1 << 3, plan={"force_path": ITEM, "row_lanes": 1}),
        Case("item-masks-extreme", (17, 8, 10), special="masks"),
        Case("item-identical", (12, 9, 10), special="identical"),
        Case(
            "item-identical-G4",
            (12, 9, 10),
            special="identical",
            plan={"force_path": ITEM, "row_lanes": 4},
        ),
        Case("item-scale50", (21, 6, 10), scale=50.0),
        # One pass, the lane's first row as the mean-KL shift: a first row that confidently
        # disagrees with the others (its log-prob of their class -30 / -85 nats; the shift's floor).
        Case("item-disagree30", (24, 100, 10), special="disagree30"),
        Case("item-disagree85-G1", (16, 20, 10), special="disagree85", plan={"force_path": ITEM, "row_lanes": 1}),
        Case("item-disagree85-bf16", (24, 40, 8), torch.bfloat16, special="disagree85"),
        Case("item-scale0.01", (21, 6, 16), scale=0.01),
        Case("item-log_probs", (40, 6, 8), kind="log_probs"),
    ]
    for m in range(7):
        cs.append(Case(f"item-only-{METRICS[m]}", (40, 6, 8), metrics=1 << m))
    for m in (0b0000111, 0b1010101, (1 << 2) | (1 << 4)):
        cs.append(
            Case(
                f"item-metrics{m}", (40, 6, 8), metrics=m, plan={"force_path": ITEM, "row_lanes": 2}
            )
        )
    return cs


ITEM_CASES = _item_cases()


@pytest.mark.parametrize("case", ITEM_CASES, ids=[c.id for c in ITEM_CASES])
def test_emulated_item_kernel_matches_reference(emulator: Path, case: Case) -> None:
    x = make_input(case)
    seeds = range(3) if "multichunk" in case.id else [zlib.crc32(case.id.encode())]
    for seed in seeds:
        info, out = emu_run(
            emulator,
            x,
            kind=INPUT_KINDS.index(case.kind),
            metrics=case.metrics,
            seed=seed,
            **_emu_plan(case),
        )
        assert info["status"] == 0, info
        assert info["path"] == ITEM, f"expected the item kernel, got plan {info}"
        if case.plan.get("row_lanes"):
            assert info["row_lanes"] == case.plan["row_lanes"]
        check_against_reference(case, x, out)


def test_emulated_item_kernel_identical_samples(emulator: Path) -> None:
    """README: BALD <= 1e-6 when all T samples are equal. The one-pass item kernel's shifted sums
    cancel exactly for identical rows (U = 0, V ~ 0): BALD and mean_std stay at the rounding of
    pbar, for 1, 2 and 4 lanes per item and logits of scale 1e-2 ... 50."""
    for G, (N, T, C), scale in [(1, (16, 20, 10), 3.0), (2, (16, 60, 16), 50.0), (4, (16, 37, 5), 0.01),
                                (1, (16, 9, 2), 20.0)]:
        case = Case(f"ident-G{G}", (N, T, C), special="identical", scale=scale,
                    plan={"force_path": ITEM, "row_lanes": G})
        x = make_input(case)
        info, out = emu_run(emulator, x, **_emu_plan(case))
        assert (info["status"], info["path"], info["row_lanes"]) == (0, ITEM, G), info
        ref = oracle(x.to(torch.float64), case.kind)
        assert (out[2].double() - ref[2]).abs().max().item() <= 1e-6, case.id  # bald
        assert (out[4].double() - ref[4]).abs().max().item() <= 1e-6, case.id  # mean_std


def test_emulated_item_kernel_bad_items(emulator: Path) -> None:
    """The lowest bad item is flagged (NaN, +inf, a fully masked sample); without the check the
    other items are still right and the bad ones are NaN (the CPU op's result)."""
    g = torch.Generator().manual_seed(5)
    N, T, C = 90, 6, 10
    x = torch.randn(N, T, C, generator=g)
    x[77, 2, 4] = math.nan
    x[61, 3, 1] = math.inf
    x[45, 1, :] = -math.inf
    for block in (64, 256):

        def run(x: torch.Tensor, block: int = block, **kw) -> tuple[dict, torch.Tensor]:
            return emu_run(emulator, x, block=block, **kw)

        info, _ = run(x)
        assert (info["path"], info["bad"]) == (ITEM, 45)
        y = x.clone()
        y[45, 1, :] = 0.0
        assert run(y)[0]["bad"] == 61
        info, out = run(x, check=False)
        assert info["status"] == 0
        good = torch.ones(N, dtype=torch.bool)
        good[[45, 61, 77]] = False
        ref = oracle(x[good].double(), "logits")
        for i in range(7):
            assert (out[i][good].double() - ref[i]).abs().max().item() <= 1e-5, METRICS[i]
        cpu = torch.ops.fastbald.pool_scores(x, 0, ALL, False, 1e-4)
        assert torch.equal(torch.isnan(out), torch.isnan(cpu))  # bad items: NaN but their vote
        assert (out[3] - cpu[3]).abs().max().item() <= 1e-6  # the same votes, bad rows included


def test_item_kernel_plans(emulator: Path) -> None:
    """Which problems take the item kernel, and its plan at GPU sizes (H100/H200 limits)."""
    p = _plan(emulator, (1_000_000, 20, 10))
    # float: 2 lanes per item, 128 items of 20 x 10 floats (padded to 204) per block, two blocks
    # per SM.
    assert (p["path"], p["row_lanes"], p["kk"], p["smem"]) == (ITEM, 2, 128, 128 * 204 * 4)
    for dt in (torch.bfloat16, torch.float16):
        # half / bf16, C even: the raw 2-byte tile, one lane per item, 256 items of 400 bytes per
        # block, two blocks per SM (4-way bank conflicts of the row reads, accepted).
        p = _plan(emulator, (1_000_000, 20, 10), dt)
        assert (p["path"], p["row_lanes"], p["kk"], p["smem"]) == (ITEM, 1, 256, 256 * 200 * 2)
    # half / bf16 with C odd: a float tile.
    p = _plan(emulator, (1_000_000, 20, 5), torch.bfloat16)
    assert p["path"] == ITEM and p["smem"] >= p["kk"] * 20 * 5 * 4  # 4 bytes per element
    assert _plan(emulator, (1_000_000, 20, 10), limits=A100)["path"] == ITEM
    assert _plan(emulator, (1_000, 20, 16))["path"] == ITEM
    assert _plan(emulator, (1_000, 20, 17))["path"] == 0  # C > 16: no instantiation
    assert _plan(emulator, (1_000, 20, 7))["path"] == 0  # C = 7: not instantiated (plan.h)
    assert _plan(emulator, (1_000, 20, 1))["path"] == 0
    assert _plan(emulator, (1_000, 20, 10), torch.float64)["path"] == 0
    assert (
        _plan(emulator, (1_000, 20, 10), kind=2)["path"] == 0
    )  # probs: the tile kernel's log load
    assert _plan(emulator, (1_000, 20, 10), layout="TNC")["path"] == 0
    assert _plan(emulator, (1_000, 20, 10), layout="NCT")["path"] == 0
    assert _plan(emulator, (1_000, 20, 10), force_path=0)["path"] == 0
    assert _plan(emulator, (1_000, 20, 10), force_generic=1)["path"] == 0
    p = _plan(emulator, (1_000, 20, 10), force_path=ITEM, row_lanes=8)
    assert (p["path"], p["row_lanes"], p["kk"]) == (ITEM, 8, 32)


def test_asan_item_kernel_cases(emulator_asan: Path) -> None:
    """The item kernel's own cases under AddressSanitizer + UndefinedBehaviorSanitizer (exact-size
    input storage and shared memory: the padded tile, the vector copies and the scalar fallback)."""
    fails = asan_failures(emulator_asan, ITEM_CASES, path=ITEM)
    assert not fails, f"{len(fails)} of {len(ITEM_CASES)} item cases failed under ASan/UBSan:\n" + "\n".join(
        fails[:10]
    )


# ---------------------------------------------------------------------------------------------
# Strip kernel (issue 10 part 3; csrc/cuda/strip_kernel.h): mid and large C (a multiple of 4), a
# lane group (or the whole block) per pool item streaming its rows through registers, online
# per-class accumulators. Default plans for contiguous float/half/bf16 logits and log-probs with
# C % 4 == 0 beyond the item kernel's C; these cases expect path 3.

STRIP = 3


def _strip_cases() -> list[Case]:
    cs: list[Case] = []
    for block in (64, 256):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            cs.append(Case(f"strip-b{block}-{str(dt)[6:]}-20x100", (70, 20, 100), dt, block=block))
        for C in (12, 20, 36, 64, 132, 1000):
            cs.append(Case(f"strip-b{block}-C{C}", (9 if C > 500 else 30, 7, C), block=block))
    # A whole block per row (C > 32 lanes x 32 classes): cross-warp reductions in shared memory.
    for block, C in ((64, 2000), (128, 4000), (256, 2000)):
        for dt in (torch.float32, torch.bfloat16):
            cs.append(Case(f"strip-block{block}-C{C}-{str(dt)[6:]}", (3, 6, C), dt, block=block))
    cs.append(Case("strip-block256-C10000", (2, 3, 10_000), torch.bfloat16, block=256))
    for G in (1, 2, 4, 8, 16):
        cs.append(Case(f"strip-G{G}-C28", (21, 9, 28), plan={"force_path": STRIP, "row_lanes": G}))
    cs.append(Case("strip-G32-C200", (21, 9, 200), plan={"force_path": STRIP, "row_lanes": 32}))
    for T in (1, 2, 45):
        cs.append(Case(f"strip-T{T}", (17, T, 100)))
    cs += [
        Case("strip-grid1", (61, 5, 48), plan={"max_grid": 1}),  # one block walks every item
        Case("strip-grid2-block", (5, 4, 1500), plan={"max_grid": 2}),
        Case("strip-N1", (1, 20, 100)),
        Case("strip-N2-b256", (2, 5, 200), block=256),  # fewer items than groups
        Case("strip-masks-extreme", (17, 8, 100), special="masks"),
        Case("strip-masks-extreme-block", (9, 8, 1200), special="masks"),
        Case("strip-identical", (12, 9, 100), special="identical"),
        Case("strip-identical-block", (3, 9, 1200), special="identical"),
        Case("strip-scale50", (21, 6, 100), scale=50.0),
        Case("strip-scale0.01", (21, 6, 100), scale=0.01),
        Case("strip-log_probs", (40, 6, 100), kind="log_probs"),
        Case("strip-log_probs-bf16", (40, 6, 100), torch.bfloat16, kind="log_probs"),
    ]
    # Sample 0 confidently disagrees with the others (its log-prob of their class is -30 / -85
    # nats): the one-pass accumulators are shifted by sample 0's values, which must not cancel
    # catastrophically (BALD was off by 4e-5 / 1e-4 at T=100 with an unclamped shift).
    for gap in (30, 85):
        for C, block, n in ((100, 64, 16), (1000, 256, 4), (2000, 64, 2), (2000, 256, 2)):
            b = f"block{block}" if C > 1024 else f"b{block}"  # "block": a block per item (mode 2)
            cid, sp = f"strip-{b}-C{C}-disagree{gap}", f"disagree{gap}"
            cs.append(Case(cid, (n, 100, C), block=block, scale=1.0, special=sp))
    for m in range(7):
        cs.append(Case(f"strip-only-{METRICS[m]}", (30, 6, 60), metrics=1 << m))
    for m in (0b0000111, 0b1010101, (1 << 2) | (1 << 4)):
        cs.append(Case(f"strip-metrics{m}-block", (3, 5, 1600), metrics=m))
    return cs


STRIP_CASES = _strip_cases()


@pytest.mark.parametrize("case", STRIP_CASES, ids=[c.id for c in STRIP_CASES])
def test_emulated_strip_kernel_matches_reference(emulator: Path, case: Case) -> None:
    x = make_input(case)
    info, out = emu_run(
        emulator,
        x,
        kind=INPUT_KINDS.index(case.kind),
        metrics=case.metrics,
        seed=zlib.crc32(case.id.encode()),
        **_emu_plan(case),
    )
    assert info["status"] == 0, info
    assert info["path"] == STRIP, f"expected the strip kernel, got plan {info}"
    if case.plan.get("row_lanes"):
        assert info["row_lanes"] == case.plan["row_lanes"]
    if "block" in case.id.split("-")[1]:
        assert info["st_mode"] == 2 and info["row_lanes"] == info["block"], info
    check_against_reference(case, x, out)


def test_strip_kernel_plans(emulator: Path) -> None:
    """Which problems take the strip kernel, and its plans for the issue's shapes (H100/H200)."""

    def cfg(p: dict) -> tuple:
        return (p["path"], p["st_nv"], p["st_mode"], p["row_lanes"], p["block"])

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        # 4 lanes x 7 vectors of 4 classes per item; a warp per item (32 classes per lane); a block
        # per item (40 classes per lane).
        assert cfg(_plan(emulator, (100_000, 20, 100), dt)) == (STRIP, 7, 0, 4, 256)
        assert cfg(_plan(emulator, (10_000, 50, 1000), dt)) == (STRIP, 8, 1, 32, 256)
        p = _plan(emulator, (1_000, 100, 10_000), dt)
        assert cfg(p) == (STRIP, 10, 2, 256, 256)
        assert p["smem"] <= 163 * 1024  # fits an A100 too
    assert _plan(emulator, (1_000, 20, 102))["path"] == 0  # C % 4 != 0
    assert _plan(emulator, (1_000, 20, 10_244))["path"] == 1  # C > 10,240: the stream kernel
    assert _plan(emulator, (1_000, 20, 100), torch.float64)["path"] == 0
    assert _plan(emulator, (1_000, 20, 100), kind=2)["path"] == 0  # probs
    assert _plan(emulator, (1_000, 20, 100), layout="TNC")["path"] == 0
    assert _plan(emulator, (1_000, 20, 100), force_path=0)["path"] == 0
    assert _plan(emulator, (1_000, 20, 100), force_generic=1)["path"] == 0
    p = _plan(emulator, (3, 20, 100))  # few items: no more groups per block than needed
    assert (p["path"], p["block"], p["kk"]) == (STRIP, 32, 8)
    x = make_input(Case("strip-offset", (9, 4, 100), offset=1))  # not 16-byte aligned rows
    info, _ = emu_run(
        emulator, None, shape=tuple(x.shape), strides=x.stride(), dtype=x.dtype, offset=1
    )
    assert info["path"] == 0


def test_asan_strip_kernel_cases(emulator_asan: Path) -> None:
    """The strip kernel's cases under AddressSanitizer + UndefinedBehaviorSanitizer (exact-size
    input storage and shared memory: the row prefetch past the last item, lane-private arrays)."""
    cases = [c for c in STRIP_CASES if "10000" not in c.id]
    fails = asan_failures(emulator_asan, cases, path=STRIP)
    msg = f"{len(fails)} of {len(cases)} strip cases failed under ASan/UBSan:\n"
    assert not fails, msg + "\n".join(fails[:10])


# Long items (T = 1000 / 2000): the strip kernel's running float sums over the samples must not
# lose accuracy in proportion to T (README: BALD <= 1e-6 when all T samples are equal). Before the
# two-level sums a single float S_c of 1000 equal p made BALD of identical samples 6.1e-6 at
# C = 100. The disagreeing cases check that a first sample 10 nats off the others stays within
# the reference tolerance at that length.
STRIP_LONG_CASES = [
    Case("strip-long-identical-T1000-C100", (6, 1000, 100), special="identical"),
    Case("strip-long-identical-T2000-C100", (4, 2000, 100), special="identical"),
    Case("strip-long-identical-T2000-C100-bf16", (4, 2000, 100), torch.bfloat16, special="identical"),
    Case("strip-long-identical-T2000-C1000", (2, 2000, 1000), special="identical", block=256),
    Case("strip-long-identical-T2000-C1000-bf16", (2, 2000, 1000), torch.bfloat16, special="identical",
         block=256),
    Case("strip-long-identical-T1000-C2000-block", (1, 1000, 2000), special="identical"),
    Case("strip-long-disagree10-T1000-C100", (6, 1000, 100), scale=2.0, special="disagree10"),
    Case("strip-long-disagree10-T1000-C1000", (2, 1000, 1000), scale=2.0, special="disagree10", block=256),
    Case("strip-long-random-T2000-C100", (4, 2000, 100)),
]


@pytest.mark.parametrize("case", STRIP_LONG_CASES, ids=[c.id for c in STRIP_LONG_CASES])
def test_emulated_strip_kernel_long_items(emulator: Path, case: Case) -> None:
    """Every score within the reference tolerance at T = 1000 / 2000; identical samples: BALD and
    mean_std <= 1e-6 (the README's promise) in float32 and bf16, 4 lanes, a warp and a block per item."""
    x = make_input(case)
    info, out = emu_run(emulator, x, seed=zlib.crc32(case.id.encode()), timeout=900, **_emu_plan(case))
    assert (info["status"], info["path"]) == (0, STRIP), info
    _check_long_item(case, x, out)


def _check_long_item(case: Case, x: torch.Tensor, out: torch.Tensor) -> None:
    check_against_reference(case, x, out)
    if case.special == "identical":
        ref = oracle(x.to(torch.float64), case.kind)
        out = out.detach().cpu()
        for i in (2, 4):  # bald, mean_std
            err = (out[i].double() - ref[i]).abs().max().item()
            assert err <= 1e-6, f"{METRICS[i]}: max abs error {err:.3e}"


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", STRIP_CASES, ids=[c.id for c in STRIP_CASES])
def test_cuda_strip_kernel_matches_reference(case: Case) -> None:
    """The strip kernel's cases on the device (the block size of the case: it decides the mode)."""
    _cuda_native()
    x = make_input(case)
    plan = {**case.plan, "block": case.block}
    out = cuda_op(x.cuda(), INPUT_KINDS.index(case.kind), case.metrics, plan=plan)
    check_against_reference(case, x, out)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", STRIP_LONG_CASES, ids=[c.id for c in STRIP_LONG_CASES])
def test_cuda_strip_kernel_long_items(case: Case) -> None:
    """The long-item strip cases on the device (identical samples: BALD, mean_std <= 1e-6)."""
    _cuda_native()
    x = make_input(case)
    out = cuda_op(x.cuda(), INPUT_KINDS.index(case.kind), case.metrics, plan={**case.plan, "block": case.block})
    _check_long_item(case, x, out)
