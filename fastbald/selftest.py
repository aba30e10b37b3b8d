"""``fastbald selftest`` / ``python -m fastbald selftest``: checks this installation.

Scores a handful of small pools that exercise every kernel path (few and many classes, one and many
MC samples, the NTC / TNC / NCT layouts, logits / log-probabilities / probabilities, masked classes
and extreme logits) on every available device and dtype, through the public API
(``fastbald.scores``, ``fastbald.acquire``) with ``backend="auto"``, and compares each output with
the float64 reference (:func:`fastbald.reference_scores`) computed on the CPU from the same
(rounded) input values. Also checks that a NaN in the pool raises a ValueError naming the item.
Prints a pass/fail table per check and device/dtype; exits non-zero if anything fails. Takes a few
seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _ops
from .acquire import acquire
from .metrics import METRICS
from .reference import reference_scores
from .scores import scores

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
CHECKS: tuple[str, ...] = (*METRICS, "acquire", "bad-input")


@dataclass
class Case:
    name: str
    x: torch.Tensor  # float64, logical [N, T, C], values already what `input` says
    input: str = "logits"
    layout: str = "NTC"
    big_c: bool = False


def _cases(seed: int = 0) -> list[Case]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 3.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    out = [
        Case("C=10 NTC", randn(257, 20, 10)),
        Case("C=10 TNC", randn(131, 20, 10), layout="TNC"),
        Case("probs NCT", torch.softmax(randn(65, 10, 12), -1), input="probs", layout="NCT"),
        Case("log_probs", torch.log_softmax(randn(40, 7, 33), -1), input="log_probs"),
        Case("C=100", randn(33, 8, 100)),
        Case("T=1 C=2", randn(50, 1, 2)),
        Case("T=100 C=3", randn(20, 100, 3)),
        Case("C=3000", randn(5, 4, 3000), big_c=True),
        Case("C=20000", randn(3, 3, 20000), big_c=True),
    ]
    ext = randn(64, 12, 10, scale=50.0)
    ext[3, :, 2] = -math.inf  # a class masked in every sample
    ext[5, 4, :9] = -math.inf  # a sample with one class left
    ext[7] = ext[7, :1].expand(12, 10)  # identical samples: bald = 0
    out.append(Case("extreme+masks", ext))
    return out


def oracle(x64: torch.Tensor, input: str) -> torch.Tensor:
    """float64 reference [N_METRICS, N] of a logical [N, T, C] float64 pool."""
    return reference_scores(x64, input, dtype=torch.float64)


def _physical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor in `layout` whose logical [N, T, C] view is x (contiguous in that layout)."""
    perm = {"NTC": (0, 1, 2), "TNC": (1, 0, 2), "NCT": (0, 2, 1)}[layout]
    return x.permute(*perm).contiguous()


def _tolerance(dtype: torch.dtype, case: Case) -> float:
    """Max abs error (nats) against the float64 oracle on the same rounded input: the native
    kernels and the pure-PyTorch fallback share it."""
    if dtype == torch.float64:
        return 1e-9
    return 1e-5 if not case.big_c else 5e-5


@dataclass
class Cell:
    ok: bool = True
    err: float = 0.0
    note: str = ""

    def add(self, ok: bool, err: float = 0.0, note: str = "") -> None:
        self.ok = self.ok and ok
        if err == err:  # not NaN
            self.err = max(self.err, err)
        if note and not self.note:
            self.note = note

    def text(self) -> str:
        if self.note == "skipped":
            return "skip"
        tag = "ok" if self.ok else "FAIL"
        return f"{tag} {self.err:.0e}" if self.err > 0 else tag


def _run_device(device: torch.device, dtype: torch.dtype, cases: list[Case]) -> dict[str, Cell]:
    cells = {c: Cell() for c in CHECKS}
    for case in cases:
        xr = case.x.to(dtype)  # the rounded values both sides see
        ref = oracle(xr.to(torch.float64), case.input)
        x = _physical(xr, case.layout).to(device)
        try:
            got = scores(x, input=case.input, layout=case.layout)
        except Exception as e:  # noqa: BLE001 - reported in the table
            for m in METRICS:
                cells[m].add(False, note=f"{case.name}: {type(e).__name__}: {e}")
            continue
        for i, m in enumerate(METRICS):
            v = getattr(got, m)
            if v.device != device or v.shape != (case.x.shape[0],):
                cells[m].add(
                    False, note=f"{case.name}: wrong device/shape {v.device} {tuple(v.shape)}"
                )
                continue
            err = (v.detach().cpu().to(torch.float64) - ref[i]).abs().max().item()
            ok = err <= _tolerance(dtype, case)
            cells[m].add(ok, err, "" if ok else f"{case.name}: max abs error {err:.2e}")
        # acquire: every picked item's reference BALD is within tolerance of the k-th best.
        k = min(10, case.x.shape[0])
        try:
            idx = acquire(x, k, "bald", input=case.input, layout=case.layout)
            idx = torch.as_tensor(idx).cpu()
            kth = torch.topk(ref[2], k).values[-1].item()
            tol = _tolerance(dtype, case)
            ok = (
                idx.numel() == k
                and len(set(idx.tolist())) == k
                and bool((ref[2][idx] >= kth - 2 * tol).all())
            )
            cells["acquire"].add(ok, note="" if ok else f"{case.name}: picked {idx.tolist()}")
        except Exception as e:  # noqa: BLE001
            cells["acquire"].add(False, note=f"{case.name}: {type(e).__name__}: {e}")
    # A NaN in pool item 5 of 9 (and +inf in item 7): ValueError naming item 5.
    bad = torch.randn(9, 4, 10, dtype=torch.float64).to(dtype)
    bad[5, 2, 3] = math.nan
    bad[7, 0, 0] = math.inf
    try:
        scores(bad.to(device))
        cells["bad-input"].add(False, note="no error for a NaN input")
    except ValueError as e:
        ok = "5" in str(e)
        cells["bad-input"].add(ok, note="" if ok else f"message does not name item 5: {e}")
    except Exception as e:  # noqa: BLE001
        cells["bad-input"].add(False, note=f"{type(e).__name__} instead of ValueError: {e}")
    return cells


def _devices(spec: str | None) -> list[torch.device]:
    if spec:
        return [torch.device(d.strip()) for d in spec.split(",") if d.strip()]
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def _backend_label(device: torch.device) -> str:
    if _ops.native_available(device):
        st = _ops.load()
        return f"native ({st['cpu']})" if device.type == "cpu" else "native"
    return f"torch fallback ({_ops.why_not(device.type)})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the self-test; returns 0 when every check passes, 1 otherwise (2: usage error)."""
    p = argparse.ArgumentParser(
        prog="fastbald selftest",
        description="Check fastbald's scoring kernels against the float64 reference on every device.",
    )
    p.add_argument("--devices", help="comma-separated devices (default: cpu and every CUDA device)")
    p.add_argument(
        "--dtypes",
        default=",".join(DTYPES),
        help=f"comma-separated dtypes (default: {','.join(DTYPES)})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print the first failure of each cell"
    )
    try:
        args = p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 2
    try:
        names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        unknown = [d for d in names if d not in DTYPES]
        if unknown or not names:
            raise ValueError(
                f"--dtypes: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none given'}; "
                f"choose from {', '.join(DTYPES)}"
            )
        dtypes = [DTYPES[d] for d in names]
        devices = _devices(args.devices)
        for d in devices:
            torch.empty(0, device=d)  # an unavailable device fails here, clearly
    except (ValueError, RuntimeError) as e:
        print(f"fastbald selftest: error: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    cases = _cases(args.seed)
    columns: list[tuple[str, dict[str, Cell]]] = []
    print(f"fastbald selftest: torch {torch.__version__}")
    for device in devices:
        print(f"  {device}: {_backend_label(device)}")
        for dtype in dtypes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cells = _run_device(device, dtype, cases)
            columns.append((f"{device}/{str(dtype).replace('torch.', '')}", cells))
    width = max(12, *(len(name) for name, _ in columns))
    print()
    print(f"{'check':18s}" + "".join(f"{name:>{width + 2}s}" for name, _ in columns))
    failed = 0
    for check in CHECKS:
        row = f"{check:18s}"
        for _, cells in columns:
            c = cells[check]
            row += f"{c.text():>{width + 2}s}"
            failed += not c.ok
        print(row)
    if args.verbose or failed:
        for name, cells in columns:
            for check, c in cells.items():
                if not c.ok:
                    print(f"  FAIL {name} {check}: {c.note}")
    dt = time.perf_counter() - t0
    print()
    print(
        f"fastbald selftest: {'PASS' if not failed else f'FAIL ({failed} cells)'} "
        f"({len(cases)} pools x {len(columns)} device/dtype, errors vs float64, {dt:.1f} s)"
    )
    return 0 if not failed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
