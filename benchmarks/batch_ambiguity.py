"""Are the images an MNIST active-learning run acquires ambiguous digits?

A label helps a model most where the model is unsure because it has not seen enough of the
kind (epistemic uncertainty), and least where the digit itself is ambiguous: a model trained
on all of MNIST is still unsure there (aleatoric uncertainty), and one label of it teaches
little. This script asks which of the two the acquired batches hold.

Reference: the paper's CNN trained twice, on each half of the 60,000 training images (cross
fitting), so that every image is judged by the model that did *not* train on it. For each run
(``state.json`` of ``fastbald experiment mnist``) and range of rounds it reports, over the
acquired images, against all training images:

- ``ref entropy``: mean predictive entropy (nats) of the held-out reference model;
- ``in top 1%``: share of the images whose reference entropy is in the top 1% of all 60,000
  (all images: 1% by construction);
- ``ref wrong``: share the held-out reference model misclassifies (its test error is printed
  too): ambiguous, badly written or mislabelled digits;
- ``p(label)``: mean reference probability of the image's own label.

    python benchmarks/batch_ambiguity.py benchmarks/results/mnist_full/state/*/ \\
        [--rounds 1-10 1-40] [--epochs 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastbald.data import load_mnist
from fastbald.models import BayesianCNN

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, however it is loaded
from batch_redundancy import batches_by_range, emit, load_states, parse_range  # noqa: E402


def train_reference(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, batch: int = 128) -> BayesianCNN:
    """The paper's CNN trained on (x, y): Adam 1e-3, ``epochs`` epochs, dropout on while
    training, no weight decay (plenty of data)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BayesianCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: BayesianCNN, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Probabilities of the dropout-off model, [N, C]."""
    return torch.cat([torch.softmax(model(x[i : i + batch]), -1) for i in range(0, x.shape[0], batch)])


def held_out_reference(data, epochs: int, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Held-out reference probabilities [N_train, C] by 2-fold cross fitting, and each fold
    model's test error."""
    n = data.x_train.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (perm[: n // 2], perm[n // 2 :])
    probs = torch.empty(n, data.num_classes)
    test_err = []
    for k, (fit, held) in enumerate((halves, halves[::-1])):
        t0 = time.perf_counter()
        model = train_reference(data.x_train[fit], data.y_train[fit], epochs, seed + 1 + k)
        probs[held] = predict(model, data.x_train[held])
        err = float((predict(model, data.x_test).argmax(-1) != data.y_test).float().mean())
        test_err.append(err)
        print(f"reference fold {k}: trained on {len(fit)} images in {time.perf_counter() - t0:.0f} s, "
              f"test error {100 * err:.2f}%", file=sys.stderr)
    return probs.double().numpy(), test_err


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of probabilities ``p`` [n, C], with 0 log 0 = 0."""
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)


def ambiguity_stats(idx: np.ndarray, probs: np.ndarray, labels: np.ndarray, top1: float) -> dict[str, float]:
    """Mean reference entropy, share above the top-1% entropy threshold ``top1``, share the
    reference misclassifies, mean reference probability of the true label, over images ``idx``."""
    p = probs[idx]
    ent = entropy(p)
    return {
        "images": len(idx),
        "entropy": float(ent.mean()),
        "top1": float((ent > top1).mean()),
        "wrong": float((p.argmax(-1) != labels[idx]).mean()),
        "p_label": float(p[np.arange(len(idx)), labels[idx]].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run state directories (or their state.json)")
    ap.add_argument("--rounds", nargs="+", type=parse_range, default=[(1, 10), (1, 40)],
                    help="round ranges FIRST-LAST (from 1), default 1-10 1-40")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each reference model (3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    states = load_states(args.runs, ap)

    data = load_mnist()
    labels = data.y_train.numpy()
    probs, test_err = held_out_reference(data, args.epochs)
    top1 = float(np.quantile(entropy(probs), 0.99))
    base = ambiguity_stats(np.arange(len(labels)), probs, labels, top1)

    lines = [
        f"Reference: the paper's CNN trained {args.epochs} epochs on each half of the 60,000 training "
        f"images, each image judged by the half that did not train on it (test error "
        f"{100 * test_err[0]:.2f}% / {100 * test_err[1]:.2f}%); top 1% of reference entropy: "
        f"> {top1:.3f} nats.",
        "",
        "| run | rounds | images | ref entropy (nats) | in top 1% | ref wrong | p(label) |",
        "|---|---|---|---|---|---|---|",
        f"| all 60,000 training images | - | {base['images']} | {base['entropy']:.3f} | "
        f"{100 * base['top1']:.1f}% | {100 * base['wrong']:.1f}% | {base['p_label']:.3f} |",
    ]
    for name, a, _, bs in batches_by_range(states, args.rounds):
        idx = np.asarray([i for batch in bs for i in batch], dtype=np.int64)
        s = ambiguity_stats(idx, probs, labels, top1)
        lines.append(f"| {name} | {a}-{a - 1 + len(bs)} | {s['images']} | {s['entropy']:.3f} | "
                     f"{100 * s['top1']:.1f}% | {100 * s['wrong']:.1f}% | {s['p_label']:.3f} |")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
