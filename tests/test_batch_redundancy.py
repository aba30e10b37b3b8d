"""benchmarks/batch_redundancy.py: the batch-redundancy measures of acquired MNIST batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_redundancy.py"
_spec = importlib.util.spec_from_file_location("batch_redundancy", _PATH)
br = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(br)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_duplicates_and_one_class_are_maximally_redundant() -> None:
    rows = _unit(np.random.default_rng(0).standard_normal((30, 5)))
    rows[10:20] = rows[10]  # ten copies of one image
    labels = np.arange(30) % 10
    labels[10:20] = 3
    s = br.batch_stats([list(range(10, 20))], labels, rows, 10)
    assert s == {"batches": 1, "classes": 1.0, "largest": 10.0, "nn_cos": pytest.approx(1.0)}


def test_stats_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    rows = _unit(rng.standard_normal((50, 7)))
    labels = rng.integers(0, 4, 50)
    batches = [[0, 5, 9], [1, 2, 3, 4]]
    s = br.batch_stats(batches, labels, rows, 4)
    nn = []
    for b in batches:
        nn.append(np.mean([max(float(rows[i] @ rows[j]) for j in b if j != i) for i in b]))
    assert s["batches"] == 2
    assert s["classes"] == pytest.approx(np.mean([len(set(labels[b])) for b in batches]))
    assert s["largest"] == pytest.approx(np.mean([np.bincount(labels[b]).max() for b in batches]))
    assert s["nn_cos"] == pytest.approx(np.mean(nn), abs=1e-12)


def test_acquired_batches_skip_the_initial_images() -> None:
    state = {"protocol": {"initial": 3, "per_round": 2}, "labelled_indices": [7, 8, 9, 1, 2, 3, 4, 5]}
    assert br.acquired_batches(state) == [[1, 2], [3, 4], [5]]


@pytest.mark.parametrize("text", ["3", "0-2", "5-4", "a-b"])
def test_bad_round_ranges_are_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="round range"):
        br.parse_range(text)


def test_missing_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        br.main([str(tmp_path)])
    assert "no state.json" in capsys.readouterr().err
