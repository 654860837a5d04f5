"""SAM: sharpness-aware minimisation of the LoRA MAP objective (one particle)."""

from __future__ import annotations

from ..model import BayesianLoRA
from .base import OptimSettings
from .ibdr import IBDR


class SAM(IBDR):
    """Foret et al. (2021) on θ: descend the MAP objective at θ + ρ g/||g||, g the per-example-mean loss gradient.

    IBDR's machinery with K = 1, σ = 0, α = 0 and the "sam" ascent; the "mc" KL term is −log p(θ).
    """

    name = "sam"

    def __init__(
        self, model: BayesianLoRA, optim: OptimSettings | None = None, *, seed: int = 0, rho: float = 0.05
    ) -> None:
        super().__init__(
            model, optim, seed=seed, num_particles=1, alpha=0.0, ascent="sam", sam_radius=rho, kl="mc"
        )
