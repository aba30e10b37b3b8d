"""Builds the CUDA-kernel emulators (csrc/cuda/emu) that the tests run: the kernel bodies compiled
as host C++ with g++, cached under build/cuda-emu by a hash of their sources and flags.

Two flavours: "plain", and "asan" (AddressSanitizer + UndefinedBehaviorSanitizer, any error
fatal). The emulators allocate input storage, workspaces and shared memory at their exact sizes,
so the asan build turns an out-of-bounds access of any of them into a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

EMU_FLAGS = {
    "plain": ["-O1"],
    "asan": [
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ],
}
# Leak checking is off (it needs ptrace, and leaks are not what the sanitizer build is for).
EMU_ENV = {
    **os.environ,
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def build_emulator(sources: list[Path], prefix: str, flavour: str = "plain", timeout: int = 900) -> Path:
    """Builds (once per hash of ``sources`` and flags) the emulator whose main file is
    ``sources[0]`` and returns the executable ``build/cuda-emu/<prefix>-<flavour>-<hash>``.

    Fails (with FASTBALD_REQUIRE_NATIVE=1) or skips the test when there is no C++ compiler."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        if os.environ.get("FASTBALD_REQUIRE_NATIVE") == "1":
            pytest.fail(f"no C++ compiler ({cxx}) for the CUDA kernel emulator")
        pytest.skip(f"no C++ compiler ({cxx}) for the CUDA kernel emulator")
    flags = EMU_FLAGS[flavour]
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sources:
        h.update(p.read_bytes())
    exe = ROOT / "build" / "cuda-emu" / f"{prefix}-{flavour}-{h.hexdigest()[:16]}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        cmd = [
            cxx,
            "-std=c++20",
            *flags,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unused-parameter",
            f"-I{CSRC}",
            str(sources[0]),
            "-o",
            str(tmp),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"emulator build failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
        os.replace(tmp, exe)
        # Builds of earlier sources, once they are an hour old (a concurrent test session on
        # other sources may still be running its own).
        for old in exe.parent.glob(f"{prefix}-{flavour}-*"):
            with contextlib.suppress(OSError):
                if old != exe and time.time() - old.stat().st_mtime > 3600:
                    old.unlink()
    return exe
