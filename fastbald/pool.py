"""Streaming MC-dropout scoring of a whole pool, with a running top-k, on one process or sharded
over torch.distributed ranks.

The pool is cut into compute *blocks* of ``block_size`` consecutive items aligned to the global
index (block ``b`` holds items ``[b * block_size, (b + 1) * block_size)``). Every item is always
forwarded at the same position of the same block, with masks that depend only on the seed (and,
for independent masks, its global index), so its scores are bit-for-bit the same whatever the
loader's ``batch_size``, ``num_workers`` or the number of ranks: blocks are dealt round-robin to
ranks (block ``b`` to rank ``b % world_size``) and gathered back in order. For a block, T
stochastic forwards (trunk once, head T times where the model splits), the fused scores and a
top-k merge; nothing of size N x T x C is ever held.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

from . import distributed as _dist
from ._io import atomic_torch_save  # noqa: F401  (re-exported)
from .acquire import ranking_key
from .mc import DEFAULT_MAX_ROWS, MCDropout
from .metrics import METRICS, parse_metrics
from .scores import scores as _scores

__all__ = ["DEFAULT_BLOCK_SIZE", "PoolResult", "PoolScoringConfig", "SyntheticPool", "score_pool"]

#: Items per compute block (part of the reproducibility key, with seed and T).
DEFAULT_BLOCK_SIZE = 256


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class PoolResult:
    """Scores of a whole pool.

    Attributes:
        scores: ``[N]`` scores of ``method`` (float32; float64 for a float64 model), on CPU.
        topk: ``[k]`` int64 global indices of the k best items, best first (ties: lowest index
            first), or None when no ``k`` was given. Equals ``fastbald.acquire(scores, k,
            method)``.
        topk_scores: ``scores[topk]`` (None without ``k``).
        method: the acquisition metric.
        metrics: every computed metric, name -> ``[N]`` (``method`` included).
        T, seed, consistent, block_size: the settings that fix the result bit for bit.
        world_size: number of ranks that scored the pool.
        elapsed_s: wall time of the scoring loop (this rank; gathering included).
    """

    scores: torch.Tensor
    topk: torch.Tensor | None
    topk_scores: torch.Tensor | None
    method: str
    metrics: dict[str, torch.Tensor]
    T: int
    seed: int
    consistent: bool
    block_size: int
    world_size: int = 1
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Pool size N."""
        return int(self.scores.shape[0])

    @property
    def images_per_s(self) -> float:
        """Pool items scored per second (all ranks together)."""
        return self.n / self.elapsed_s if self.elapsed_s > 0 else math.inf

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result to ``path`` atomically (temporary file, fsync, rename): an interrupt
        leaves either the old file or the new one, never a half-written file."""
        atomic_torch_save(
            {
                "scores": self.scores,
                "topk": self.topk,
                "topk_scores": self.topk_scores,
                "method": self.method,
                "metrics": self.metrics,
                "T": self.T,
                "seed": self.seed,
                "consistent": self.consistent,
                "block_size": self.block_size,
                "world_size": self.world_size,
                "elapsed_s": self.elapsed_s,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PoolResult:
        """Read a result written by :meth:`save`."""
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Synthetic pool (benchmarks, tests): images generated on the fly, deterministically
# ------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 values in [0, 2^32) (no overflow: products stay below 2^59)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


class SyntheticPool(Dataset):
    """``n`` deterministic pseudo-random images of ``shape`` (default 1x28x28, values in [0, 1)),
    generated when read: image ``i`` depends only on ``(seed, i)``, and the pool takes no memory.

    Implements ``__getitems__`` so a DataLoader generates whole batches vectorised.
    """

    def __init__(self, n: int, shape: Sequence[int] = (1, 28, 28), seed: int = 0) -> None:
        if n < 0 or n >= 2**32:
            raise ValueError(f"n must be in [0, 2^32), got {n}")
        self.n = int(n)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed) & _M32
        self._numel = int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.n

    def _make(self, idx: torch.Tensor) -> torch.Tensor:
        base = _hash32(idx ^ self.seed)
        pix = torch.arange(self._numel, dtype=torch.int64)
        h = _hash32((base.unsqueeze(1) + pix * 0x9E3779B1) & _M32)
        img = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
        return img.reshape(-1, *self.shape)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a pool of {self.n}")
        return self._make(torch.tensor([i % self.n], dtype=torch.int64))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The images of ``indices``, generated in one vectorised call (rows of one tensor, so
        any DataLoader ``collate_fn`` accepts them)."""
        return list(self._make(torch.as_tensor(list(indices), dtype=torch.int64)).unbind(0))


def _collate(batch: Any) -> Any:
    """default_collate, except that a batch already stacked (``__getitems__``) passes through."""
    if isinstance(batch, torch.Tensor):
        return batch
    return default_collate(batch)


# ------------------------------------------------------------------------------------------------
# Pool sources
# ------------------------------------------------------------------------------------------------
class _RangesSampler(Sampler[int]):
    """Yields the indices of a list of [start, end) ranges, in order (no list of N ints)."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges

    def __iter__(self) -> Iterator[int]:
        for s, e in self.ranges:
            yield from range(s, e)

    def __len__(self) -> int:
        return sum(e - s for s, e in self.ranges)


def _inputs(batch: Any, where: str) -> torch.Tensor:
    """The model input of a pool batch: the batch itself, or the first element of (x, y)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"{where}: pool items must be tensors x or tuples (x, y, ...), got a batch of "
            f"type {type(batch).__name__}"
        )
    return batch


def _owned_blocks(n: int, block: int, rank: int, world: int) -> list[tuple[int, int]]:
    nb = -(-n // block)
    return [(b * block, min(n, (b + 1) * block)) for b in range(rank, nb, world)]


@dataclass
class _Source:
    n: int | None  # pool size when known in advance
    batches: Iterable[Any]  # loader batches (owned items only, or all items when skip)
    skip: bool  # True: the stream holds every item and non-owned blocks are skipped here
    loader: DataLoader | None = None

    @property
    def positional(self) -> bool:
        """The stream holds exactly this rank's blocks (known length, sharded by the loader)."""
        return self.n is not None and not self.skip


def _make_source(
    pool: Any,
    *,
    batch_size: int,
    block: int,
    rank: int,
    world: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int | None,
) -> _Source:
    def loader_for(ds: Dataset, ranges: list[tuple[int, int]], **kw: Any) -> DataLoader:
        opts: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "collate_fn": _collate,
        }
        opts.update(kw)
        if opts["num_workers"] > 0 and prefetch_factor is not None:
            opts["prefetch_factor"] = prefetch_factor
        return DataLoader(ds, sampler=_RangesSampler(ranges), **opts)

    if isinstance(pool, np.ndarray):
        pool = torch.from_numpy(pool)
    if isinstance(pool, torch.Tensor):
        if pool.dim() < 1:
            raise ValueError("pool tensor must be batch-first [N, ...], got a scalar")
        n = int(pool.shape[0])
        owned = _owned_blocks(n, block, rank, world)
        return _Source(n, (pool[s:e] for s, e in owned), skip=False)
    if isinstance(pool, DataLoader):
        ds = pool.dataset
        if isinstance(pool.sampler, RandomSampler):
            raise ValueError(
                "the pool DataLoader shuffles (RandomSampler): scores are matched to items by "
                "position, so build it with shuffle=False"
            )
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            return _Source(None, pool, skip=world > 1)
        sequential = isinstance(pool.sampler, SequentialSampler) and pool.batch_size is not None
        if world == 1 or not sequential:
            try:
                n = len(pool.sampler) if not sequential else len(ds)
            except TypeError:
                n = None
            return _Source(n, pool, skip=world > 1)
        n = len(ds)
        kw: dict[str, Any] = {
            "batch_size": pool.batch_size,
            "num_workers": pool.num_workers,
            "pin_memory": pool.pin_memory,
            "collate_fn": pool.collate_fn,
            "worker_init_fn": pool.worker_init_fn,
            "timeout": pool.timeout,
            "multiprocessing_context": pool.multiprocessing_context,
        }
        if pool.num_workers > 0:
            kw["prefetch_factor"] = pool.prefetch_factor
        owned = _owned_blocks(n, block, rank, world)
        ld = DataLoader(ds, sampler=_RangesSampler(owned), **kw)
        return _Source(n, ld, skip=False, loader=ld)
    if isinstance(pool, IterableDataset):
        ld = DataLoader(pool, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=pin_memory, collate_fn=_collate)
        return _Source(None, ld, skip=world > 1, loader=ld)
    if isinstance(pool, Dataset) or (hasattr(pool, "__getitem__") and hasattr(pool, "__len__")):
        n = len(pool)
        owned = _owned_blocks(n, block, rank, world)
        ld = loader_for(pool, owned)  # type: ignore[arg-type]
        return _Source(n, ld, skip=False, loader=ld)
    raise TypeError(
        "pool must be a torch.Tensor, a Dataset (items x or (x, y)), an IterableDataset or a "
        f"DataLoader, got {type(pool).__name__}"
    )


def _rechunk(
    batches: Iterable[Any], sizes: Iterable[int], device: torch.device, non_blocking: bool
) -> Iterator[torch.Tensor]:
    """Cut a stream of batches into blocks of the given sizes (the last may be short when the
    stream ends). Each batch moves to ``device`` first (pinned -> non-blocking copy)."""
    size_it = iter(sizes)
    want = next(size_it, None)
    buf: list[torch.Tensor] = []
    have = 0
    for i, batch in enumerate(batches):
        x = _inputs(batch, f"pool batch {i}")
        if x.dim() < 1:
            raise ValueError(f"pool batch {i} is a scalar; expected a batch [B, ...]")
        x = x.to(device, non_blocking=non_blocking)
        while x.shape[0] > 0:
            if want is None:
                raise ValueError("the pool yielded more items than its length")
            take = min(want - have, x.shape[0])
            buf.append(x[:take])
            have += take
            x = x[take:]
            if have == want:
                yield buf[0] if len(buf) == 1 else torch.cat(buf)
                buf, have = [], 0
                want = next(size_it, None)
    if have:
        yield buf[0] if len(buf) == 1 else torch.cat(buf)


class _ScoreBuffer:
    """Scores of the blocks this rank computed, in stream order: one preallocated ``[M, cap]``
    tensor (grown by doubling when the pool's length is unknown).

    One allocation for the whole run, not one small long-lived tensor per block: small
    allocations that outlive a block, interleaved with the block's large temporaries, fragment
    the heap, and the resident memory then creeps up over a million-image run.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows = rows
        self.buf: torch.Tensor | None = None
        self.capacity = max(1, capacity)
        self.n = 0

    def append(self, vals: torch.Tensor) -> None:
        b = vals.shape[1]
        if self.buf is None:
            self.buf = torch.empty(self.rows, max(self.capacity, b), dtype=vals.dtype)
        elif self.n + b > self.buf.shape[1]:
            grown = torch.empty(self.rows, max(2 * self.buf.shape[1], self.n + b),
                                dtype=self.buf.dtype)
            grown[:, : self.n] = self.buf[:, : self.n]
            self.buf = grown
        self.buf[:, self.n : self.n + b] = vals
        self.n += b

    def result(self) -> torch.Tensor | None:
        if self.buf is None:
            return None
        return self.buf if self.n == self.buf.shape[1] else self.buf[:, : self.n].clone()


# ------------------------------------------------------------------------------------------------
# Running top-k
# ------------------------------------------------------------------------------------------------
def _order(keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by key descending, ties by index ascending."""
    by_idx = torch.argsort(idx, stable=True)
    by_key = torch.sort(keys[by_idx], descending=True, stable=True).indices
    return by_idx[by_key]


class RunningTopK:
    """The k largest keys seen so far (ties: lowest global index first), merged block by block;
    never sorts more than ``k + block`` values at once."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = torch.empty(0)
        self.idx = torch.empty(0, dtype=torch.int64)

    def update(self, keys: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge a block of keys [b] with global indices [b]."""
        if self.k == 0 or keys.numel() == 0:
            return
        keys = keys.detach().cpu()
        idx = idx.cpu()
        if self.keys.numel() == 0:
            self.keys = self.keys.to(keys.dtype)
        if self.keys.numel() >= self.k:  # only strictly better keys can enter...
            worst = self.keys[-1]
            worst_i = self.idx[-1]
            enter = (keys > worst) | ((keys == worst) & (idx < worst_i))
            if not bool(enter.any()):
                return
            keys, idx = keys[enter], idx[enter]
        ck = torch.cat([self.keys, keys.to(self.keys.dtype)])
        ci = torch.cat([self.idx, idx])
        o = _order(ck, ci)[: self.k]
        self.keys, self.idx = ck[o], ci[o]


# ------------------------------------------------------------------------------------------------
# score_pool, piece 1: the validated settings
# ------------------------------------------------------------------------------------------------
def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class PoolScoringConfig:
    """The settings of one :func:`score_pool` call, validated and normalised when constructed
    (ValueError / TypeError naming the bad one); see :func:`score_pool` for their meaning.

    After construction ``metrics`` holds canonical names in bit order with ``method`` among them,
    and ``amp`` the autocast dtype or None.
    """

    T: int = 20
    method: str = "bald"
    k: int | None = None
    metrics: Sequence[str] | str | None = None
    batch_size: int = DEFAULT_BLOCK_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: int = 0
    consistent: bool = True
    num_workers: int = 0
    pin_memory: bool | None = None
    prefetch_factor: int | None = None
    amp: bool | torch.dtype | None = False
    max_rows: int = DEFAULT_MAX_ROWS
    progress: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("T", _check_int("T (number of MC samples)", self.T, 1))
        if self.method not in METRICS:
            hint = " (use fastbald.acquire(..., method='random'))" if self.method == "random" else ""
            raise ValueError(f"method must be one of {METRICS}, got {self.method!r}{hint}")
        if self.k is not None:
            put("k", _check_int("k", self.k, 0))
        put("batch_size", _check_int("batch_size", self.batch_size, 1))
        put("block_size", _check_int("block_size", self.block_size, 1))
        put("num_workers", _check_int("num_workers", self.num_workers, 0))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        put("seed", int(self.seed))
        put("consistent", bool(self.consistent))
        names = parse_metrics(self.metrics, default=(self.method,))
        put("metrics", names if self.method in names else parse_metrics((*names, self.method)))
        if self.amp is True:
            put("amp", torch.bfloat16)
        elif self.amp is False or self.amp is None:
            put("amp", None)
        elif not isinstance(self.amp, torch.dtype):
            raise TypeError(f"amp must be a bool or a torch.dtype, got {self.amp!r}")

    def shared_key(self) -> tuple:
        """The settings every rank of a sharded call must share (they fix the result)."""
        return (self.T, self.seed, self.consistent, self.block_size, self.method, self.k,
                tuple(self.metrics))


# ------------------------------------------------------------------------------------------------
# score_pool, piece 2: the model
# ------------------------------------------------------------------------------------------------
def _model_device(mc: MCDropout) -> torch.device:
    for m in (mc.trunk, mc.head):
        if m is None:
            continue
        for p in m.parameters():
            return p.device
        for b in m.buffers():
            return b.device
    return torch.device("cpu")


def _prepare_model(
    model: nn.Module | tuple[nn.Module, nn.Module],
    cfg: PoolScoringConfig,
    trunk_head: bool | tuple[nn.Module, nn.Module] | None,
    device: str | torch.device | None,
) -> tuple[MCDropout, torch.device]:
    """The MC-dropout wrapper of ``model`` (trunk/head split, masks of ``cfg.seed``) and the
    compute device: ``device``, or the model's; the model is moved there when they differ."""
    sample = getattr(model, "mc_dropout", True) is not False if isinstance(model, nn.Module) else True
    mc = MCDropout(
        model, cfg.T, seed=cfg.seed, consistent=cfg.consistent, trunk_head=trunk_head,
        max_rows=cfg.max_rows, sample=sample,
    )
    dev = torch.device(device) if device is not None else _model_device(mc)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if _model_device(mc) != dev:
        for m in (mc.trunk, mc.head):
            if m is not None:
                m.to(dev)
    return mc, dev


# ------------------------------------------------------------------------------------------------
# score_pool, piece 3: the streaming loop over this rank's blocks
# ------------------------------------------------------------------------------------------------
@dataclass
class _LocalScores:
    """What one rank scored."""

    scores: torch.Tensor | None  # [len(metrics), this rank's items] in pool order; None: none
    topk: RunningTopK | None  # running top-k of this rank's items (None without k)
    seen: int  # items the stream held (every item of the pool when the stream is not sharded)


def _first_bad_logits(lg: torch.Tensor) -> tuple[int, int] | None:
    """(item, sample) of the first row of logits [b, T, C] with NaN, +inf or only -inf."""
    bad = (torch.isnan(lg) | (lg == math.inf)).any(-1) | (lg == -math.inf).all(-1)  # [b, T]
    if not bool(bad.any()):
        return None
    i, t = (int(v) for v in bad.nonzero()[0])
    return i, t


def _block_scores(lg: torch.Tensor, names: list[str], start: int, block_no: int) -> torch.Tensor:
    """[len(names), b] fused scores of one block's logits [b, T, C], on the CPU. The scoring op
    checks the logits (its check is the only pass over them for that); a bad item is then named
    by its pool index."""
    try:
        ps = _scores(lg, metrics=names, check_finite=True)
    except ValueError as e:
        where = _first_bad_logits(lg)
        if where is None:
            raise
        i, t = where
        raise ValueError(
            f"the model returned NaN, +inf or all -inf logits for pool item {start + i} "
            f"(MC sample {t}, compute block {block_no}: items {start}..{start + lg.shape[0] - 1}); "
            "has the model diverged?"
        ) from e
    return torch.stack([getattr(ps, m) for m in names]).cpu()


def _score_blocks(
    mc: MCDropout, src: _Source, cfg: PoolScoringConfig, dev: torch.device, rank: int, world: int
) -> _LocalScores:
    """Stream the pool through the model: for each block this rank owns, T stochastic forwards,
    the fused scores and the running top-k. Raises ValueError / TypeError (naming the block and
    its items) for a malformed pool or model output."""
    names = list(cfg.metrics)
    block_size = cfg.block_size
    # Blocks this rank computes: (block number, start, size); sizes drive the re-chunking.
    # Positional: the stream holds exactly this rank's blocks. Otherwise (unknown length, or a
    # loader that cannot be re-sharded) it holds every item and blocks are numbered as they come.
    positional = src.positional
    if positional:
        owned = _owned_blocks(src.n, block_size, rank, world)  # type: ignore[arg-type]
        sizes: Iterable[int] = [e - s for s, e in owned]
    else:
        owned = []
        sizes = repeat(block_size)

    topk = RunningTopK(cfg.k) if cfg.k is not None else None
    local_n = sum(e - s for s, e in owned) if positional else (src.n or 1 << 16)
    scored = _ScoreBuffer(len(names), local_n)  # [n_metrics, items of this rank] in order
    n_classes: int | None = None
    seen = 0  # items of the stream (all items in skip mode)
    n_local = 0

    def autocast() -> Any:
        if cfg.amp is None:
            return nullcontext()
        return torch.autocast(device_type=dev.type, dtype=cfg.amp)  # type: ignore[arg-type]

    total = sum(e - s for s, e in owned) if owned else (src.n if world == 1 else None)
    bar = _progress_bar(total=total, T=cfg.T, enabled=cfg.progress and rank == 0)
    stream = _rechunk(src.batches, sizes, dev, non_blocking=dev.type == "cuda")
    try:
        with mc:
            for j, xb in enumerate(stream):
                b = xb.shape[0]
                if not positional:
                    start, block_no = seen, j
                    seen += b
                    if block_no % world != rank:
                        continue
                else:
                    start, block_no = owned[j][0], owned[j][0] // block_size
                    seen += b
                    if b != owned[j][1] - owned[j][0]:
                        raise ValueError(
                            f"the pool yielded {seen} items but has {src.n} "
                            "(a DataLoader with drop_last=True?)"
                        )
                try:
                    with autocast():
                        idx = torch.arange(start, start + b)
                        lg = mc(xb, idx)
                except (ValueError, TypeError) as e:
                    if type(e) not in (ValueError, TypeError):
                        raise
                    raise type(e)(
                        f"{e} [compute block {block_no}: pool items {start}..{start + b - 1}]"
                    ) from e
                if n_classes is None:
                    n_classes = int(lg.shape[-1])
                    if n_classes < 1:
                        raise ValueError("the model returned logits with 0 classes")
                elif lg.shape[-1] != n_classes:
                    raise ValueError(
                        f"the model returned {lg.shape[-1]} classes for compute block {block_no} "
                        f"(pool items {start}..{start + b - 1}) but {n_classes} before"
                    )
                vals = _block_scores(lg, names, start, block_no)
                scored.append(vals)
                if topk is not None:
                    topk.update(ranking_key(vals[names.index(cfg.method)], cfg.method), idx)
                n_local += b
                bar.update(b)
        if positional and n_local != sum(sizes):  # type: ignore[arg-type]
            raise ValueError(
                f"the pool yielded fewer items than its length {src.n} "
                "(a DataLoader with drop_last=True?)"
            )
        if not positional and src.n is not None and seen != src.n:
            raise ValueError(
                f"the pool yielded {seen} items but has {src.n} (a DataLoader with drop_last=True?)"
            )
    finally:
        bar.close()
        stream.close()  # shuts the DataLoader's workers down, also on Ctrl-C
    return _LocalScores(scored.result(), topk, seen)


# ------------------------------------------------------------------------------------------------
# score_pool, piece 4: every rank's scores in pool order
# ------------------------------------------------------------------------------------------------
def _check_ranks(err: BaseException | None, local: _LocalScores | None, src: _Source, group: Any) -> None:
    """Sharded calls: every rank learns whether any failed (and raises: its own error, or a
    RuntimeError naming the rank that failed), and that all streams had the same length."""
    msg = None if err is None else f"{type(err).__name__}: {err}"
    count = None if (src.positional or local is None) else local.seen
    states = _dist.all_gather_objects((msg, count), group)
    if err is not None:
        raise err
    bad = [(r, m) for r, (m, _) in enumerate(states) if m is not None]
    if bad:
        r, m = bad[0]
        raise RuntimeError(f"score_pool failed on rank {r}: {m}")
    counts = {c for _, c in states}
    if len(counts) > 1:
        raise RuntimeError(
            "the ranks' pool streams had different lengths "
            f"({[c for _, c in states]}): every rank must iterate the same pool"
        )


def _gather_scores(
    local: torch.Tensor | None, n_metrics: int, n_total: int, block_size: int, sharded: bool,
    world: int, dev: torch.device, group: Any,
) -> torch.Tensor:
    """[n_metrics, N] scores of the whole pool in pool order: this process' own, or every rank's
    blocks put back in place (block b came from rank b % world)."""
    dtype = local.dtype if local is not None else torch.float32
    if not sharded:
        assert local is not None and local.shape[1] == n_total
        return local
    if local is None:
        local = torch.empty(n_metrics, 0)
    cdev = _dist.comm_device(dev, group)
    dtypes = _dist.all_gather_objects(str(dtype) if local.shape[1] else None, group)
    dt = next((d for d in dtypes if d is not None), str(dtype))
    dtype = getattr(torch, dt.split(".")[-1])
    full = torch.empty(n_metrics, n_total, dtype=dtype)
    gathered = _dist.all_gather_varlen(local.to(dtype), group, cdev)
    for r, g in enumerate(gathered):
        pos = 0
        for s, e in _owned_blocks(n_total, block_size, r, world):
            full[:, s:e] = g[:, pos : pos + e - s]
            pos += e - s
        if pos != g.shape[1]:
            raise RuntimeError(f"rank {r} sent {g.shape[1]} scores, expected {pos}")
    return full


def _gather_topk(
    topk: RunningTopK, k: int, dtype: torch.dtype, sharded: bool, dev: torch.device, group: Any
) -> torch.Tensor:
    """Global indices of the k best items, best first: this process' running top-k, or the
    merge of every rank's."""
    keys, idx = topk.keys, topk.idx
    if sharded:
        cdev = _dist.comm_device(dev, group)
        kk = _dist.all_gather_varlen(keys.to(dtype).reshape(1, -1), group, cdev)
        ii = _dist.all_gather_varlen(idx.reshape(1, -1), group, cdev)
        keys = torch.cat([t[0] for t in kk])
        idx = torch.cat([t[0] for t in ii])
        idx = idx[_order(keys, idx)[:k]]
    return idx.clone()


# ------------------------------------------------------------------------------------------------
# score_pool
# ------------------------------------------------------------------------------------------------
def score_pool(
    model: nn.Module | tuple[nn.Module, nn.Module],
    pool: Any,
    *,
    T: int = 20,
    method: str = "bald",
    k: int | None = None,
    batch_size: int = DEFAULT_BLOCK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
    seed: int = 0,
    consistent: bool = True,
    metrics: Sequence[str] | str | None = None,
    trunk_head: bool | tuple[nn.Module, nn.Module] | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    amp: bool | torch.dtype = False,
    max_rows: int = DEFAULT_MAX_ROWS,
    progress: bool = True,
    distributed: bool | None = None,
    group: Any = None,
    out: str | os.PathLike[str] | None = None,
) -> PoolResult:
    """Score every item of a pool with MC dropout, streaming, and optionally pick the top k.

    For each block of ``block_size`` items: T stochastic forward passes (trunk once and head T
    times when the model splits, see :func:`fastbald.mc.mc_logits`), the fused scores of
    :func:`fastbald.scores`, and a running top-k merge. Memory stays flat in N: only one block's
    ``[block_size, T, C]`` logits and the ``[N]`` score vectors are ever held.

    Args:
        model: a module returning logits ``[batch, C]``, or a ``(trunk, head)`` pair. Put on
            ``device`` (moved in place if ``device`` is given and differs). Its train/eval flags
            are restored afterwards.
        pool: a tensor ``[N, ...]``, a map-style Dataset (items ``x`` or ``(x, y, ...)``), an
            IterableDataset or a DataLoader (not shuffling: items are matched by position).
        T: MC samples per item (>= 1).
        method: the metric in ``.scores`` and the top-k (one of ``fastbald.METRICS``).
        k: also return the indices of the k best items (``0 <= k <= N``).
        batch_size: items per DataLoader batch (loading only: does not change the results).
        block_size: items per forward block; with ``seed`` and ``T`` it fixes the scores bit for
            bit (batch size, workers and ranks do not).
        device: compute device (default: the model's).
        seed: seed of the dropout masks.
        consistent: the same T masks for every item (default), or independent per-item masks
            seeded by the item's global index.
        metrics: extra metrics to keep in ``.metrics`` (names, or ``"all"``).
        trunk_head: ``None`` (auto-detect ``model.split()``), ``False`` (T full passes) or a
            ``(trunk, head)`` pair.
        num_workers, pin_memory, prefetch_factor: DataLoader settings when fastbald builds the
            loader (Dataset pools). ``pin_memory`` defaults to True on CUDA; copies to the device
            are non-blocking.
        amp: ``True`` (bfloat16) or a dtype: run the model under ``torch.autocast``.
        max_rows: at most this many activation rows (items x T) per forward of the stochastic
            part (memory bound).
        progress: show a tqdm bar with images/s (rank 0 only).
        distributed: shard over torch.distributed ranks (``None``: when a process group with
            more than one rank is initialised). Every rank gets the same global result.
        group: the process group (default: the world).
        out: also save the result there, atomically (rank 0 only).

    Returns:
        :class:`PoolResult`. Raises ValueError for an empty pool, ``k > N``, ``T < 1``, a model
        returning the wrong shape, or NaN/inf logits (naming the pool item and block);
        warns (RuntimeWarning) when the model has no dropout layer. The settings are checked by
        :class:`PoolScoringConfig` before anything runs.
    """
    t0 = time.perf_counter()
    cfg = PoolScoringConfig(
        T=T, method=method, k=k, metrics=metrics, batch_size=batch_size, block_size=block_size,
        seed=seed, consistent=consistent, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor, amp=amp, max_rows=max_rows, progress=progress,
    )
    sharded = _dist.use_distributed(distributed, group)
    rank, world = _dist.rank_world(group) if sharded else (0, 1)
    mc, dev = _prepare_model(model, cfg, trunk_head, device)
    src = _make_source(
        pool, batch_size=cfg.batch_size, block=cfg.block_size, rank=rank, world=world,
        num_workers=cfg.num_workers,
        pin_memory=(dev.type == "cuda") if cfg.pin_memory is None else bool(cfg.pin_memory),
        prefetch_factor=cfg.prefetch_factor,
    )
    if sharded:  # every rank must score the same pool the same way
        cfgs = _dist.all_gather_objects((*cfg.shared_key(), src.n), group)
        if any(c != cfgs[0] for c in cfgs):
            raise ValueError(
                "score_pool was called with different settings or pool sizes on different ranks "
                "(T, seed, consistent, block_size, method, k, metrics, N): "
                + "; ".join(f"rank {r}: {c}" for r, c in enumerate(cfgs))
            )
    if src.n == 0:
        raise ValueError("the pool is empty (0 items): nothing to score")
    if cfg.k is not None and src.n is not None and cfg.k > src.n:
        raise ValueError(f"k={cfg.k} is larger than the pool (N={src.n})")

    err: BaseException | None = None
    local: _LocalScores | None = None
    try:
        local = _score_blocks(mc, src, cfg, dev, rank, world)
    except Exception as e:  # noqa: BLE001 - re-raised by _check_ranks (after telling the other ranks)
        if not sharded:
            raise
        err = e
    if sharded:
        _check_ranks(err, local, src, group)
    assert local is not None
    n_total = src.n if src.n is not None else local.seen
    if n_total == 0:
        raise ValueError("the pool is empty (0 items): nothing to score")
    if cfg.k is not None and cfg.k > n_total:
        raise ValueError(f"k={cfg.k} is larger than the pool (N={n_total})")

    full = _gather_scores(local.scores, len(cfg.metrics), n_total, cfg.block_size, sharded, world,
                          dev, group)
    result_metrics = {m: full[i] for i, m in enumerate(cfg.metrics)}
    scores_n = result_metrics[cfg.method]
    top: torch.Tensor | None = None
    top_scores: torch.Tensor | None = None
    if local.topk is not None:
        top = _gather_topk(local.topk, cfg.k, full.dtype, sharded, dev, group)  # type: ignore[arg-type]
        top_scores = scores_n[top]
    result = PoolResult(
        scores=scores_n,
        topk=top,
        topk_scores=top_scores,
        method=cfg.method,
        metrics=result_metrics,
        T=cfg.T,
        seed=cfg.seed,
        consistent=cfg.consistent,
        block_size=cfg.block_size,
        world_size=world,
        elapsed_s=time.perf_counter() - t0,
    )
    if out is not None and rank == 0:
        result.save(out)
    return result


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, T: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, unit="img", unit_scale=True, desc=f"fastbald: scoring (T={T})",
                smoothing=0.1, dynamic_ncols=True)
