"""Monte-Carlo dropout at inference: T stochastic predictions per pool item.

Only the dropout layers sample; every other layer (BatchNorm included) runs in eval mode. The
dropout masks are drawn by fastbald, not by torch's global RNG, so that they are reproducible:

* consistent masks (the default): the mask of MC sample ``t`` in dropout layer ``l`` depends only
  on ``(seed, l, t)`` and the layer's per-item feature shape, so every pool item sees the same T
  masks ("consistent MC dropout", which BatchBALD-style joint scores need), whatever the batch it
  is in;
* independent masks (``consistent=False``): the mask of item ``n`` depends only on
  ``(seed, l, n, t)``, with ``n`` the item's *global* index in the pool (``indices``), so the
  masks do not change with the batch size, the chunking or the number of ranks either.

When every dropout layer sits in a head after a deterministic trunk (as in the paper's CNN) the
trunk runs once per item and only the head runs T times: ``head(trunk(x))`` with the same masks
equals the full model's T passes.

A dropout layer's mask is applied as ``x * keep / (1 - p)`` (torch's own scaling), with
``keep ~ Bernoulli(1 - p)`` elementwise for ``nn.Dropout`` and per channel for
``nn.Dropout1d/2d/3d``. Dropout called functionally inside ``forward`` (``F.dropout(x,
training=self.training)``) cannot be intercepted and is off (eval mode): use dropout modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "DROPOUT_TYPES",
    "MCDropout",
    "dropout_modules",
    "mc_dropout",
    "mc_logits",
    "mix_seed",
    "resolve_split",
]

#: Dropout modules that fastbald samples (elementwise and channel-wise).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED: tuple[type[nn.Module], ...] = (nn.AlphaDropout, nn.FeatureAlphaDropout)
# Feature dims of the input (after the batch dim) each channel-wise dropout expects.
_CHANNEL_DIMS: dict[type[nn.Module], int] = {nn.Dropout1d: 2, nn.Dropout2d: 3, nn.Dropout3d: 4}

_M64 = (1 << 64) - 1
# Rows of activations one forward call may see in the stochastic part (items x T): bounds memory.
DEFAULT_MAX_ROWS = 4096


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every integer of ``parts`` (SplitMix64 chain)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _M64))
    return h >> 1


def dropout_modules(*modules: nn.Module | None) -> list[nn.Module]:
    """The dropout layers of ``modules`` in ``.modules()`` order (each once), which fixes their
    ordinal ``l`` in the mask seeds. Raises for dropout variants fastbald cannot sample."""
    seen: set[int] = set()
    out: list[nn.Module] = []
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, _UNSUPPORTED):
                raise TypeError(
                    f"{type(m).__name__} is not supported by fastbald's MC dropout "
                    "(use nn.Dropout, nn.Dropout1d, nn.Dropout2d or nn.Dropout3d)"
                )
            if isinstance(m, DROPOUT_TYPES):
                out.append(m)
    return out


def resolve_split(
    model: nn.Module | tuple[nn.Module, nn.Module] | None,
    trunk_head: bool | tuple[nn.Module, nn.Module] | None = None,
) -> tuple[nn.Module | None, nn.Module]:
    """Decide how to run ``model``: ``(trunk, head)`` (trunk once, head T times) or
    ``(None, model)`` (T full passes).

    Args:
        model: a module, or a ``(trunk, head)`` pair.
        trunk_head: ``None`` (auto: an explicit pair, else ``model.split()``, else
            ``model.trunk``/``model.head``, else full passes), ``True`` (require a split),
            ``False`` (force T full passes, e.g. for benchmarks) or an explicit pair.

    An explicit split whose trunk contains dropout raises ValueError (the trunk would not be
    deterministic); an auto-detected one falls back to full passes with a warning.
    """
    explicit = False
    pair: tuple[nn.Module, nn.Module] | None = None
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise ValueError("model given as a sequence must be a (trunk, head) pair")
        pair, explicit = (model[0], model[1]), True
    if isinstance(trunk_head, (tuple, list)):
        if len(trunk_head) != 2:
            raise ValueError("trunk_head must be a (trunk, head) pair, a bool or None")
        pair, explicit = (trunk_head[0], trunk_head[1]), True
    elif trunk_head is not None and not isinstance(trunk_head, bool):
        raise TypeError(f"trunk_head must be a (trunk, head) pair, a bool or None, got {trunk_head!r}")
    if trunk_head is False:
        if pair is not None and model is not None and isinstance(model, nn.Module):
            return None, model
        if pair is not None:  # only a pair given: run it as one sequential model
            return None, nn.Sequential(pair[0], pair[1])
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        return None, model
    if pair is None and isinstance(model, nn.Module):
        split = getattr(model, "split", None)
        if callable(split):
            got = split()
            if isinstance(got, (tuple, list)) and len(got) == 2:
                pair = (got[0], got[1])
        if pair is None:
            t, h = getattr(model, "trunk", None), getattr(model, "head", None)
            if isinstance(t, nn.Module) and isinstance(h, nn.Module):
                pair = (t, h)
        explicit = trunk_head is True
    if pair is None:
        if trunk_head is True:
            raise ValueError(
                "trunk_head=True but the model exposes no split(): pass trunk_head=(trunk, head)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        return None, model
    trunk, head = pair
    for name, m in (("trunk", trunk), ("head", head)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    if dropout_modules(trunk):
        msg = (
            "the trunk contains dropout layers, so it is not deterministic and cannot run once "
            "per item; put every dropout layer in the head"
        )
        if explicit:
            raise ValueError(msg)
        warnings.warn(msg + " (running T full passes instead)", RuntimeWarning, stacklevel=3)
        if not isinstance(model, nn.Module):
            return None, nn.Sequential(trunk, head)
        return None, model
    return trunk, head


class MCDropout:
    """MC-dropout inference engine: holds the split, the seeds and the mask cache.

    Use as a context manager (it puts the model in eval mode and hooks its dropout layers; both
    are undone on exit, also on errors and Ctrl-C) and call it on batches::

        with MCDropout(model, T=20, seed=0) as mc:
            logits_B_T_C = mc(x_B, indices=global_index_B)

    Args:
        model: an ``nn.Module`` or a ``(trunk, head)`` pair.
        T: number of MC samples (>= 1).
        seed: base seed of the masks; ``None`` draws one from torch's global RNG.
        consistent: same T masks for every item (default) or independent masks per item.
        trunk_head: see :func:`resolve_split`.
        max_rows: at most this many activation rows (items x T) per forward call of the
            stochastic part; bounds memory and does not change the results' meaning.
        sample: if False, dropout is off (a deterministic model): one pass, repeated T times.
    """

    def __init__(
        self,
        model: nn.Module | tuple[nn.Module, nn.Module],
        T: int,
        *,
        seed: int | None = None,
        consistent: bool = True,
        trunk_head: bool | tuple[nn.Module, nn.Module] | None = None,
        max_rows: int = DEFAULT_MAX_ROWS,
        sample: bool = True,
    ) -> None:
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T (number of MC samples) must be an integer >= 1, got {T!r}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.T = T
        self.seed = seed
        self.consistent = bool(consistent)
        self.max_rows = max_rows
        self.trunk, self.head = resolve_split(model, trunk_head)
        self._root = model if isinstance(model, nn.Module) else None
        self.dropouts = dropout_modules(self.trunk, self.head)
        self.sample = bool(sample) and bool(self.dropouts)
        if sample and not self.dropouts:
            warnings.warn(
                "fastbald: the model has no dropout layer (nn.Dropout/1d/2d/3d): its T MC samples "
                "are identical and BALD is identically 0",
                RuntimeWarning,
                stacklevel=2,
            )
        self._ordinal = {id(m): i for i, m in enumerate(self.dropouts)}
        self._calls: dict[int, int] = {}
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._gen = torch.Generator(device="cpu")
        self._items = 0
        self._indices: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._active = False
        # Fast path: a Sequential head that starts with dropout gets its first mask applied by a
        # broadcast multiply (no T-fold copy of the features first); bit-identical to the hook.
        self._head_first: nn.Module | None = None
        if (
            self.trunk is not None
            and isinstance(self.head, nn.Sequential)
            and len(self.head) > 0
            and isinstance(self.head[0], DROPOUT_TYPES)
        ):
            self._head_first = self.head[0]

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> MCDropout:
        if self._active:
            raise RuntimeError("this MCDropout is already active")
        roots = [m for m in (self._root, self.trunk, self.head) if m is not None]
        seen: set[int] = set()
        for root in roots:
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    self._modes.append((m, m.training))
        try:
            for root in roots:
                root.eval()
            if self.sample:
                for m in self.dropouts:
                    self._hooks.append(m.register_forward_hook(self._hook))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m, mode in self._modes:
            m.training = mode
        self._modes.clear()
        self._active = False

    # -- masks ---------------------------------------------------------------------------------
    def _mask_shape(self, m: nn.Module, feat: Sequence[int]) -> tuple[int, ...]:
        for kind, dims in _CHANNEL_DIMS.items():
            if isinstance(m, kind):
                if len(feat) != dims:
                    raise ValueError(
                        f"{type(m).__name__} (dropout layer {self._ordinal[id(m)]}) expects "
                        f"batched inputs with {dims} feature dims, got per-item shape {tuple(feat)}"
                    )
                return (int(feat[0]),) + (1,) * (dims - 1)
        return tuple(int(s) for s in feat)

    def _keep(self, key: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
        self._gen.manual_seed(key)
        return torch.rand(shape, generator=self._gen) >= p

    def mask(
        self,
        m: nn.Module,
        call: int,
        feat: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """Scaled mask ``keep / (1 - p)`` of dropout layer ``m``'s ``call``-th call in a forward:
        ``[1, T, *mask_shape]`` (consistent) or ``[B, T, *mask_shape]`` (independent)."""
        p = float(m.p)
        mshape = self._mask_shape(m, feat)
        layer = self._ordinal[id(m)]
        if self.consistent:
            ck = (layer, call, mshape, dtype, device)
            cached = self._cache.get(ck)
            if cached is not None:
                return cached
            keep = torch.stack(
                [self._keep(mix_seed(self.seed, 0, layer, call, t), mshape, p) for t in range(self.T)]
            ).unsqueeze(0)
        else:
            assert self._indices is not None
            keep = torch.stack(
                [
                    self._keep(mix_seed(self.seed, 1, layer, call, n), (self.T, *mshape), p)
                    for n in self._indices.tolist()
                ]
            )
        if p >= 1.0:
            scaled = torch.zeros(keep.shape, dtype=dtype)
        else:
            scaled = keep.to(dtype).div_(1.0 - p)
        scaled = scaled.to(device, non_blocking=True)
        if self.consistent:
            self._cache[ck] = scaled
        return scaled

    def _next_call(self, m: nn.Module) -> int:
        c = self._calls.get(id(m), 0)
        self._calls[id(m)] = c + 1
        return c

    def _hook(self, m: nn.Module, inputs: tuple[Any, ...], output: Any) -> torch.Tensor:
        x = inputs[0]
        B, T = self._items, self.T
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != B * T:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"dropout layer {self._ordinal[id(m)]} ({type(m).__name__}) got input {got}, "
                f"expected a batch-first tensor of {B} items x T={T} = {B * T} rows"
            )
        call = self._next_call(m)
        if float(m.p) == 0.0:
            return x
        feat = tuple(x.shape[1:])
        mk = self.mask(m, call, feat, x.dtype, x.device)
        return (x.reshape(B, T, *feat) * mk).reshape(B * T, *feat)

    # -- forward -------------------------------------------------------------------------------
    def _check_out(self, out: Any, rows: int, items: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model must return a logits tensor [batch, classes], got {type(out).__name__}"
            )
        if out.dim() != 2 or out.shape[0] != rows:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a batch of {rows} inputs "
                f"({items} items x T={self.T} samples); expected logits [{rows}, C]"
            )
        return out

    def _stochastic(self, feats: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """T passes of ``head`` over ``feats`` [b, ...] -> [b, T, C] (hooks sample the masks)."""
        b, T = feats.shape[0], self.T
        self._items = b
        self._calls.clear()
        first = self._head_first if head is self.head else None
        if first is not None and self.sample:
            feat = tuple(feats.shape[1:])
            mk = self.mask(first, self._next_call(first), feat, feats.dtype, feats.device)
            h = (feats.unsqueeze(1) * mk).reshape(b * T, *feat)
            for layer in list(self.head)[1:]:
                h = layer(h)
            out = h
        else:
            out = head(feats.repeat_interleave(T, dim=0))
        return self._check_out(out, b * T, b).reshape(b, T, -1)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, C]`` of the batch ``x`` [B, ...].

        Args:
            x: a batch of inputs (batch-first).
            indices: global pool index of each item [B] (for independent masks; default
                ``0..B-1``). Ignored with consistent masks.
        """
        if not self._active:
            with self:
                return self(x, indices)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
        B = x.shape[0] if x.dim() > 0 else 0
        if x.dim() == 0:
            raise ValueError("x must be a batch [B, ...], got a scalar")
        if indices is None:
            indices = torch.arange(B)
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu().reshape(-1)
        if indices.numel() != B:
            raise ValueError(f"indices has {indices.numel()} entries for a batch of {B} items")
        with torch.no_grad():
            if not self.sample:  # deterministic: one pass, repeated T times
                self._items = B
                model = self.head if self.trunk is None else nn.Sequential(self.trunk, self.head)
                out = self._check_out(model(x), B, B) if B else None
                if out is None:
                    return x.new_empty((0, self.T, 0))
                return out.unsqueeze(1).expand(B, self.T, out.shape[1])
            # Sub-batches of equal size (e.g. 128 + 128, not 204 + 52): fewer distinct
            # allocation sizes, less heap fragmentation over a long run.
            parts = -(-B * self.T // self.max_rows)
            step = max(1, -(-B // max(1, parts)))
            pieces: list[torch.Tensor] = []
            for s in range(0, B, step):
                xs, idx = x[s : s + step], indices[s : s + step]
                self._indices = idx
                if self.trunk is None:
                    pieces.append(self._stochastic(xs, self.head))
                else:
                    feats = self.trunk(xs)
                    if not isinstance(feats, torch.Tensor) or feats.shape[0] != xs.shape[0]:
                        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                        raise ValueError(
                            f"the trunk returned {got} for a batch of {xs.shape[0]} items; "
                            "expected a batch-first feature tensor"
                        )
                    pieces.append(self._stochastic(feats, self.head))
            self._indices = None
            if not pieces:
                return x.new_empty((0, self.T, 0))
            C = pieces[0].shape[-1]
            for p_ in pieces:
                if p_.shape[-1] != C:
                    raise ValueError(f"the model returned {p_.shape[-1]} classes, then {C}")
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@contextmanager
def mc_dropout(
    model: nn.Module | tuple[nn.Module, nn.Module], T: int, **kwargs: Any
) -> Iterator[MCDropout]:
    """``with mc_dropout(model, T, seed=0) as mc: logits = mc(x)`` (see :class:`MCDropout`)."""
    with MCDropout(model, T, **kwargs) as mc:
        yield mc


def mc_logits(
    model: nn.Module | tuple[nn.Module, nn.Module],
    x: torch.Tensor,
    T: int,
    *,
    seed: int | None = None,
    consistent: bool = True,
    trunk_head: bool | tuple[nn.Module, nn.Module] | None = None,
    indices: torch.Tensor | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> torch.Tensor:
    """T MC-dropout logits of every item of the batch ``x``: ``[N, T, C]``.

    Only dropout layers sample (the rest is in eval mode; the model's train/eval flags are
    restored afterwards). With a split (``trunk_head=(trunk, head)``, or a model exposing
    ``split()`` or ``.trunk``/``.head``), the trunk runs once per item and the head T times.

    Args:
        model: an ``nn.Module`` returning logits ``[batch, C]``, or a ``(trunk, head)`` pair.
        x: input batch ``[N, ...]`` on the model's device.
        T: number of MC samples (>= 1).
        seed: mask seed; the same seed gives bit-identical masks. ``None``: drawn from torch's
            global RNG (so ``torch.manual_seed`` makes it reproducible too).
        consistent: the same T masks for every item (default) or independent masks per item,
            seeded by the item's global index (``indices``).
        trunk_head: ``None`` (auto), ``True``, ``False`` (force T full passes) or a pair.
        indices: global pool index of each row of ``x`` (default ``0..N-1``).
        max_rows: activation rows per forward call of the stochastic part (memory bound).

    Warns (RuntimeWarning) when the model has no dropout layer: BALD is then identically 0.
    """
    with MCDropout(
        model, T, seed=seed, consistent=consistent, trunk_head=trunk_head, max_rows=max_rows
    ) as mc:
        return mc(x, indices)

