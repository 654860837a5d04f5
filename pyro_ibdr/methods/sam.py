"""SAM: sharpness-aware minimisation of the LoRA MAP objective (one particle)."""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import IBDRSettings
from ..model import BayesianLoRA
from .base import Method, MethodConfig, OptimSettings
from .ibdr import IBDR, IBDRConfig


@dataclass(frozen=True)
class SAMConfig(MethodConfig):
    """ρ, the radius of the normalised ascent step."""

    rho: float = 0.05


class SAM(IBDR):
    """Foret et al. (2021) on θ: descend the MAP objective at θ + ρ g/||g||, g the per-example-mean loss gradient.

    IBDR's machinery with K = 1, σ = 0, α = 0 and the "sam" ascent; the "mc" KL term is −log p(θ).
    """

    name = "sam"
    config_class = SAMConfig

    def __init__(
        self, model: BayesianLoRA, config: SAMConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        Method.__init__(self, model, config, optim, seed=seed)
        loss = IBDRSettings(alpha=0.0, ascent="sam", sam_radius=self.config.rho, kl="mc")
        self._build(IBDRConfig(num_particles=1, loss=loss))
