"""score_pool under torch.distributed: 2 gloo processes on 127.0.0.1 give every rank the exact
single-process result."""

from __future__ import annotations

import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pool_fixtures import POOL, tiny
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fastbald.pool import score_pool

pytestmark = [
    pytest.mark.filterwarnings("ignore:fastbald. using the pure-PyTorch backend"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]

WORLD = 2
COMMON = dict(T=5, k=11, block_size=16, metrics="all", progress=False, seed=3)


class Stream(IterableDataset):
    """An iterable pool (no length): ranks cannot re-shard it and skip the others' blocks."""

    def __iter__(self):  # type: ignore[override]
        for i in range(len(POOL)):
            yield POOL[i]


class Diverged(nn.Module):
    """NaN logits for pool item 150 (in block 9, which rank 1 scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.d(x.flatten(1)[:, :4])
        return torch.where(x.flatten(1)[:, :1] == POOL[150].flatten()[0], torch.nan, out)


def _runs() -> dict[str, dict]:
    """The scoring runs compared between 1 and 2 processes: name -> score_pool arguments."""
    return {
        "dataset": dict(pool=POOL, batch_size=10),
        "loader_indep": dict(pool=DataLoader(POOL, batch_size=7), consistent=False),
        "tensor_margin": dict(pool=torch.stack([POOL[i] for i in range(len(POOL))]),
                              method="margin"),
        "iterable": dict(pool=Stream(), batch_size=9),
    }


def _summary(r) -> dict[str, torch.Tensor]:
    out = {f"m_{k}": v for k, v in r.metrics.items()}
    out["topk"] = r.topk
    out["world"] = torch.tensor(r.world_size)
    return out


def _worker(rank: int, port: int, outdir: str) -> None:
    warnings.filterwarnings("ignore", message="fastbald: using the pure-PyTorch backend")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        res: dict[str, object] = {}
        for name, kw in _runs().items():
            res[name] = _summary(score_pool(tiny(), **{**COMMON, **kw}))
        try:
            score_pool(Diverged(), POOL, T=2, block_size=16, progress=False)
            res["error"] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            res["error"] = f"{type(e).__name__}: {e}"
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_match_single_process(tmp_path: os.PathLike[str]) -> None:
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the distributed workers did not finish in 180 s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: score_pool(tiny(), **{**COMMON, **kw}) for name, kw in _runs().items()}
    finally:
        torch.set_num_threads(threads)
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        for name, r in single.items():
            assert int(got[name]["world"]) == WORLD
            assert torch.equal(got[name]["topk"], r.topk), (rank, name)
            for metric, v in r.metrics.items():
                assert torch.equal(got[name][f"m_{metric}"], v), (rank, name, metric)
        # The rank that met the NaN names the item; the other one learns which rank failed.
        if rank == 150 // 16 % WORLD:
            assert got["error"].startswith("ValueError") and "pool item 150" in got["error"]
        else:
            assert got["error"].startswith("RuntimeError: score_pool failed on rank 1")
            assert "pool item 150" in got["error"]
