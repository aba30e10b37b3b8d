"""What tests/test_pool.py and tests/test_distributed.py share: a tiny dropout CNN and the
synthetic pool it scores. A plain module (not a conftest fixture) so the torch.multiprocessing
workers that test_distributed.py spawns can import it too (they inherit the tests' sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from fastbald.pool import SyntheticPool

#: 203 deterministic 1x8x8 images: not a multiple of the block sizes the tests use.
POOL = SyntheticPool(203, shape=(1, 8, 8), seed=4)


class Tiny(nn.Module):
    """1x8x8 images -> 4 classes; deterministic trunk, dropout head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Dropout(0.3), nn.Flatten(), nn.Linear(27, 12), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(12, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def tiny(seed: int = 0) -> Tiny:
    """A :class:`Tiny` initialised after ``torch.manual_seed(seed)`` (the same weights each call)."""
    torch.manual_seed(seed)
    return Tiny()
