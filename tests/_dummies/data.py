"""Small real data: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


def digits(n_train: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), pixels scaled to [0, 1], flattened to 64 features."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int = 0):
    """`steps` random minibatches (x_b, y_b)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        yield x[idx], y[idx]
