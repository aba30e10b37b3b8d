"""MC-dropout inference: fastbald.mc."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from fastbald.mc import (
    MCDropout,
    dropout_modules,
    match_mlp_head,
    mc_logits,
    mix_seed,
    resolve_split,
)

pytestmark = pytest.mark.filterwarnings("ignore:fastbald. using the pure-PyTorch backend")


class Split(nn.Module):
    """A small CNN with a deterministic trunk (conv + BatchNorm) and a dropout head."""

    def __init__(self, c: int = 5, p1: float = 0.25, p2: float = 0.5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(
            nn.Dropout(p1), nn.Flatten(), nn.Linear(4 * 3 * 3, 16), nn.ReLU(), nn.Dropout(p2),
            nn.Linear(16, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def split(self) -> tuple[nn.Module, nn.Module]:
        return self.trunk, self.head


def _model(seed: int = 0, **kw: float) -> Split:
    torch.manual_seed(seed)
    m = Split(**kw)
    with torch.no_grad():  # non-trivial running statistics
        m.trunk[1].running_mean.uniform_(-0.5, 0.5)
        m.trunk[1].running_var.uniform_(0.5, 2.0)
    return m


X = torch.rand(23, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_shape_and_split_detected() -> None:
    m = _model()
    out = mc_logits(m, X, 6, seed=0)
    assert out.shape == (23, 6, 5)
    trunk, head = resolve_split(m)
    assert trunk is m.trunk and head is m.head
    assert resolve_split(m, False) == (None, m)


def test_trunk_head_equals_full_model_with_same_masks() -> None:
    """Trunk once + head T times gives the full model's T passes (same masks, same seed)."""
    m = _model()
    for consistent in (True, False):
        split = mc_logits(m, X, 7, seed=11, consistent=consistent)
        full = mc_logits(m, X, 7, seed=11, consistent=consistent, trunk_head=False)
        pair = mc_logits((m.trunk, m.head), X, 7, seed=11, consistent=consistent)
        torch.testing.assert_close(split, full, rtol=1e-6, atol=1e-6)
        assert torch.equal(split, pair)
    # The unfused fast path (Sequential head starting with dropout: broadcast multiply) equals
    # the generic hook path bit for bit; the fused head (GEMMs with the masks in the weights) is
    # the same function summed in another order.
    generic = mc_logits((m.trunk, nn.Sequential(nn.Identity(), *m.head)), X, 7, seed=11)
    assert torch.equal(mc_logits(m, X, 7, seed=11, fused=False), generic)
    torch.testing.assert_close(mc_logits(m, X, 7, seed=11), generic, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("consistent", [True, False])
def test_bit_identical_across_batch_sizes(consistent: bool) -> None:
    m = _model()
    whole = mc_logits(m, X, 9, seed=3, consistent=consistent)
    for bs in (1, 7, 16):
        parts = [
            mc_logits(m, X[s : s + bs], 9, seed=3, consistent=consistent,
                      indices=torch.arange(s, min(s + bs, len(X))))
            for s in range(0, len(X), bs)
        ]
        assert torch.equal(torch.cat(parts), whole)
    # max_rows bounds the generic path's forward calls; at a fixed max_rows the values do not
    # depend on the batch either (every call runs the same number of rows, padded).
    small = mc_logits(m, X, 9, seed=3, consistent=consistent, max_rows=20)
    torch.testing.assert_close(small, whole, rtol=1e-6, atol=1e-6)
    for bs in (1, 5):
        parts = [
            mc_logits(m, X[s : s + bs], 9, seed=3, consistent=consistent, max_rows=20,
                      indices=torch.arange(s, min(s + bs, len(X))))
            for s in range(0, len(X), bs)
        ]
        assert torch.equal(torch.cat(parts), small)


def test_consistent_masks_shared_by_items_and_independent_masks_not() -> None:
    drop = nn.Sequential(nn.Dropout(0.5))
    x = torch.ones(6, 40)
    cons = mc_logits(drop, x, 5, seed=0)
    assert torch.equal(cons, cons[:1].expand_as(cons))  # same T masks for every item
    assert not torch.equal(cons[:, 0], cons[:, 1])  # but different across samples
    ind = mc_logits(drop, x, 5, seed=0, consistent=False)
    assert not torch.equal(ind[0], ind[1])
    # Independent masks depend on the global index, not on the position in the batch.
    shifted = mc_logits(drop, x[:2], 5, seed=0, consistent=False, indices=torch.tensor([4, 5]))
    assert torch.equal(shifted, ind[4:6])


def test_seeds() -> None:
    m = _model()
    a = mc_logits(m, X, 4, seed=5)
    assert torch.equal(a, mc_logits(m, X, 4, seed=5))
    assert not torch.equal(a, mc_logits(m, X, 4, seed=6))
    # The first t samples do not depend on T.
    assert torch.equal(mc_logits(m, X, 2, seed=5), a[:, :2])
    torch.manual_seed(0)
    b = mc_logits(m, X, 4)
    torch.manual_seed(0)
    assert torch.equal(b, mc_logits(m, X, 4))
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**70, -1) < 2**63


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_distribution_matches_torch(p: float) -> None:
    """Keep rate 1 - p, scale 1/(1-p) (torch's exact value), independent units."""
    F, T = 500, 200
    out = mc_logits(nn.Sequential(nn.Dropout(p)), torch.ones(1, F), T, seed=0)[0]
    kept = out != 0
    n = kept.numel()
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    ref = nn.functional.dropout(torch.ones(10_000), p, training=True)
    assert torch.equal(out[kept].unique(), ref[ref != 0].unique())
    # Units are independent: correlation between two units' masks across samples ~ 0.
    corr = torch.corrcoef(kept[:, :2].T.float())[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(T)


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 3D input")
def test_channel_dropout_masks_whole_channels() -> None:
    x = torch.ones(3, 6, 4, 5)
    out = mc_logits(nn.Sequential(nn.Dropout2d(0.5), nn.Flatten()), x, 30, seed=1)
    out = out.reshape(3, 30, 6, 20)
    per_channel = out.amin(-1) == out.amax(-1)
    assert bool(per_channel.all())
    assert 0 < (out == 0).float().mean().item() < 1
    with pytest.raises(ValueError, match="feature dims"):
        mc_logits(nn.Sequential(nn.Dropout2d(0.5)), torch.ones(3, 6, 4), 2, seed=0)


def test_output_distribution_matches_torch_train_mode() -> None:
    """MC samples of a small MLP: same mean and spread as torch's own dropout in train mode."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    x = torch.randn(1, 8)
    T = 4000
    ours = mc_logits(m, x, T, seed=0, consistent=False)[0]
    m.train()
    torch.manual_seed(1)
    with torch.no_grad():
        theirs = m(x.expand(T, 8))
    se = (ours.std(0) ** 2 / T + theirs.std(0) ** 2 / T).sqrt()
    assert bool(((ours.mean(0) - theirs.mean(0)).abs() < 5 * se).all())
    ratio = ours.std(0) / theirs.std(0)
    assert bool(((ratio > 0.9) & (ratio < 1.1)).all())


def test_batchnorm_stays_in_eval_and_modes_restored() -> None:
    m = _model(p1=0.0, p2=0.0)
    m.train()
    before = m.trunk[1].running_mean.clone()
    out = mc_logits(m, X, 3, seed=0)
    assert torch.equal(m.trunk[1].running_mean, before)
    m.eval()
    with torch.no_grad():
        expect = m(X)
    torch.testing.assert_close(out, expect.unsqueeze(1).expand(-1, 3, -1), rtol=1e-6, atol=1e-6)
    m.train()
    mc_logits(m, X, 3, seed=0)
    assert all(mod.training for mod in m.modules())
    assert not any(mod._forward_hooks for mod in m.modules())


def test_no_dropout_warns() -> None:
    m = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(RuntimeWarning, match="no dropout layer"):
        out = mc_logits(m, torch.randn(5, 4), 4)
    assert out.shape == (5, 4, 3)
    assert torch.equal(out, out[:, :1].expand_as(out))


def test_bad_inputs() -> None:
    m = _model()
    for T in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="T"):
            mc_logits(m, X, T)  # type: ignore[arg-type]

    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.d(x).sum(0, keepdim=True)  # [1, C] whatever the batch

    with pytest.raises(ValueError, match=r"returned shape \(1, 4\) for a batch of 48 inputs \(16 items x T=3"):
        mc_logits(Wrong(), torch.ones(5, 4), 3)
    with pytest.raises(ValueError, match="dropout layers"):
        mc_logits(m, X, 2, trunk_head=(nn.Sequential(nn.Dropout(0.1)), m.head))
    with pytest.raises(ValueError, match="exposes no split"):
        mc_logits(nn.Sequential(nn.Dropout(0.1)), X, 2, trunk_head=True)
    with pytest.raises(TypeError, match="AlphaDropout"):
        dropout_modules(nn.Sequential(nn.AlphaDropout(0.1)))
    with pytest.raises(TypeError, match="logits tensor"):
        mc_logits(nn.Sequential(nn.Dropout(0.1), _Tuple()), torch.ones(2, 3), 2)


class _Tuple(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_reused_dropout_module_draws_a_mask_per_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.d(x), self.d(x)], 1)

    out = mc_logits(Twice(), torch.ones(1, 64), 3, seed=0)
    assert not torch.equal(out[..., :64], out[..., 64:])


def test_engine_context_and_deterministic_mode() -> None:
    m = _model()
    with MCDropout(m, 4, seed=2) as mc:
        a = mc(X)
        assert not m.training
    assert torch.equal(a, mc_logits(m, X, 4, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = MCDropout(m, 4, sample=False)(X)
    assert torch.equal(det, det[:, :1].expand_as(det))


# -- the fused head (consistent masks, heads of the paper's form) ------------------------------
def _float64_reference(m: nn.Module, x: torch.Tensor, T: int, seed: int) -> torch.Tensor:
    """The unfused hook path in float64 (the same masks): the oracle of the fused head."""
    import copy

    m64 = copy.deepcopy(m).double()
    return mc_logits(m64, x.double(), T, seed=seed, fused=False)


@pytest.mark.parametrize("p1,p2", [(0.25, 0.5), (0.7, 0.3), (0.0, 0.5), (0.5, 0.0), (0.0, 0.0)])
def test_fused_head_matches_float64_masked_passes(p1: float, p2: float) -> None:
    """Dropped-feature (p <= 1/2) and kept-feature (p > 1/2) forms, and the p = 0 edge cases."""
    m = _model(p1=p1, p2=p2)
    assert match_mlp_head(m.head) is not None
    got = mc_logits(m, X, 12, seed=4)
    assert got.dtype == torch.float32 and got.shape == (23, 12, 5)
    ref = _float64_reference(m, X, 12, 4)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)


def test_fused_paper_cnn_bit_identical_across_batches_and_close_to_float64() -> None:
    from fastbald.models import BayesianCNN

    torch.manual_seed(0)
    m = BayesianCNN().eval()
    x = torch.rand(70, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    whole = mc_logits(m, x, 6, seed=1)
    for bs in (1, 3, 64):
        parts = torch.cat([mc_logits(m, x[s : s + bs], 6, seed=1) for s in range(0, 70, bs)])
        assert torch.equal(parts, whole)
    torch.testing.assert_close(whole.double(), _float64_reference(m, x, 6, 1), rtol=0, atol=5e-6)


def test_fused_bf16_autocast_close_to_float32() -> None:
    from fastbald.models import BayesianCNN

    torch.manual_seed(0)
    m = BayesianCNN().eval()
    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    fp32 = mc_logits(m, x, 8, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = mc_logits(m, x, 8, seed=0)
    assert bf.dtype == torch.float32
    err = (bf - fp32).abs().max().item()
    assert 0 < err < 2e-2 * fp32.abs().max().item()


def test_fused_head_follows_weight_changes_and_falls_back() -> None:
    m = _model()
    with MCDropout(m, 5, seed=0) as mc:
        a = mc(X)
        with torch.no_grad():
            m.head[2].weight.mul_(2.0)  # in place: the folded weights must be rebuilt
        b = mc(X)
    torch.testing.assert_close(b.double(), _float64_reference(m, X, 5, 0), rtol=0, atol=2e-6)
    assert not torch.equal(a, b)
    # Heads of another form, hooks and independent masks use the generic path (same masks).
    m.head[3].register_forward_hook(lambda mod, i, o: o)
    assert match_mlp_head(m.head) is None
    assert match_mlp_head(nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4), nn.Tanh(),
                                        nn.Dropout(0.1), nn.Linear(4, 2))) is None


def test_resolve_split_module_or_explicit_pair_only() -> None:
    m = _model()
    assert resolve_split(m) == (m.trunk, m.head)  # its split() method
    assert resolve_split((m.trunk, m.head)) == (m.trunk, m.head)
    assert resolve_split(m, (m.trunk, m.head)) == (m.trunk, m.head)

    class Attrs(nn.Module):  # trunk/head attributes but no split(): not inferred
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.head = nn.Flatten(), nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.trunk(x))

    a = Attrs()
    assert resolve_split(a) == (None, a)
    with pytest.raises(ValueError, match="exposes no split"):
        resolve_split(a, True)
    full, seq = resolve_split((m.trunk, m.head), False)
    assert full is None and isinstance(seq, nn.Sequential) and list(seq) == [m.trunk, m.head]
    with pytest.raises(ValueError, match="pair once"):
        resolve_split((m.trunk, m.head), (m.trunk, m.head))
    with pytest.raises(ValueError, match="pair"):
        resolve_split((m.trunk,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="head must be an nn.Module"):
        resolve_split((m.trunk, "head"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        resolve_split("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trunk_head must be"):
        resolve_split(m, 3)  # type: ignore[arg-type]


def _mlp_trunk_head(shared: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    d = nn.Dropout(0.3)
    head = nn.Sequential(d, nn.Linear(32, 32), nn.ReLU(), d if shared else nn.Dropout(0.3), nn.Linear(32, 5))
    return trunk, head


@pytest.mark.parametrize("shared", [True, False])
def test_fused_head_with_one_dropout_module_used_twice(shared: bool) -> None:
    """nn.Sequential(d, fc1, ReLU(), d, fc2): the second use of ``d`` is its call 1 on the generic
    path, so the fused head must draw that mask (it drew call 0's again: max diff 0.75)."""
    trunk, head = _mlp_trunk_head(shared)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    fused = mc_logits((trunk, head), x, 20, seed=3, fused=True)
    generic = mc_logits((trunk, head), x, 20, seed=3, fused=False)
    torch.testing.assert_close(fused, generic, rtol=0, atol=2e-6)
    with MCDropout((trunk, head), 20, seed=3) as mc:
        assert mc._fused_dtype(x) == torch.float32  # the fused path ran above


def test_fused_head_sees_weight_updates_through_data() -> None:
    """``p.data.mul_()`` (EMA / legacy code) does not bump the parameter's version: a live
    MCDropout's fused head still has to use the new weights."""
    trunk, head = _mlp_trunk_head(False)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    with MCDropout((trunk, head), 8, seed=0) as mc:
        a = mc(x)
        head[1].weight.data.mul_(2.0)
        b = mc(x)
        head[4].bias.data.add_(1.0)
        c = mc(x)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    torch.testing.assert_close(c, mc_logits((trunk, head), x, 8, seed=0, fused=False), rtol=0, atol=2e-6)


def test_fused_path_batch_size_invariant_with_a_linear_trunk() -> None:
    """The fused path runs the trunk on TRUNK_ITEMS-item calls (the last padded), as the generic
    path pads to GENERIC_ITEMS: a BLAS trunk rounds each item alike whatever the batch."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU())
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    x = torch.randn(600, 64, generator=torch.Generator().manual_seed(5))
    full = mc_logits((trunk, head), x, 30, seed=1)
    for b in (1, 2, 3, 7, 129):
        for s in (0, 5, 100):
            assert torch.equal(mc_logits((trunk, head), x[s : s + b], 30, seed=1), full[s : s + b]), (b, s)
