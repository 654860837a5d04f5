"""Seeded LoRA initialisations, shared by every particle-based method.

Particle k of a run with seed s is drawn from its own generator seeded s + k, so a K-member run and K
one-member runs start from the same points: member k of ``ensemble(seed=s)`` starts where ``map(seed=s + k)``
does, and so do the particles of ``ibdr`` and ``svgd``.
"""

from __future__ import annotations

import torch

from .model import BayesianLoRA


def seeded_particles(model: BayesianLoRA, num_particles: int, seed: int) -> torch.Tensor:
    """K LoRA initialisations (K, D): row k is ``model.init_particles(1, torch.Generator().manual_seed(seed + k))``.

    :raises ValueError: for K < 1 or a negative seed.
    """
    if num_particles < 1:
        raise ValueError(f"the number of particles must be >= 1, got {num_particles}")
    if seed < 0:
        raise ValueError(f"the seed must be >= 0, got {seed}")
    rows = [model.init_particles(1, torch.Generator().manual_seed(seed + k)) for k in range(num_particles)]
    return torch.cat(rows)
