"""Small torch.distributed helpers for sharded pool scoring (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_gather_varlen", "comm_device", "rank_world", "use_distributed"]


def use_distributed(distributed: bool | None, group: Any = None) -> bool:
    """Whether to shard: ``distributed=None`` means "if a process group is initialised"."""
    ready = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return bool(ready) and dist.get_world_size(group) > 1
    if distributed and not ready:
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() first (torchrun sets the environment)"
        )
    return bool(distributed)


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(device: torch.device, group: Any = None) -> torch.device:
    """Device that collectives of ``group`` need their tensors on (CUDA for nccl)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_varlen(
    x: torch.Tensor, group: Any = None, device: torch.device | None = None
) -> list[torch.Tensor]:
    """All-gather tensors whose last dimension differs between ranks.

    Every rank passes ``x`` of shape ``[..., n_rank]`` (same leading dims and dtype on all
    ranks); returns the list of all ranks' tensors (on CPU) in rank order, exactly as sent.
    """
    dev = device or torch.device("cpu")
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[-1]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lens = [int(s.item()) for s in sizes]
    m = max(lens)
    pad = torch.zeros((*x.shape[:-1], m), dtype=x.dtype, device=dev)
    pad[..., : x.shape[-1]] = x.to(dev)
    bufs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad, group=group)
    return [b[..., :k].cpu() for b, k in zip(bufs, lens, strict=True)]
