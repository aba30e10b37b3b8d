"""Loading of the native extension, fake (meta) implementations, and backend discovery.

The native library is split in three shared objects:

* ``fastbald._C``: the op schemas (``TORCH_LIBRARY(fastbald, m)``) and, when built with CUDA, the
  CUDA kernels;
* ``fastbald._cpu_avx512`` / ``fastbald._cpu_avx2`` / ``fastbald._cpu_base``: the same CPU kernel
  compiled for AVX-512, for AVX2+FMA and for any CPU. Exactly one is loaded, chosen at run time from
  the CPU's capability as torch reports it (``FASTBALD_CPU_KERNEL`` overrides), so the package never
  executes an instruction the CPU lacks.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch

from .metrics import N_METRICS  # rows of the op's output = bits of its ``metrics`` mask

_STATE: dict[str, Any] = {"loaded": False, "native": False, "cpu": None, "cuda": False, "why": {}}
_DISABLED = "disabled by FASTBALD_DISABLE_NATIVE=1"

# CPU kernel builds, widest first: a build that is missing falls back to the next narrower one.
CPU_VARIANTS = ("avx512", "avx2", "base")


def _cpu_variant() -> str:
    forced = os.environ.get("FASTBALD_CPU_KERNEL")
    if forced in CPU_VARIANTS:
        return forced
    if forced:  # a typo must not pass for the widest build without a word
        warnings.warn(
            f"FASTBALD_CPU_KERNEL={forced!r} is not one of {', '.join(CPU_VARIANTS)}: ignored, "
            "the CPU kernel is chosen from the CPU's capability",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "base")


def load() -> dict[str, Any]:
    """Load the extension once; return the state dict (native, cpu variant, cuda, why-not)."""
    if _STATE["loaded"]:
        return _STATE
    _STATE["loaded"] = True
    if _disabled():
        _STATE["why"]["cpu"] = _STATE["why"]["cuda"] = _DISABLED
        return _STATE
    try:
        c = importlib.import_module("fastbald._C")
    except ImportError as e:
        _STATE["why"]["cpu"] = _STATE["why"]["cuda"] = f"native extension not built ({e})"
        return _STATE
    _STATE["native"] = True
    variant = _cpu_variant()
    forced = os.environ.get("FASTBALD_CPU_KERNEL") in CPU_VARIANTS
    # A forced variant must load as asked; the automatic choice falls back to narrower builds.
    candidates = [variant] if forced else list(CPU_VARIANTS[CPU_VARIANTS.index(variant) :])
    errors = []
    for v in candidates:
        try:
            importlib.import_module(f"fastbald._cpu_{v}")
            _STATE["cpu"] = v
            break
        except ImportError as e:
            errors.append(f"fastbald._cpu_{v}: {e}")
    if _STATE["cpu"] is None:
        _STATE["why"]["cpu"] = "CPU kernel not built (" + "; ".join(errors) + ")"
    _STATE["cuda"] = bool(getattr(c, "built_with_cuda", lambda: False)())
    if not _STATE["cuda"]:
        _STATE["why"]["cuda"] = "extension built without CUDA kernels"
    elif not torch.cuda.is_available():
        _STATE["why"]["cuda"] = "built with CUDA kernels, but no CUDA device is available"
    _register_fakes()
    _register_autograd()
    return _STATE


_FAKES_DONE = False


def _register_fakes() -> None:
    global _FAKES_DONE
    if _FAKES_DONE:
        return
    _FAKES_DONE = True

    @torch.library.register_fake("fastbald::pool_scores")
    def _pool_scores_fake(
        x: torch.Tensor, input_kind: int, metrics: int, check_finite: bool, prob_tol: float
    ) -> torch.Tensor:
        torch._check(x.dim() == 3, lambda: f"x must be [N, T, C], got {x.dim()} dims")
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((N_METRICS, x.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("fastbald::batchbald")
    def _batchbald_fake(
        log_probs: torch.Tensor,
        batch_size: int,
        num_samples: int,
        seed: int,
        use_double: bool,
        lazy: bool,
        prob_tol: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(log_probs.dim() == 3, lambda: f"log_probs must be [N, K, C], got {log_probs.dim()} dims")
        return (
            log_probs.new_empty((batch_size,), dtype=torch.int64),
            log_probs.new_empty((batch_size,), dtype=torch.float64),
            log_probs.new_empty((batch_size,), dtype=torch.int64),
        )


def _register_autograd() -> None:
    """Backward formulas of the native ops (the kernels compute no gradients).

    ``pool_scores``: the gradient of the pure-PyTorch implementation
    (:func:`fastbald.reference._scores_chunk`, the same math; ``-inf`` masks and zero
    probabilities give zero, not NaN, gradients), recomputed in chunks of bounded memory for the
    metrics asked for (the variation ratio, a count, has none). ``batchbald`` returns a greedy
    selection: differentiating it raises. Called once, by :func:`load`.
    """

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, input_kind, metrics = inputs[:3]
        ctx.save_for_backward(x)
        ctx.input_kind, ctx.metrics = int(input_kind), int(metrics)

    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        from .reference import _CHUNK_ELEMS, INPUT_KINDS, _scores_chunk

        (x,) = ctx.saved_tensors
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        asked = torch.tensor([bool(ctx.metrics >> i & 1) for i in range(N_METRICS)], device=grad.device)
        grad = torch.where(asked.unsqueeze(1), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        # create_graph=True (higher-order gradients): keep the graph of this gradient too.
        create = torch.is_grad_enabled()
        N, T, C = x.shape
        step = max(1, _CHUNK_ELEMS // max(1, T * C))
        pieces = []
        with torch.enable_grad():
            for i in range(0, N, step):
                xc = x[i : i + step]
                if not (create and xc.requires_grad):
                    xc = xc.detach().requires_grad_(True)
                out = _scores_chunk(xc, INPUT_KINDS[ctx.input_kind], acc, branchless=True)
                (g,) = torch.autograd.grad(
                    out, xc, grad[:, i : i + step].to(out.dtype), allow_unused=True, create_graph=create
                )
                pieces.append(g if g is not None else torch.zeros_like(xc))
        gx = torch.cat(pieces) if pieces else torch.zeros_like(x)
        return gx, None, None, None, None

    torch.library.register_autograd("fastbald::pool_scores", backward, setup_context=setup)

    def bb_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        raise RuntimeError(
            "fastbald::batchbald is not differentiable (a greedy selection); detach log_probs "
            "before calling it"
        )

    torch.library.register_autograd("fastbald::batchbald", bb_backward)


def native_available(device: torch.device) -> bool:
    st = load()
    if device.type == "cpu":
        return st["cpu"] is not None
    if device.type == "cuda":
        return bool(st["cuda"])
    return False


def why_not(device_type: str) -> str | None:
    return load()["why"].get(device_type)


def _disabled() -> bool:
    """FASTBALD_DISABLE_NATIVE=1: every native op is off (the pure-PyTorch paths run)."""
    return os.environ.get("FASTBALD_DISABLE_NATIVE") == "1"


def extension_op(module: str, op: str, cache: dict[str, Any]) -> Any:
    """``torch.ops.fastbald.<op>`` of a separately built CPU extension ``module`` (e.g.
    ``fastbald._epig_cpu``), or None when it is not built or FASTBALD_DISABLE_NATIVE=1. Loaded
    once per ``cache`` (the caller's module-level dict): ``cache["op"]``, and ``cache["why"]``
    when it is None."""
    if "op" not in cache:
        try:
            if _disabled():
                raise ImportError(_DISABLED)
            importlib.import_module(module)
            cache["op"] = getattr(torch.ops.fastbald, op)
        except (ImportError, AttributeError, RuntimeError) as e:  # pragma: no cover - unbuilt tree
            cache["op"] = None
            cache["why"] = str(e)
    return cache["op"]
