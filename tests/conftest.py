"""Shared fixtures. `make test` sets FASTBALD_REQUIRE_NATIVE=1 so a missing native build fails the
run instead of silently testing only the pure-PyTorch fallback."""

from __future__ import annotations

import os

import pytest
import torch

import fastbald
from fastbald import _ops


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("FASTBALD_REQUIRE_NATIVE") == "1":
        st = _ops.load()
        if st["cpu"] is None:
            raise pytest.UsageError(
                f"FASTBALD_REQUIRE_NATIVE=1 but the CPU kernel is not available: {st['why']}"
            )


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"fastbald backends: {fastbald.backends()}", f"torch {torch.__version__}"]


@pytest.fixture
def native_cpu() -> None:
    if not _ops.native_available(torch.device("cpu")):
        pytest.skip("native CPU kernel not built")
