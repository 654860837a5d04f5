"""The data term l of IBDR: how the K particles' logits meet the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _particle_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE(z_i, y) per particle and example, (K, B), from logits (K, B, C) and targets (B,)."""
    size, batch, num_classes = logits.shape
    flat = F.cross_entropy(logits.reshape(-1, num_classes), targets.repeat(size), reduction="none")
    return flat.reshape(size, batch)


class ParticleCrossEntropy:
    r"""The paper's data term: each particle's own cross-entropy, averaged over the K particles,

        l(θ_{1:K}; x, y) = (1/K) Σ_i CE(f(x; θ_i), y).

    Source: the paper's practical objective (1/K) Σ_i ℓ̃(θ'_i, θ_i) (Theorem 4.1's population loss).
    The ascent of Algorithm 1 is per particle, θ'_i = θ_i + η ∇_{θ_i} l(θ_i; x, y), so its objective is the
    sum Σ_i CE_i, whose gradient with respect to θ_i is particle i's own gradient.
    """

    name = "per_particle"

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example data term (B,) from logits (K, B, C)."""
        return _particle_cross_entropy(logits, targets).mean(0)

    def ascent(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example ascent objective (B,): Σ_i CE_i."""
        return _particle_cross_entropy(logits, targets).sum(0)


class EnsembleCrossEntropy:
    r"""The authors' code's data term: one cross-entropy of the mean of the particles' logits,

        l(θ_{1:K}; x, y) = CE((1/K) Σ_i f(x; θ_i), y).

    Source: the authors' code (ngocquanofficial/DRO), not the paper. The particles are trained jointly as
    one ensemble and are not individually accurate: predict them with the mean of logits. The ascent is
    joint, on the same term.
    """

    name = "ensemble"

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example data term (B,) from logits (K, B, C)."""
        return F.cross_entropy(logits.mean(0), targets, reduction="none")

    def ascent(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example ascent objective (B,): the data term itself (a joint ascent)."""
        return self(logits, targets)


DataTerm = ParticleCrossEntropy | EnsembleCrossEntropy
