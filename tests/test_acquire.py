"""fastbald.acquire's top-k (fastbald.acquire.top_k): the same indices, in the same order, as the
stable sort of the whole pool it replaced (ties broken by the lowest index), with many ties at the
k-th value, infinities, signed zeros, ascending metrics and NaN input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastbald
from fastbald.acquire import ASCENDING, ranking_key, top_k


def stable_sort_topk(values: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """What fastbald.acquire did before: a stable sort of the whole pool by the ranking key."""
    return torch.sort(ranking_key(values, method), descending=True, stable=True).indices[:k]


def tied_pools(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 5000
    few = torch.randint(0, 4, (n,), generator=g).float() / 4  # 4 values: huge ties everywhere
    boundary = torch.rand(n, generator=g)
    boundary[torch.randperm(n, generator=g)[:700]] = float(boundary.sort(descending=True).values[40])
    inf = torch.rand(n, generator=g)
    inf[::97] = float("inf")
    inf[5::89] = -float("inf")
    zeros = torch.zeros(n)
    zeros[::3] = -0.0
    zeros[::7] = 1e-30
    return [few, boundary, inf, zeros, torch.full((n,), 0.5), few.double(), boundary.half()]


@pytest.mark.parametrize("method", ["bald", "margin"])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_indices_as_the_stable_sort(method, seed):
    for pool in tied_pools(seed):
        for k in (0, 1, 2, 39, 40, 41, 100, 699, 1000, 4999, 5000):
            want = stable_sort_topk(pool, k, method)
            got = fastbald.acquire(pool, k, method)
            assert torch.equal(got, want), (method, pool.dtype, k)
            assert torch.equal(top_k(pool, k, largest=method not in ASCENDING), want)


def test_numpy_pool_scores_and_integer_scores():
    s = np.repeat(np.arange(50, dtype=np.float32), 20)[::-1].copy()  # 20-way ties
    out = fastbald.acquire(s, 30, "bald")
    assert isinstance(out, np.ndarray)
    assert out.tolist() == stable_sort_topk(torch.from_numpy(s), 30, "bald").tolist()
    ints = torch.tensor([3, 1, 3, 2, 3, 1])
    assert top_k(ints, 4).tolist() == [0, 2, 4, 3]
    assert top_k(torch.tensor([True, False, True]), 2).tolist() == [0, 2]


def test_nan_scores_are_rejected():
    s = torch.rand(100)
    s[[17, 60]] = float("nan")
    with pytest.raises(ValueError, match="first at pool item 17"):
        fastbald.acquire(s, 5, "bald")
    with pytest.raises(ValueError, match="first at pool item 17"):
        fastbald.acquire(s, 5, "margin")


def test_one_million_scores_with_ties():
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(1_000_000, generator=g) * 1000).floor() / 1000  # ~1000 copies of each value
    for k in (10, 1500):
        assert torch.equal(fastbald.acquire(s, k, "bald"), stable_sort_topk(s, k, "bald"))


@pytest.mark.parametrize("k", [6, -1, -3, 2.7, 2.0, True, torch.tensor(2), "2", None])
def test_top_k_rejects_a_bad_k(k):
    # Before the check: 6 and -1 -> IndexError, -3 -> RuntimeError, 2.7 -> silently 2 items.
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, N=5\]"):
        top_k(torch.rand(5), k)


def test_top_k_accepts_numpy_integers_and_the_bounds():
    v = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2])
    assert top_k(v, np.int64(2)).tolist() == [3, 1]
    assert top_k(v, 5).tolist() == [3, 1, 2, 4, 0]
    assert top_k(v, 0).tolist() == []
    assert top_k(torch.empty(0), 0).tolist() == []


@pytest.mark.parametrize("method", ["bald", "variation_ratio", "margin"])
def test_poolscores_of_numpy_input(method):
    """scores() of a numpy pool holds numpy rows; acquire() takes them and answers in numpy."""
    a = np.random.default_rng(3).standard_normal((40, 6, 5)).astype(np.float32)
    got = fastbald.acquire(fastbald.scores(a), 7, method)
    assert isinstance(got, np.ndarray)
    assert got.tolist() == fastbald.acquire(a, 7, method).tolist()


def test_reversed_and_big_endian_numpy_are_accepted():
    a = np.random.default_rng(4).standard_normal((30, 5, 4)).astype(np.float32)
    want = fastbald.acquire(a, 6, "bald").tolist()
    assert fastbald.acquire(a.astype(">f4"), 6, "bald").tolist() == want
    rev = fastbald.acquire(a[::-1], 6, "bald").tolist()
    assert [29 - i for i in rev] == want
    s = fastbald.bald(a)
    assert fastbald.acquire(s[::-1].copy()[::-1], 6, "bald").tolist() == want  # negative strides
