"""MC-dropout scoring of the paper's CNN on the CPU: the fused head against the masked passes,
float32 and bf16, against the CPU's measured GEMM peaks; bf16-vs-float32 score agreement.

Usage::

    python benchmarks/bench_mc.py [--threads 1 2] [--T 20 100] [--items 512] [--repeats 3]
                                  [--agreement-pool 10000] [--whole-pool] [--out PATH]

Parts (every timing is a median of ``--repeats`` runs, the methods interleaved within each run so
that the machine's load hits them alike; the load average is recorded):

1. Peaks: a 2048^3 GEMM in float32 through torch.mm (MKL), float32 through oneDNN
   (``torch.ops.mkldnn._linear_pointwise``) and bf16 through torch.mm (oneDNN), 1 and 2 threads.
2. Throughput of ``score_pool`` (trunk once, T head passes, fused scores, top-k) on ``--items``
   MNIST-sized images at each T and thread count: the unfused masked passes (``fused=False``),
   the fused head in float32 and under bf16 autocast. FLOPs: trunk 16.5 MFLOP per image; head
   T * 2 * (F * H + H * C) for the masked passes (F = 3872, H = 128, C = 10), and for the fused
   head 2 F H + T * 2 (S H + H C) with S the gathered (dropped, padded) feature count.
3. Agreement (``--agreement-pool N``): a BayesianCNN trained on 200 MNIST images (50 epochs,
   Adam), N MNIST pool images scored at T = 100 in float32 and bf16 with the same masks: max
   abs difference per metric, BALD top-10 overlap and exact order.
4. ``--train``: seconds per training step (Adam, batch 128) with NCHW convolution weights
   (before), channels-last weights (now) and channels-last under bf16 autocast.
5. ``--whole-pool``: one whole-pool round (59,880 MNIST images, T = 100, all metrics from the one
   pass) per mode with the given thread count(s): seconds.

Writes ``benchmarks/results/mc_cpu.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbald.benchtools import (  # noqa: E402
    interleaved_wall_cpu_times,
    loadavg,
    machine_info,
    write_results,
)
from fastbald.mc import FusedMLPHead, MCDropout  # noqa: E402
from fastbald.models import BayesianCNN  # noqa: E402
from fastbald.pool import score_pool  # noqa: E402

F_, H_, C_ = 3872, 128, 10
TRUNK_FLOP = 2 * (25 * 25 * 32 * 16) + 2 * (22 * 22 * 32 * 32 * 16)


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def peaks(threads: list[int], n: int = 2048, repeats: int = 5) -> list[dict[str, Any]]:
    """GFLOP/s of an n^3 GEMM: float32 MKL, float32 oneDNN, bf16 oneDNN (interleaved)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    bt = b.t().contiguous()
    ab, bb = a.bfloat16(), b.bfloat16()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        fns = [lambda: torch.mm(a, b), lambda: _lin(a, bt), lambda: torch.mm(ab, bb)]
        ts, cs = interleaved_wall_cpu_times(fns, repeats)
        fl = 2 * n**3
        row: dict[str, Any] = {"threads": th, "load": loadavg()}
        for i, name in enumerate(("fp32_mkl", "fp32_onednn", "bf16_onednn")):
            row[name] = fl / statistics.median(ts[i]) / 1e9  # GFLOP per wall second
            row[name + "_best"] = fl / min(ts[i]) / 1e9
            row[name + "_cpu"] = fl / statistics.median(cs[i]) / 1e9  # per CPU second
        rows.append(row)
    return rows


def build_time(T: int = 100) -> float:
    """CPU seconds to build the fused head's folded weights once (masks drawn; T = 100): paid
    once per score_pool call, i.e. once per round in the experiment."""
    torch.set_num_threads(1)
    model = BayesianCNN().eval()
    with MCDropout(model, T, seed=0) as mc:
        c0 = time.process_time()
        FusedMLPHead(mc, mc._fused_parts, (32, 11, 11), torch.float32)  # type: ignore[arg-type]
        return time.process_time() - c0


def _gathered(model: BayesianCNN, T: int) -> int:
    with MCDropout(model, T, seed=0) as mc:
        head = FusedMLPHead(mc, mc._fused_parts, (32, 11, 11), torch.float32)  # type: ignore[arg-type]
    return head.S


def throughput(model: BayesianCNN, x: torch.Tensor, Ts: list[int], threads: list[int],
               repeats: int) -> list[dict[str, Any]]:
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for T in Ts:
            def run(fused: bool, amp: bool, T: int = T) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if fused:
                        score_pool(model, x, T=T, k=10, metrics="all", progress=False, amp=amp)
                    else:
                        _score_pool_unfused(model, x, T)
            fns = [lambda: run(False, False), lambda: run(True, False), lambda: run(True, True)]
            ts, cs = interleaved_wall_cpu_times(fns, repeats)
            S = _gathered(model, T)
            masked = TRUNK_FLOP + T * 2 * (F_ * H_ + H_ * C_)
            fused = TRUNK_FLOP + 2 * F_ * H_ + T * 2 * (S * H_ + H_ * C_)
            n = x.shape[0]
            for name, t, c, fl in (("masked passes, fp32", ts[0], cs[0], masked),
                                   ("fused, fp32", ts[1], cs[1], fused),
                                   ("fused, bf16", ts[2], cs[2], fused)):
                med, cmed = statistics.median(t), statistics.median(c)
                rows.append({"threads": th, "T": T, "method": name, "load": loadavg(),
                             "images_per_s": n / med, "images_per_s_best": n / min(t),
                             "images_per_cpu_s": n / cmed,
                             "mflop_per_image": fl / 1e6, "useful_mflop_per_image": masked / 1e6,
                             "gflop_s": n * fl / med / 1e9, "gflop_cpu_s": n * fl / cmed / 1e9,
                             "speedup_vs_masked": statistics.median(
                                 a / b for a, b in zip(ts[0], t, strict=True)),
                             "speedup_vs_masked_cpu": statistics.median(
                                 a / b for a, b in zip(cs[0], c, strict=True))})
    return rows


def _score_pool_unfused(model: BayesianCNN, x: torch.Tensor, T: int) -> None:
    """score_pool's work with the unfused head: mc_logits(fused=False) per 256-image block and
    the fused scores (the pool code path with the old head)."""
    from fastbald import scores
    from fastbald.mc import mc_logits

    for s in range(0, x.shape[0], 256):
        lg = mc_logits(model, x[s : s + 256], T, seed=0, fused=False)
        scores(lg)


def _trained_model(data: Any, n: int = 200, seed: int = 0) -> BayesianCNN:
    import torch.nn.functional as F

    from fastbald.models import paper_weight_decay

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.x_train.shape[0], generator=g)[:n]
    x, y = data.x_train[idx], data.y_train[idx]
    torch.manual_seed(seed)
    m = BayesianCNN()
    opt = torch.optim.Adam(m.param_groups(paper_weight_decay(n)), lr=1e-3)
    m.train()
    for _ in range(50):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 128):
            b = perm[s : s + 128]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[b]), y[b]).backward()
            opt.step()
    return m.eval()


def agreement(model: BayesianCNN, pool: torch.Tensor, T: int = 100) -> dict[str, Any]:
    res = {}
    c0 = time.process_time()
    r32 = score_pool(model, pool, T=T, k=10, metrics="all", progress=False, seed=1)
    c1 = time.process_time()
    r16 = score_pool(model, pool, T=T, k=10, metrics="all", progress=False, seed=1, amp=True)
    c2 = time.process_time()
    for m, v in r32.metrics.items():
        d = (r16.metrics[m] - v).abs()
        res[m] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                  "max_value": float(v.abs().max())}
    assert r32.topk is not None and r16.topk is not None
    res["bald_top10_overlap"] = len(set(r32.topk.tolist()) & set(r16.topk.tolist()))
    res["bald_top10_same_order"] = bool(torch.equal(r32.topk, r16.topk))
    res["bald_top10_fp32"] = r32.topk.tolist()
    res["bald_top10_bf16"] = r16.topk.tolist()
    # Rank agreement over the whole pool: Spearman correlation of the BALD scores.
    a = r32.scores.argsort().argsort().double()
    b = r16.scores.argsort().argsort().double()
    res["bald_spearman"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    res["pool"] = int(pool.shape[0])
    res["seconds_fp32"], res["seconds_bf16"] = r32.elapsed_s, r16.elapsed_s
    res["cpu_seconds_fp32"], res["cpu_seconds_bf16"] = c1 - c0, c2 - c1
    res["threads"] = torch.get_num_threads()
    return res


def whole_pool(model: BayesianCNN, pool: torch.Tensor, threads: list[int]) -> list[dict[str, Any]]:
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for amp in (False, True):
            c0 = time.process_time()
            r = score_pool(model, pool, T=100, k=10, metrics="all", progress=False, amp=amp)
            rows.append({"threads": th, "mode": "bf16" if amp else "fp32", "load": loadavg(),
                         "images": int(pool.shape[0]), "seconds": r.elapsed_s,
                         "cpu_seconds": time.process_time() - c0})
    return rows


def _steps_per_round(n: int, batch: int = 128, epochs: int = 50) -> int:
    return -(-n // batch) * epochs


def training(threads: list[int], repeats: int, steps: int = 8) -> list[dict[str, Any]]:
    """Seconds per Adam step (batch 128, 1,020 labelled images as in the last round) of the
    paper's training: NCHW convolution weights (before), channels-last weights (what
    BayesianCNN uses now), and channels-last under bf16 autocast (not used: accuracy not
    validated over a run)."""
    import torch.nn.functional as F

    from fastbald.models import paper_weight_decay

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1020, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (1020,), generator=g)

    def run(nchw: bool, bf16: bool) -> None:
        torch.manual_seed(0)
        m = BayesianCNN()
        if nchw:
            for conv in (m.trunk.conv1, m.trunk.conv2):
                conv.weight.data = conv.weight.data.contiguous()
        opt = torch.optim.Adam(m.param_groups(paper_weight_decay(1020)), lr=1e-3)
        m.train()
        perm = torch.randperm(1020, generator=torch.Generator().manual_seed(1))
        for s in range(steps):
            b = perm[(s * 128) % 1020 : (s * 128) % 1020 + 128]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = m(x[b])
            F.cross_entropy(out.float(), y[b]).backward()
            opt.step()

    rows = []
    total_steps = sum(_steps_per_round(20 + 10 * r) for r in range(101))
    for th in threads:
        torch.set_num_threads(th)
        ts, cs = interleaved_wall_cpu_times(
            [lambda: run(True, False), lambda: run(False, False), lambda: run(False, True)], repeats)
        for name, t, c in zip(("NCHW weights, fp32 (before)", "channels-last weights, fp32 (now)",
                               "channels-last, bf16 autocast (not used)"), ts, cs, strict=True):
            step, cstep = statistics.median(t) / steps, statistics.median(c) / steps
            rows.append({"threads": th, "method": name, "load": loadavg(), "s_per_step": step,
                         "cpu_s_per_step": cstep,
                         "s_last_round": step * _steps_per_round(1020),
                         "cpu_s_last_round": cstep * _steps_per_round(1020),
                         "cpu_s_all_101_rounds": cstep * total_steps,
                         "speedup_vs_nchw": statistics.median(
                             a / b for a, b in zip(ts[0], t, strict=True)),
                         "speedup_vs_nchw_cpu": statistics.median(
                             a / b for a, b in zip(cs[0], c, strict=True))})
    return rows


def to_markdown(res: dict[str, Any]) -> str:
    mi = res["machine"]
    out = [f"# MC dropout on the paper's CNN (CPU), {mi.get('cpu')}, torch {mi.get('torch')}",
           f"Date {mi.get('date')}; load average when each row ran is given (2 cores, shared).", "",
           "## GEMM peaks (2048^3): GFLOP per CPU second (per wall second, median)", "",
           "| threads | fp32 torch.mm (MKL) | fp32 oneDNN | bf16 oneDNN | load |",
           "|---:|---:|---:|---:|---:|"]
    for r in res.get("peaks", []):
        out.append(f"| {r['threads']} | {r['fp32_mkl_cpu']:.0f} ({r['fp32_mkl']:.0f}) | "
                   f"{r['fp32_onednn_cpu']:.0f} ({r['fp32_onednn']:.0f}) | "
                   f"{r['bf16_onednn_cpu']:.0f} ({r['bf16_onednn']:.0f}) | {r['load']:.1f} |")
    pk = {r["threads"]: r for r in res.get("peaks", [])}
    out += ["", f"## score_pool throughput ({res['items']} images per call, all 7 metrics, "
            "top-10)", "",
            f"Each fused call includes building the folded weights once "
            f"({res.get('build_cpu_s', float('nan')):.2f} CPU s at T=100).", "",
            "| threads | T | method | images per CPU s | images per wall s | MFLOP/image "
            "executed (masked-pass equivalent) | GFLOP per CPU s | fraction of the same-dtype "
            "oneDNN peak (CPU s) | speed-up vs masked passes (CPU s; wall) | load |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("throughput", []):
        p = pk.get(r["threads"])
        key = "bf16_onednn_cpu" if "bf16" in r["method"] else "fp32_onednn_cpu"
        frac = f"{r['gflop_cpu_s'] / p[key]:.0%}" if p else ""
        out.append(f"| {r['threads']} | {r['T']} | {r['method']} | {r['images_per_cpu_s']:,.0f} "
                   f"| {r['images_per_s']:,.0f} | {r['mflop_per_image']:.1f} "
                   f"({r['useful_mflop_per_image']:.1f}) | {r['gflop_cpu_s']:.0f} | {frac} | "
                   f"{r['speedup_vs_masked_cpu']:.1f}x; {r['speedup_vs_masked']:.1f}x | "
                   f"{r['load']:.1f} |")
    ag = res.get("agreement")
    if ag:
        out += ["", f"## bf16 vs float32 scores ({ag['pool']} MNIST pool images, T=100, "
                "same masks, model trained on 200 images)", "",
                f"BALD top-10 overlap {ag['bald_top10_overlap']}/10, same order: "
                f"{ag['bald_top10_same_order']}; Spearman rank correlation of BALD over the pool "
                f"{ag['bald_spearman']:.5f}. Time ({ag['threads']} threads): float32 "
                f"{ag['seconds_fp32']:.1f} s wall / {ag['cpu_seconds_fp32']:.1f} s CPU, bf16 "
                f"{ag['seconds_bf16']:.1f} s wall / {ag['cpu_seconds_bf16']:.1f} s CPU.", "",
                "| metric | max abs diff | mean abs diff | max abs value |", "|---|---:|---:|---:|"]
        for m, v in ag.items():
            if isinstance(v, dict):
                out.append(f"| {m} | {v['max_abs']:.2e} | {v['mean_abs']:.2e} | "
                           f"{v['max_value']:.3f} |")
    if res.get("training"):
        out += ["", "## Training (Adam, batch 128, the paper's CNN; per step and per round)", "",
                "| threads | method | CPU s/step (wall) | CPU s, last round (1,020 images, "
                "400 steps) | CPU s, all 101 rounds (23,000 steps) | speed-up (CPU s; wall) "
                "| load |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for r in res["training"]:
            out.append(f"| {r['threads']} | {r['method']} | {r['cpu_s_per_step']:.3f} "
                       f"({r['s_per_step']:.3f}) | {r['cpu_s_last_round']:.1f} | "
                       f"{r['cpu_s_all_101_rounds']:,.0f} | {r['speedup_vs_nchw_cpu']:.2f}x; "
                       f"{r['speedup_vs_nchw']:.2f}x | {r['load']:.1f} |")
    if res.get("whole_pool"):
        out += ["", "## One whole-pool round (T=100, all metrics from the one pass)", "",
                "| threads | mode | images | wall s | CPU s | load |", "|---:|---|---:|---:|---:|---:|"]
        for r in res["whole_pool"]:
            out.append(f"| {r['threads']} | {r['mode']} | {r['images']:,} | {r['seconds']:.1f} "
                       f"| {r['cpu_seconds']:.1f} | {r['load']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--T", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agreement-pool", type=int, default=10000)
    ap.add_argument("--whole-pool", action="store_true")
    ap.add_argument("--skip-peaks", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--train", action="store_true", help="also time the training step")
    ap.add_argument("--merge", action="store_true",
                    help="keep the parts of an existing --out file that this run does not redo")
    ap.add_argument("--out", default="benchmarks/results/mc_cpu.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="fastbald: using the pure-PyTorch backend")
    res: dict[str, Any] = {}
    if args.merge and os.path.exists(args.out):
        import json

        with open(args.out) as f:
            res = json.load(f)
    res.update({"benchmark": "mc_cpu", "machine": machine_info(), "items": args.items,
                "repeats": args.repeats})
    if not args.skip_throughput:
        res["build_cpu_s"] = build_time()
    if not args.skip_peaks:
        res["peaks"] = peaks(args.threads)
    print(res.get("peaks"), flush=True)
    need_data = args.agreement_pool > 0 or args.whole_pool
    data = None
    if need_data:
        from fastbald.data import load_mnist

        data = load_mnist()
        x = data.x_train[: args.items]
    else:
        x = torch.rand(args.items, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = BayesianCNN().eval()
    if data is not None:
        torch.set_num_threads(max(args.threads))
        model = _trained_model(data)
    if not args.skip_throughput:
        res["throughput"] = throughput(model, x, args.T, args.threads, args.repeats)
        for r in res["throughput"]:
            print(r, flush=True)
    if data is not None and args.agreement_pool > 0:
        torch.set_num_threads(max(args.threads))
        res["agreement"] = agreement(model, data.x_train[-args.agreement_pool :])
        print({k: v for k, v in res["agreement"].items() if not isinstance(v, list)}, flush=True)
    if args.train:
        res["training"] = training(args.threads, args.repeats)
        for r in res["training"]:
            print(r, flush=True)
    if data is not None and args.whole_pool:
        res["whole_pool"] = whole_pool(model, data.x_train[120:], args.threads)
    print(write_results(res, args.out, to_markdown))


if __name__ == "__main__":
    main()
