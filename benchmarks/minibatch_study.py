"""Why does every active MNIST run's test error jump at 110 acquired images (130 labelled)?

Under the paper's protocol a round trains 50 epochs of Adam on minibatches of 128: at n = 130
labelled images each epoch is one step on 128 images and one on the 2 left over, so half of all
steps follow the gradient of 2 images (Adam normalises the step, so a 2-image step is as long as a
128-image one). This script retrains the labelled sets that committed runs had at ``n`` images
(their first ``n`` labelled indices, from ``state.json``) exactly as the run did
(:func:`fastbald.loop.train_from_scratch`), with the protocol's minibatch of 128 and with ``n``
split into minibatches of equal size (``ceil(n / 128)`` of them: the same number of steps, none
tiny), for several training seeds (round numbers ``r, r + 1000, ...``; the first is the run's own
round, so its batch-128 error reproduces the run's recorded one), and prints the test errors.

    python benchmarks/minibatch_study.py benchmarks/results/mnist_full/state/bald_seed0 ... \\
        [--n 130] [--seeds 4] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from fastbald.data import load_mnist
from fastbald.loop import LoopProtocol, _error_rate, default_model_factory, train_from_scratch


def equal_batch(n: int, batch: int) -> int:
    """The minibatch size that splits ``n`` into ``ceil(n / batch)`` nearly equal minibatches."""
    return math.ceil(n / math.ceil(n / batch))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run state directories (or their state.json)")
    ap.add_argument("--n", type=int, default=130, help="labelled images to retrain on (default 130)")
    ap.add_argument("--seeds", type=int, default=4, help="training seeds per set and batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_mnist()
    rows = []
    for run in args.runs:
        path = run if run.suffix == ".json" else run / "state.json"
        st = json.loads(path.read_text())
        proto = LoopProtocol.from_dict(st["protocol"])
        labelled = st["labelled_indices"]
        if len(labelled) < args.n:
            print(f"{path}: only {len(labelled)} labelled images, skipped", file=sys.stderr)
            continue
        idx = torch.tensor(labelled[: args.n])
        round_ = (args.n - proto.initial) // proto.per_round
        recorded = next((r["test_error"] for r in st["records"] if r["labelled"] == args.n), None)
        errs: dict[int, list[float]] = {}
        for bs in (proto.batch_size, equal_batch(args.n, proto.batch_size)):
            q = dataclasses.replace(proto, batch_size=bs)
            errs[bs] = []
            for k in range(args.seeds):
                model, _ = train_from_scratch(default_model_factory, q, 10, data.x_train[idx],
                                              data.y_train[idx], round_ + 1000 * k)
                errs[bs].append(100 * _error_rate(model, data.x_test, data.y_test))
            print(f"{path.parent.name} n={args.n} batch {bs}: "
                  + " ".join(f"{e:.1f}" for e in errs[bs]), flush=True)
        rows.append((path.parent.parent.parent.name + "/" + path.parent.name, recorded, errs))
    bs0 = proto.batch_size
    bs1 = equal_batch(args.n, bs0)
    lines = [
        f"| run (its first {args.n} labelled images) | recorded test error | batch {bs0}: test error % "
        f"per training seed | mean | batch {bs1}: per seed | mean | difference of means |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rec, errs in rows:
        a, b = errs[bs0], errs[bs1]
        lines.append(
            f"| {name} | {'-' if rec is None else f'{100 * rec:.1f}%'} | "
            + ", ".join(f"{e:.1f}" for e in a) + f" | {np.mean(a):.1f} | "
            + ", ".join(f"{e:.1f}" for e in b) + f" | {np.mean(b):.1f} | {np.mean(a) - np.mean(b):+.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        cmd = "python benchmarks/minibatch_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(f"`{cmd}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
