"""CUDA kernel throughput: achieved GB/s of ``fastbald::pool_scores`` against this device's own
copy bandwidth, and the speed-up over the straightforward PyTorch computation.

Usage::

    python benchmarks/bench_cuda.py [--N 1000000] [--T 20] [--C 10 100 1000]
        [--dtypes float32 bfloat16] [--max-gb 8] [--reps 20] [--out FILE.md]

For each (C, dtype): N pool items (reduced so the logits stay under ``--max-gb``; C = 1000 at
N = 1M would be 80 GB of float32), all seven scores, ``check_finite`` off (pure kernel) and on
(adds a flag copy and a stream sync). Bytes = logits read + [7, N] written. The copy bandwidth is
``dst.copy_(src)`` of a 2 GiB buffer (read + write bytes / time), measured in the same run. The
PyTorch baseline is BALD alone, written the obvious way (log_softmax, exp, mean over samples,
entropies) in float32. Times are medians of CUDA-event-timed repetitions after a warm-up.

Targets (issue 3): >= 80 % of copy bandwidth for C >= 10; >= 20x the PyTorch baseline at C = 10.
On a machine without CUDA this prints that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def time_cuda(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def copy_bandwidth(reps: int) -> float:
    """Device copy bandwidth in B/s (bytes read + bytes written per second)."""
    n = (2 << 30) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), reps)
    return 2 * n * 4 / t


def torch_bald(x: torch.Tensor) -> torch.Tensor:
    """BALD the straightforward way (float32): materialises several [N, T, C] temporaries."""
    logp = torch.log_softmax(x.float(), dim=-1)
    p = logp.exp()
    pbar = p.mean(1)
    h_mean = -(pbar * torch.log(pbar.clamp_min(1e-30))).sum(-1)
    h_each = -(p * logp).sum(-1).mean(1)
    return h_mean - h_each


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, default=1_000_000)
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--C", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument(
        "--max-gb", type=float, default=8.0, help="cap on the logits' size (N is reduced)"
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_cuda.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure."
        )
        return 0
    import fastbald
    from fastbald import _ops

    if not _ops.native_available(torch.device("cuda")):
        print(
            f"bench_cuda.py: the CUDA kernels are not built ({_ops.why_not('cuda')}); build with a GPU "
            "present or FASTBALD_FORCE_CUDA=1."
        )
        return 1

    dev = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth(args.reps)
    lines = [
        f"Device: {dev.name} ({dev.multi_processor_count} SMs, {dev.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"Copy bandwidth (dst.copy_(src), 2 GiB, read+write): **{copy_bw / 1e9:.0f} GB/s**",
        "",
        "| N | T | C | dtype | logits GB | kernel ms | GB/s | % of copy | with check ms | torch BALD ms | speed-up | max err vs f64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    verdicts = []
    for C in args.C:
        for name in args.dtypes:
            dtype = DTYPES[name]
            esize = torch.empty(0, dtype=dtype).element_size()
            N = min(args.N, int(args.max_gb * 1e9 / (args.T * C * esize)))
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(0)
            x = (torch.randn(N, args.T, C, device="cuda", generator=g) * 3).to(dtype)
            op = torch.ops.fastbald.pool_scores
            t_kernel = time_cuda(lambda: op(x, 0, 127, False, 1e-4), args.reps)
            t_check = time_cuda(lambda: op(x, 0, 127, True, 1e-4), args.reps)
            nbytes = x.numel() * esize + 7 * N * (8 if dtype == torch.float64 else 4)
            bw = nbytes / t_kernel
            try:
                t_torch = time_cuda(lambda: torch_bald(x), max(3, args.reps // 4), warmup=1)
            except torch.OutOfMemoryError:
                t_torch = float("nan")
            torch.cuda.empty_cache()
            out = op(x, 0, 127, False, 1e-4)
            sl = slice(0, min(N, 20_000))
            ref = fastbald.reference_scores(x[sl].double(), "logits", dtype=torch.float64)
            err = (out[:, sl].double() - ref).abs().max().item()
            row = (
                f"| {N:,} | {args.T} | {C} | {name} | {x.numel() * esize / 1e9:.2f} | {t_kernel * 1e3:.3f} | "
                f"{bw / 1e9:.0f} | {100 * bw / copy_bw:.0f} % | {t_check * 1e3:.3f} | {t_torch * 1e3:.2f} | "
                f"{t_torch / t_kernel:.0f}x | {err:.1e} |"
            )
            print(row, flush=True)
            lines.append(row)
            if C >= 10:
                verdicts.append(
                    (
                        f"C={C} {name}: {100 * bw / copy_bw:.0f} % of copy bandwidth (target >= 80 %)",
                        bw >= 0.8 * copy_bw,
                    )
                )
            if C == 10:
                verdicts.append(
                    (
                        f"C=10 {name}: {t_torch / t_kernel:.0f}x the PyTorch baseline (target >= 20x)",
                        t_torch / t_kernel >= 20,
                    )
                )
            x = out = ref = None  # free the device memory before the next size
    lines.append("")
    for text, ok in verdicts:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")
        print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
