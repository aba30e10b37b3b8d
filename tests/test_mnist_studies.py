"""benchmarks/mnist_init.py and benchmarks/mask_study.py: the pieces the issue-12 studies rest on."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from fastbald.loop import LoopProtocol
from fastbald.models import BayesianCNN
from fastbald.pool import score_pool

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(_BENCH) not in sys.path:  # mask_study imports batch_redundancy as a sibling script
        sys.path.insert(0, str(_BENCH))
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mi = _load("mnist_init")
ms = _load("mask_study")


def test_labelled_set_is_balanced_unique_and_seeded() -> None:
    y = torch.arange(500) % 10
    idx = mi.labelled_set(y, 35, repeat=0)
    assert idx.numel() == 35 and idx.unique().numel() == 35
    assert torch.bincount(y[idx[:20]], minlength=10).tolist() == [2] * 10
    assert torch.equal(idx, mi.labelled_set(y, 35, repeat=0))
    assert not torch.equal(idx, mi.labelled_set(y, 35, repeat=1))


def test_keras_init_is_glorot_uniform_with_zero_bias() -> None:
    torch.manual_seed(0)
    model = mi.keras_init_factory(LoopProtocol(), 10)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 4
    for m in layers:
        assert torch.count_nonzero(m.bias) == 0
        fan_in = m.weight[0].numel()
        fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert float(m.weight.detach().abs().max()) <= bound
        if m.weight.numel() > 10_000:  # uniform(-b, b) has std b / sqrt(3)
            assert float(m.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    # PyTorch's default init (the library's) has non-zero biases: the two really differ.
    torch.manual_seed(0)
    default = BayesianCNN(10)
    assert torch.count_nonzero(default.head[-1].bias) > 0


def test_independent_masks_differ_per_item_and_agree_in_expectation() -> None:
    torch.manual_seed(0)
    model = BayesianCNN(10).eval()
    with torch.no_grad():  # sharpen the head so that dropout moves the predictions
        model.head[-1].weight.mul_(20)
    x = torch.rand(6, 1, 28, 28)
    x[1] = x[0]  # two identical images
    T = 500
    ind = ms.independent_mask_scores(model, x, T, "bald", seed=3, block=4)
    assert not model.head.training and not model.trunk.training  # modes restored
    assert torch.equal(ind, ms.independent_mask_scores(model, x, T, "bald", seed=3, block=4))
    cons = score_pool(model, x, T=T, method="bald", seed=3, progress=False).scores
    # Consistent masks: identical images, identical scores; independent: different draws.
    assert cons[0] == cons[1]
    assert ind[0] != ind[1]
    # Both estimate the same per-item BALD (~0.2 nats here): at T = 500 they differ by <= 6%.
    assert float(cons.min()) > 0.01
    torch.testing.assert_close(ind, cons.to(ind.dtype), rtol=0.15, atol=0.0)


def test_training_variants_are_what_their_names_say() -> None:
    """mnist_init's variants: torch = the experiment's own training, keras = another init only,
    bf16 = the experiment's model trained under bf16 autocast (LoopProtocol.train_bf16)."""
    from fastbald.loop import default_model_factory

    assert set(mi.VARIANTS) == {"torch", "keras", "bf16"}
    assert mi.VARIANTS["torch"] == (default_model_factory, {})
    assert mi.VARIANTS["keras"] == (mi.keras_init_factory, {})
    factory, overrides = mi.VARIANTS["bf16"]
    assert factory is default_model_factory
    assert LoopProtocol(**overrides).differences(LoopProtocol()) == ["train_bf16: True != False"]
