"""Deep ensemble: K independent MAP fits from K LoRA initialisations, trained as one vectorised batch."""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import IBDRSettings
from ..model import BayesianLoRA
from .base import Method, MethodConfig, OptimSettings
from .ibdr import IBDR, IBDRConfig


@dataclass(frozen=True)
class EnsembleConfig(MethodConfig):
    """K members."""

    size_field = "num_particles"

    num_particles: int = 4


class DeepEnsemble(IBDR):
    """IBDR's machinery with no interaction: α = 0, no ascent, σ = 0.

    With point-mass particles the "mc" KL term is −(1/K) Σ_i log p(θ_i), so every particle follows its own
    MAP objective log p(θ_i) + (N/B) Σ_b log p(y_b | x_b, θ_i); the K fits share only the forward pass.
    """

    name = "ensemble"
    config_class = EnsembleConfig

    def __init__(
        self, model: BayesianLoRA, config: EnsembleConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        Method.__init__(self, model, config, optim, seed=seed)
        loss = IBDRSettings(alpha=0.0, ascent="none", kl="mc")
        self._build(IBDRConfig(num_particles=self.config.num_particles, loss=loss))
