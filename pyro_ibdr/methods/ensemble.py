"""Deep ensemble: K independent MAP fits from K LoRA initialisations, trained as one vectorised batch."""

from __future__ import annotations

from ..model import BayesianLoRA
from .base import OptimSettings
from .ibdr import IBDR


class DeepEnsemble(IBDR):
    """IBDR's machinery with no interaction: α = 0, no ascent, σ = 0.

    With point-mass particles the "mc" KL term is −(1/K) Σ_i log p(θ_i), so every particle follows its own
    MAP objective log p(θ_i) + (N/B) Σ_b log p(y_b | x_b, θ_i); the K fits share only the forward pass.
    """

    name = "ensemble"

    def __init__(
        self, model: BayesianLoRA, optim: OptimSettings | None = None, *, seed: int = 0, num_particles: int = 4
    ) -> None:
        super().__init__(model, optim, seed=seed, num_particles=num_particles, alpha=0.0, ascent="none", kl="mc")
