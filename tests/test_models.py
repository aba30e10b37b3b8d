"""Tests for fastbald.models: the paper's Bayesian CNN and its trunk/head split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastbald.models import BayesianCNN, DeterministicCNN, paper_weight_decay

# conv1 1*32*16+32, conv2 32*32*16+32, fc1 3872*128+128, fc2 128*10+10
PAPER_PARAM_COUNT = 544 + 16_416 + 495_744 + 1_290


@pytest.fixture
def model() -> BayesianCNN:
    torch.manual_seed(0)
    return BayesianCNN()


def test_output_and_feature_shapes(model):
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert model.trunk(x).shape == (5, 32, 11, 11)
    assert model.feature_shape == (32, 11, 11) and model.num_features == 3872
    assert BayesianCNN(num_classes=3)(x).shape == (5, 3)


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAM_COUNT == 513_994
    assert model.fc1.in_features == 3872 and model.fc1.out_features == 128


def test_trunk_head_composition_eval(model):
    model.eval()
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.trunk(x)))
        assert torch.equal(model(x), model(x))  # eval mode is deterministic


def test_trunk_head_composition_train_same_rng(model):
    model.train()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.manual_seed(1)
        full = model(x)
        torch.manual_seed(1)
        composed = model.head(model.trunk(x))
        assert torch.equal(full, composed)


def test_dropout_only_in_head(model):
    assert not any(isinstance(m, nn.Dropout) for m in model.trunk.modules())
    head_dropouts = [m for m in model.head.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in head_dropouts] == [0.25, 0.5]
    assert model.dropout_modules() == head_dropouts
    assert model.head[0] is head_dropouts[0]  # dropout right after the pool
    custom = BayesianCNN(dropout_conv=0.1, dropout_fc=0.2)
    assert [d.p for d in custom.dropout_modules()] == [0.1, 0.2]


def test_trunk_deterministic_head_stochastic_in_train_mode(model):
    model.train()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.trunk(x), model.trunk(x))
        feats = model.trunk(x)
        assert not torch.equal(model.head(feats), model.head(feats))


def test_split(model):
    trunk, head = model.split()
    assert trunk is model.trunk and head is model.head
    n_split = sum(p.numel() for p in trunk.parameters()) + sum(p.numel() for p in head.parameters())
    assert n_split == PAPER_PARAM_COUNT
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats = trunk(x)
        assert torch.equal(head(feats), model(x))
        # MC use: features computed once, head repeated (T, B, C).
        head.train()
        samples = torch.stack([head(feats) for _ in range(4)])
    assert samples.shape == (4, 3, 10)


def test_layer_order():
    m = BayesianCNN()
    assert [type(c) for c in m.trunk] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert [type(c) for c in m.head] == [
        nn.Dropout, nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
    ]  # fmt: skip
    conv1 = m.trunk[0]
    assert conv1.kernel_size == (4, 4) and conv1.padding == (0, 0) and conv1.out_channels == 32


def test_deterministic_variants():
    assert BayesianCNN().mc_dropout is True
    assert BayesianCNN(deterministic=True).mc_dropout is False
    det = DeterministicCNN()
    assert det.mc_dropout is False and isinstance(det, BayesianCNN)
    # Same architecture: dropout is still there for training.
    assert sum(p.numel() for p in det.parameters()) == PAPER_PARAM_COUNT
    assert len(det.dropout_modules()) == 2
    assert "mc_dropout=False" in repr(det)


def test_dense_parameters(model):
    dense = model.dense_parameters()
    expected = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
    assert len(dense) == 4 and all(a is b for a, b in zip(dense, expected, strict=True))
    weights = model.dense_parameters(weights_only=True)
    assert len(weights) == 2 and weights[0] is model.fc1.weight and weights[1] is model.fc2.weight
    conv_ids = {id(p) for p in model.conv_parameters()}
    assert conv_ids.isdisjoint(id(p) for p in dense)
    assert len(conv_ids) + len(dense) == len(list(model.parameters()))


@pytest.mark.parametrize("scope", ["paper", "dense"])
def test_param_groups_cover_everything_once(model, scope):
    groups = model.param_groups(0.01, scope=scope)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    decayed = groups[0]["params"]
    if scope == "paper":
        assert len(decayed) == 1 and decayed[0] is model.fc1.weight
    else:
        assert len(decayed) == 4
    torch.optim.Adam(groups, lr=1e-3)  # accepted by the optimizer
    with pytest.raises(ValueError):
        model.param_groups(0.01, scope="all")


def test_weight_decay_only_moves_decayed_params(model):
    # With zero loss gradient, Adam + weight decay moves only the decayed parameter.
    groups = model.param_groups(1.0)
    opt = torch.optim.Adam(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    (0.0 * model(torch.rand(2, 1, 28, 28)).sum()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.fc1.weight"}


def test_paper_weight_decay():
    assert paper_weight_decay(20) == pytest.approx(2 * 3.5 / 20)
    assert paper_weight_decay(100, c=10.0) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        paper_weight_decay(0)


def test_backward_and_training_step_reduces_loss():
    torch.manual_seed(0)
    m = BayesianCNN()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(m.param_groups(paper_weight_decay(16)), lr=1e-3)
    m.eval()  # deterministic loss for the comparison
    loss0 = nn.functional.cross_entropy(m(x), y).item()
    m.train()
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    assert nn.functional.cross_entropy(m(x), y).item() < loss0
    assert all(p.grad is not None for p in m.parameters())


def test_reset_parameters(model):
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(123)
    model.reset_parameters()
    after = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    torch.manual_seed(123)
    model.reset_parameters()
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


def test_other_input_sizes_and_validation():
    m = BayesianCNN(in_channels=3, image_size=32)
    assert m.feature_shape == (32, 13, 13)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        BayesianCNN(image_size=7)
    with pytest.raises(ValueError):
        BayesianCNN(dropout_fc=1.0)
    with pytest.raises(ValueError):
        BayesianCNN(num_classes=0)


def test_state_dict_roundtrip(model):
    other = BayesianCNN()
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    assert set(model.state_dict()) == {
        "trunk.conv1.weight", "trunk.conv1.bias", "trunk.conv2.weight", "trunk.conv2.bias",
        "head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias",
    }  # fmt: skip
