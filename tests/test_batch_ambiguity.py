"""benchmarks/batch_ambiguity.py: the held-out ambiguity measures of acquired MNIST images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_ambiguity.py"
_spec = importlib.util.spec_from_file_location("batch_ambiguity", _PATH)
ba = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ba)


def test_stats_match_a_direct_computation() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.9, 0.0]])
    labels = np.array([0, 1, 2, 0])
    s = ba.ambiguity_stats(np.array([0, 1, 2, 3]), probs, labels, top1=0.6)
    ent = [0.0, np.log(2), np.log(3), -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))]
    assert s["images"] == 4
    assert s["entropy"] == pytest.approx(np.mean(ent), abs=1e-12)
    assert s["top1"] == pytest.approx(0.5)  # log 2 and log 3 exceed 0.6
    # argmax: 0 (right), 0 (tie -> first; wrong for label 1), 0 (wrong for 2), 1 (wrong for 0)
    assert s["wrong"] == pytest.approx(0.75)
    assert s["p_label"] == pytest.approx(np.mean([1.0, 0.5, 1 / 3, 0.1]))


def test_held_out_reference_judges_each_image_by_the_other_half(monkeypatch) -> None:
    """Cross fitting: the model that scores an image never trained on it, and each image is
    scored exactly once."""
    n, c = 40, 10
    calls = []

    class Ident(torch.nn.Module):
        def __init__(self, seen):
            super().__init__()
            self.seen, self.scored = seen, set()

        def forward(self, x):  # logits 10 at class (image id mod c), 0 elsewhere
            ids = x.flatten(1)[:, 0].long()
            self.scored |= set(ids.tolist())
            return 10.0 * torch.nn.functional.one_hot(ids % c, c).float()

    def fake_train(x, y, epochs, seed):
        calls.append(Ident(set(x.flatten(1)[:, 0].long().tolist())).eval())
        return calls[-1]

    monkeypatch.setattr(ba, "train_reference", fake_train)
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()

    class Data:
        x_train, y_train = x, torch.arange(n) % c
        x_test, y_test = x[:5] + 100, torch.arange(5)  # ids 100..104
        num_classes = c

    probs, errs = ba.held_out_reference(Data(), epochs=1)
    a, b = calls
    assert not (a.seen & b.seen) and a.seen | b.seen == set(range(n))  # two disjoint halves
    for m in calls:  # each scored the other half and the test set, nothing it trained on
        assert m.scored == (set(range(n)) - m.seen) | set(range(100, 105))
    assert probs.shape == (n, c) and np.allclose(probs.sum(-1), 1)
    assert (probs.argmax(-1) == np.arange(n) % c).all()  # every row was written
    assert errs == [0.0, 0.0]


def test_missing_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ba.main([str(tmp_path)])
    assert "no state.json there" in capsys.readouterr().err
