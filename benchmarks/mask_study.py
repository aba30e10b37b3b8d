"""Consistent vs independent MC-dropout masks: which images does whole-pool top-k acquisition pick?

fastbald's loop scores the pool with *consistent* masks (the same T dropout masks for every pool
item, as BatchBALD needs); the authors' Keras code drew *independent* masks per item and pass.
Per item the two give the same score distribution, but with consistent masks every item is
scored by the same 100 sub-networks, so the estimation error is shared by similar images, and
the top 10 of ~59,000 can crowd into one region.

For each given run state (``fastbald experiment mnist --state-dir``) and round, this rebuilds the
model the run acquired with (round r-1's model: same labelled set, training seed and thread
count, so it is the run's model bit for bit on the same machine), re-scores the round's pool
with consistent masks as the run did (``score_pool``, the run's scoring seed: the top-k must be
the batch the run acquired, which the table checks) and with independent masks (the trunk once,
the head in train mode on each item's features repeated T times, so torch's dropout draws a
fresh mask per item and pass, as Keras' did; seeded per round), and measures both batches as ``batch_redundancy.py`` does (distinct labels, images of
the largest label, nearest-neighbour cosine of raw pixels).

    python benchmarks/mask_study.py benchmarks/results/mnist_full/state/bald_seed0 --rounds 1-5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from batch_redundancy import batch_stats, parse_range

from fastbald.data import load_mnist
from fastbald.loop import (
    _SEED_SCORE,
    LabelledPool,
    LoopProtocol,
    default_model_factory,
    train_from_scratch,
)
from fastbald.mc import mix_seed
from fastbald.metrics import acquisition
from fastbald.pool import score_pool
from fastbald.scores import scores


@torch.no_grad()
def independent_mask_scores(
    model: torch.nn.Module, x: torch.Tensor, T: int, metric: str, seed: int, block: int = 64
) -> torch.Tensor:
    """[N] scores from T MC-dropout passes with an independent mask per item and pass (torch's
    dropout, after seeding torch's global RNG with ``seed``)."""
    trunk, head = model.split()
    trunk.eval()
    head.train()  # only dropout behaves differently in train mode (the head has no batch norm)
    torch.manual_seed(seed)
    out = []
    try:
        for s in range(0, x.shape[0], block):
            f = trunk(x[s : s + block])
            logits = head(f.repeat_interleave(T, dim=0)).view(f.shape[0], T, -1)
            out.append(getattr(scores(logits, metrics=[metric]), metric))
    finally:
        head.eval()
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", nargs="+", type=Path, help="run state directories (or their state.json)"
    )
    ap.add_argument("--rounds", type=parse_range, default=(1, 5), help="FIRST-LAST (from 1)")
    ap.add_argument(
        "--candidates",
        type=int,
        default=4000,
        help="re-score the consistent top N with independent masks (default 4000)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="the runs' --threads (bit-exact rebuild)"
    )
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_mnist()
    labels = data.y_train.numpy()
    rows = data.x_train.reshape(data.x_train.shape[0], -1).numpy().astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    lines = [
        "| run | round | reproduced | masks | classes | largest class | nn cosine | overlap "
        "| worst consistent rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print(*lines, sep="\n", flush=True)
    totals: dict[str, list[list[int]]] = {"consistent": [], "independent": []}
    for path in args.runs:
        f = path / "state.json" if path.is_dir() else path
        st = json.loads(f.read_text())
        p = LoopProtocol.from_dict(st["protocol"])
        acq = acquisition(p.acquisition)
        if acq.rule != "top_k" or acq.metric is None or p.pool_subset is not None:
            sys.exit(
                f"{f}: needs a whole-pool top-k run (got {acq.name}, pool_subset {p.pool_subset})"
            )
        labelled = st["labelled_indices"]
        a, b = args.rounds
        for r in range(a, min(b, st["rounds_done"] - 1) + 1):
            have = p.initial + (r - 1) * p.per_round
            idx = torch.tensor(labelled[:have], dtype=torch.int64)
            model, _ = train_from_scratch(
                default_model_factory,
                p,
                data.num_classes,
                data.x_train[idx],
                data.y_train[idx],
                r - 1,
            )
            pool = LabelledPool(
                data.x_train.shape[0], labelled[:have], st["validation_indices"]
            ).pool_indices()
            acquired = labelled[have : have + p.per_round]
            picks = {}
            seed = mix_seed(p.seed, r, _SEED_SCORE)
            t0 = time.perf_counter()
            res = score_pool(
                model,
                data.x_train[pool],
                T=p.T,
                method=acq.metric,
                k=p.per_round,
                block_size=p.score_block_size,
                batch_size=p.score_block_size,
                seed=seed,
                progress=False,
            )
            assert res.topk is not None
            picks["consistent"] = pool[res.topk].tolist(), time.perf_counter() - t0
            # Independent masks on the consistent top ``candidates`` only: an item outside them
            # would need an estimation error far larger than the spread of the top scores to
            # make the top k; the "worst rank" column shows how deep the picks actually came from.
            assert res.scores is not None
            order = torch.argsort(res.scores, descending=True)
            cand = order[: args.candidates]
            t0 = time.perf_counter()
            sc = independent_mask_scores(
                model, data.x_train[pool[cand]], p.T, acq.metric, seed % 2**63
            )
            top = torch.topk(sc, p.per_round).indices
            worst = int(top.max()) + 1  # ranks in the consistent order, from 1
            picks["independent"] = pool[cand[top]].tolist(), time.perf_counter() - t0
            same = picks["consistent"][0] == acquired
            for mode, (batch, secs) in picks.items():
                totals[mode].append(batch)
                s = batch_stats([batch], labels, unit, data.num_classes)
                ov = len(set(batch) & set(picks["consistent"][0]))
                lines.append(
                    f"| {f.parent.name} | {r} | {'yes' if same else 'NO'} | {mode} | "
                    f"{s['classes']:.0f} | {s['largest']:.0f} | {s['nn_cos']:.3f} | {ov}/{p.per_round} "
                    f"| {p.per_round if mode == 'consistent' else worst} |"
                )
                print(lines[-1], f"({secs:.0f} s)", flush=True)
    lines.append("")
    lines.append(
        "| masks | batches | classes per batch | largest class | nearest-neighbour cosine |"
    )
    lines.append("|---|---|---|---|---|")
    for mode, bs in totals.items():
        s = batch_stats(bs, labels, unit, data.num_classes)
        lines.append(
            f"| {mode} | {s['batches']} | {s['classes']:.2f} | {s['largest']:.2f} | {s['nn_cos']:.3f} |"
        )
    print(*lines[-4:], sep="\n", flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
