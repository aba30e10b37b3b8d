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

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "DROPOUT_TYPES",
    "FUSED_MAX_ITEMS",
    "FusedMLPHead",
    "MCDropout",
    "dropout_modules",
    "match_mlp_head",
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
#: Items per forward call of the generic (unfused) path, at most ``max_rows // T``.
GENERIC_ITEMS = 16
#: Items per GEMM of the fused head (bounds its temporaries to about ``T * (hidden + C)`` floats
#: per item; the values do not depend on it).
FUSED_MAX_ITEMS = 1024
#: Items per trunk call on the fused path (small blocks keep the convolutions' temporaries in
#: cache: 1.2-1.8x faster than one call on 256 images on this project's CPU). The last call is
#: padded to this size with copies of its last item, so that a trunk whose rounding depends on
#: the number of rows (BLAS) gives each item the same features whatever the batch.
TRUNK_ITEMS = 64


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


def _pair(got: Any, what: str) -> tuple[nn.Module, nn.Module]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ValueError(f"{what} must be a (trunk, head) pair, got {got!r}")
    for name, m in zip(("trunk", "head"), got, strict=True):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what}: the {name} must be an nn.Module, got {type(m).__name__}")
    return got[0], got[1]


def resolve_split(
    model: nn.Module | tuple[nn.Module, nn.Module],
    trunk_head: bool | tuple[nn.Module, nn.Module] | None = None,
) -> tuple[nn.Module | None, nn.Module]:
    """Decide how to run ``model``: ``(trunk, head)`` (trunk once, head T times) or
    ``(None, model)`` (T full passes).

    Args:
        model: an ``nn.Module``, or an explicit ``(trunk, head)`` pair of modules.
        trunk_head: ``None`` (auto: the explicit pair, else the pair returned by the module's
            ``split()`` method if it has one, else T full passes), ``True`` (a split is
            required), ``False`` (T full passes, e.g. for benchmarks), or an explicit
            ``(trunk, head)`` pair (the same as passing the pair as ``model``).

    Nothing else is inferred: attributes named ``trunk``/``head`` are not looked at. An explicit
    split (a pair, or ``trunk_head=True``) whose trunk contains dropout raises ValueError (the
    trunk would not be deterministic); a ``split()`` found automatically falls back to T full
    passes with a warning.
    """
    pair: tuple[nn.Module, nn.Module] | None = None
    if isinstance(trunk_head, (tuple, list)):
        if isinstance(model, (tuple, list)):
            raise ValueError("give the (trunk, head) pair once: as model or as trunk_head")
        pair = _pair(trunk_head, "trunk_head")
    elif trunk_head is not None and not isinstance(trunk_head, bool):
        raise TypeError(f"trunk_head must be a (trunk, head) pair, a bool or None, got {trunk_head!r}")
    if isinstance(model, (tuple, list)):
        pair = _pair(model, "model")
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a (trunk, head) pair, got {type(model).__name__}")
    explicit = pair is not None or trunk_head is True
    if trunk_head is False:
        if isinstance(model, nn.Module):
            return None, model
        assert pair is not None
        return None, nn.Sequential(*pair)  # only a pair given: run it as one model
    if pair is None:
        split = getattr(model, "split", None)
        got = split() if callable(split) else None
        if (
            isinstance(got, (tuple, list))
            and len(got) == 2
            and all(isinstance(m, nn.Module) for m in got)
        ):
            pair = (got[0], got[1])
    if pair is None:
        if trunk_head is True:
            raise ValueError(
                "trunk_head=True but the model exposes no split(): pass trunk_head=(trunk, head)"
            )
        return None, model  # type: ignore[return-value]
    trunk, head = pair
    if dropout_modules(trunk):
        msg = (
            "the trunk contains dropout layers, so it is not deterministic and cannot run once "
            "per item; put every dropout layer in the head"
        )
        if explicit:
            raise ValueError(msg)
        warnings.warn(msg + " (running T full passes instead)", RuntimeWarning, stacklevel=3)
        return None, model  # type: ignore[return-value]
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
        fused: with consistent masks on the CPU and a head of the paper's form (see
            :func:`match_mlp_head`), run the T head passes as a few GEMMs with the masks folded
            into the weights (:class:`FusedMLPHead`; up to :data:`FUSED_MAX_ITEMS` items per
            GEMM, ``max_rows`` does not apply). False: T masked passes through the head's
            modules. Same function, different float32 rounding.

    Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the trunk runs in bf16 (autocast) and
    the fused head's T gathered GEMMs take bf16 inputs (float32 accumulation and output).
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
        fused: bool = True,
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
        self._fused_parts = (
            match_mlp_head(self.head)
            if fused and self.consistent and self.sample and self.trunk is not None
            else None
        )
        self._fused: FusedMLPHead | None = None
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

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the fused head for the input ``x``, or None (generic path)."""
        if self._fused_parts is None or x.device.type != "cpu":
            return None
        fc1 = self._fused_parts[1]
        if fc1.weight.dtype != torch.float32 or fc1.weight.device.type != "cpu":
            return None
        if torch.is_autocast_enabled("cpu"):
            return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
        return torch.float32

    def _run_fused(self, feats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        assert self._fused_parts is not None
        feat = tuple(int(s) for s in feats.shape[1:])
        key = _fused_key(self._fused_parts, feat, dtype)
        if self._fused is None or self._fused.key != key or not self._fused.unchanged():
            self._fused = None  # free the old one first
            self._fused = FusedMLPHead(self, self._fused_parts, feat, dtype)
        return self._fused(feats)

    def _trunk(self, x: torch.Tensor, chunked: bool) -> Any:
        """The trunk's features of ``x``; ``chunked``: calls of exactly :data:`TRUNK_ITEMS` items,
        the last padded with copies of its last item (the convolutions' temporaries stay in
        cache, and a BLAS trunk, whose rounding of a row may depend on the number of rows, gives
        every item the same result whatever the batch, as the generic path's padding does)."""
        assert self.trunk is not None
        if not chunked or x.shape[0] == 0:
            return self.trunk(x)
        outs = []
        for s in range(0, x.shape[0], TRUNK_ITEMS):
            xs = x[s : s + TRUNK_ITEMS]
            real = xs.shape[0]
            if real < TRUNK_ITEMS:
                xs = torch.cat([xs, xs[-1:].expand(TRUNK_ITEMS - real, *xs.shape[1:])])
            f = self.trunk(xs)
            if not isinstance(f, torch.Tensor) or f.dim() < 1 or f.shape[0] != TRUNK_ITEMS:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(
                    f"the trunk returned {got} for a batch of {TRUNK_ITEMS} items; expected a "
                    "batch-first feature tensor"
                )
            outs.append(f[:real])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _stochastic(self, feats: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """T passes of ``head`` over ``feats`` [b, ...] -> [b, T, C] (hooks sample the masks)."""
        b, T = feats.shape[0], self.T
        fdt = self._fused_dtype(feats) if head is self.head else None
        if fdt is not None:
            return self._run_fused(feats, fdt)
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
            # Sub-batches: the fused head takes up to FUSED_MAX_ITEMS items (its GEMMs round each
            # item alike whatever their number); the generic path always runs GENERIC_ITEMS
            # items (the last sub-batch padded with copies of its last item), because a
            # multi-threaded BLAS may round a row differently for another number of rows.
            fused = self._fused_dtype(x) is not None
            if fused:
                parts = -(-B // FUSED_MAX_ITEMS)
                step, pad_to = max(1, -(-B // max(1, parts))), 0
            else:
                step = pad_to = max(1, min(GENERIC_ITEMS, self.max_rows // self.T))
            pieces: list[torch.Tensor] = []
            for s in range(0, B, step):
                xs, idx = x[s : s + step], indices[s : s + step]
                real = xs.shape[0]
                if real < pad_to:
                    fill = pad_to - real
                    xs = torch.cat([xs, xs[-1:].expand(fill, *xs.shape[1:])])
                    idx = torch.cat([idx, idx[-1:].expand(fill)])
                self._indices = idx
                if self.trunk is None:
                    out = self._stochastic(xs, self.head)
                else:
                    feats = self._trunk(xs, fused)
                    if not isinstance(feats, torch.Tensor) or feats.shape[0] != xs.shape[0]:
                        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                        raise ValueError(
                            f"the trunk returned {got} for a batch of {xs.shape[0]} items; "
                            "expected a batch-first feature tensor"
                        )
                    out = self._stochastic(feats, self.head)
                pieces.append(out[:real] if real < out.shape[0] else out)
            self._indices = None
            if not pieces:
                return x.new_empty((0, self.T, 0))
            C = pieces[0].shape[-1]
            for p_ in pieces:
                if p_.shape[-1] != C:
                    raise ValueError(f"the model returned {p_.shape[-1]} classes, then {C}")
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# ------------------------------------------------------------------------------------------------
# Fused MLP head: T consistent-mask passes of Dropout -> [Flatten] -> Linear -> ReLU -> Dropout
# -> Linear as a few GEMMs, with the masks folded into the weights
# ------------------------------------------------------------------------------------------------


def match_mlp_head(head: nn.Module) -> tuple[nn.Dropout, nn.Linear, nn.Dropout, nn.Linear] | None:
    """``(dropout1, fc1, dropout2, fc2)`` when ``head`` is exactly ``nn.Sequential(nn.Dropout,
    [nn.Flatten()], nn.Linear, nn.ReLU, nn.Dropout, nn.Linear)`` (the paper's CNN head) with no
    hooks on its layers, else None. Such a head can run T consistent-mask passes fused
    (:class:`FusedMLPHead`)."""
    if type(head) is not nn.Sequential:
        return None
    layers = list(head)
    if len(layers) == 6:
        flat = layers.pop(1)
        if type(flat) is not nn.Flatten or (flat.start_dim, flat.end_dim) != (1, -1):
            return None
    kinds = (nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear)
    if len(layers) != 5 or any(type(m) is not k for m, k in zip(layers, kinds, strict=True)):
        return None
    for m in head.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    d1, fc1, _, d2, fc2 = layers
    if fc2.in_features != fc1.out_features:
        return None
    return d1, fc1, d2, fc2  # type: ignore[return-value]


def _mkldnn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` through oneDNN (CPU float32: 2-3x MKL's sgemm on AMD CPUs)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _has_mkldnn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


_MKLDNN_LINEAR = _has_mkldnn_linear()


class FusedMLPHead:
    """T passes of a :func:`match_mlp_head` head with *consistent* masks, batched.

    With ``m_t`` the first dropout's keep mask of sample ``t`` (scale ``s = 1/(1-p)``), the dense
    layer's pre-activation is ``s * x[:, K_t] @ W[:, K_t].T + b``. Instead of T masked copies of
    the features (``T x F`` floats per item) it is computed from the *smaller* of the kept and
    dropped sets: for ``p <= 1/2``, ``s * (x @ W.T - x[:, D_t] @ W[:, D_t].T) + b`` with
    ``|D_t| ~ pF``, so one full GEMM per item plus T GEMMs over ``pF`` gathered features: for the
    paper's head (``p = 0.25``) about ``(0.25 + 1/T)`` of the multiply-adds of the masked
    passes. The second dropout mask is folded into the output layer's weights
    (``W2_t = W2 * m2_t``), and the T output GEMMs are batched.

    Numerically it is the same function with a different summation order (float32 differences
    of a few ulp of the pre-activations, see tests/test_mc.py). In float32 each item's result
    does not depend on the other items of the batch or on the batch size (the GEMMs' reduction
    order does not depend on M; a 1-item batch is padded to 2 rows). With ``dtype=bfloat16``
    (``torch.autocast`` on CPU) the T gathered GEMMs run on bf16 inputs with float32
    accumulation (oneDNN's AVX512-BF16 kernels); the full GEMM, the bias, the ReLU and the
    output layer stay float32.
    """

    def __init__(
        self,
        mc: MCDropout,
        parts: tuple[nn.Dropout, nn.Linear, nn.Dropout, nn.Linear],
        feat: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        d1, fc1, d2, fc2 = parts
        T = mc.T
        F = fc1.in_features
        if math.prod(feat) != F:
            raise ValueError(
                f"the head's first dense layer takes {F} features but the trunk returned per-item "
                f"shape {tuple(feat)} ({math.prod(feat)} features)"
            )
        cpu = torch.device("cpu")
        w1 = fc1.weight.detach().to(cpu, torch.float32)  # [H, F]
        b1 = fc1.bias.detach().to(cpu, torch.float32) if fc1.bias is not None else None
        w2 = fc2.weight.detach().to(cpu, torch.float32)  # [C, H]
        b2 = fc2.bias.detach().to(cpu, torch.float32) if fc2.bias is not None else None
        H, C = w1.shape[0], w2.shape[0]
        p1, p2 = float(d1.p), float(d2.p)
        # The masks the generic path draws for these layers (same keys: layer ordinal and call:
        # 0, or 1 for a head that uses ONE dropout module twice, its second call in a forward).
        keep1 = mc.mask(d1, 0, feat, torch.float32, cpu)[0].reshape(T, F) != 0  # [T, F]
        call2 = 1 if d2 is d1 else 0
        m2 = mc.mask(d2, call2, (H,), torch.float32, cpu)[0] if p2 > 0 else torch.ones(T, H)
        s1 = 0.0 if p1 >= 1.0 else 1.0 / (1.0 - p1)
        self.complement = p1 <= 0.5  # gather the dropped features (fewer) instead of the kept
        sel = ~keep1 if self.complement else keep1
        counts = sel.sum(1)
        S = int(counts.max()) if T else 0
        # idx[t]: the selected features of sample t in ascending order, then (padding) others.
        idx = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :S].contiguous()
        sign = -s1 if self.complement else s1
        # The weights' gather reads column F (zeros) where idx pads.
        live = torch.arange(S).unsqueeze(0) < counts.unsqueeze(1)  # [T, S]: not padding
        idx_w = torch.where(live, idx, F)
        w1z = torch.cat([w1 * sign, torch.zeros(H, 1)], 1).to(dtype)  # [H, F + 1]
        # [T, H, S]: the selected columns of W1, scaled (one gather, one transposing copy).
        v = w1z.index_select(1, idx_w.reshape(-1)).view(H, T, S).transpose(0, 1).contiguous()
        self.T, self.F, self.H, self.C, self.S = T, F, H, C, S
        self.dtype = dtype
        self.idx = idx
        self.v = v
        # Base: s * x @ W1.T + b1 (complement) or b1 (kept features gathered).
        self.w1s = (w1 * s1).contiguous() if self.complement and s1 > 0 else None
        self.b1 = b1
        self.w2 = (w2.unsqueeze(0) * m2.unsqueeze(1)).contiguous()  # [T, C, H]: W2 * m2_t
        self.b2 = b2
        self.device = fc1.weight.device
        self.key = _fused_key(parts, feat, dtype)
        # Snapshots of the parameters: an update through ``p.data`` does not bump ``p._version``
        # (the key), so every call also compares the values (``unchanged``).
        self._params = [q for q in (fc1.weight, fc1.bias, fc2.weight, fc2.bias) if q is not None]
        self._snap = [q.detach().clone() for q in self._params]

    def unchanged(self) -> bool:
        """Whether the head's parameters still hold the values this head was built from (a
        bitwise comparison: about 0.1 ms per million parameters)."""
        return all(torch.equal(q.detach(), c) for q, c in zip(self._params, self._snap, strict=True))

    def _gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` (float32 via oneDNN where available)."""
        if _MKLDNN_LINEAR and x.dtype == torch.float32 and x.device.type == "cpu":
            return _mkldnn_linear(x, w)
        return torch.mm(x, w.t())

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, T, C]`` (float32) of trunk features ``feats`` ``[b, *feat]``."""
        b = feats.shape[0]
        if b == 0:
            return torch.zeros(0, self.T, self.C)
        x = feats.reshape(b, self.F).to(torch.float32)
        pad = b == 1  # a 1-column GEMM takes another kernel (other rounding): pad to 2
        if pad:
            x = torch.cat([x, x])
        x = x.contiguous()
        n = x.shape[0]
        # Item-minor layout: pre-activations [T, H, n]; each GEMM's n columns are the items.
        with torch.autocast("cpu", enabled=False):
            if self.w1s is not None:
                base = self._gemm(self.w1s, x)  # [H, n] = s * W1 @ x.T
                if self.b1 is not None:
                    base.add_(self.b1.unsqueeze(1))
            elif self.b1 is not None:
                base = self.b1.unsqueeze(1).expand(self.H, n)
            else:
                base = torch.zeros(self.H, 1).expand(self.H, n)
            a = torch.empty(self.T, self.H, n)
            if self.S == 0:
                a.copy_(base.unsqueeze(0).expand_as(a))
            else:
                # Row gathers of x.T [F, n] into one reused buffer (it stays in cache).
                xt = x.t().to(self.dtype).contiguous()
                buf = torch.empty(self.S, n, dtype=self.dtype)
                if self.dtype == torch.bfloat16:
                    z = torch.empty(self.H, n, dtype=self.dtype)
                    for t in range(self.T):
                        torch.index_select(xt, 0, self.idx[t], out=buf)
                        torch.mm(self.v[t], buf, out=z)  # oneDNN bf16, float32 accumulation
                        torch.add(base, z, out=a[t])
                else:
                    for t in range(self.T):
                        torch.index_select(xt, 0, self.idx[t], out=buf)
                        torch.add(base, self._gemm(self.v[t], buf.t()), out=a[t])
            a.relu_()
            # [T, n, C]; with the items as the GEMM's rows (MKL's bmm rounds the items alike
            # whatever n only that way round).
            out = torch.bmm(a.transpose(1, 2), self.w2.transpose(1, 2))
            if self.b2 is not None:
                out.add_(self.b2)
        out = out.transpose(0, 1)  # [n, T, C]
        return out[:1] if pad else out


def _fused_key(
    parts: tuple[nn.Dropout, nn.Linear, nn.Dropout, nn.Linear], feat: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[Any, ...]:
    """What a :class:`FusedMLPHead` depends on: the layers' parameters (identity and in-place
    version) and dropout rates, the feature shape and the compute dtype."""
    d1, fc1, d2, fc2 = parts
    tensors = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    return (
        tuple((id(p), p._version) if p is not None else None for p in tensors),
        float(d1.p), float(d2.p), tuple(feat), dtype,
    )


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
    fused: bool = True,
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
        fused: run a head of the paper's form fused (see :class:`MCDropout`).

    Warns (RuntimeWarning) when the model has no dropout layer: BALD is then identically 0.
    """
    with MCDropout(
        model, T, seed=seed, consistent=consistent, trunk_head=trunk_head, max_rows=max_rows,
        fused=fused,
    ) as mc:
        return mc(x, indices)

