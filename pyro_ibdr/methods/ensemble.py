"""Deep ensemble: K independent MAP fits from K LoRA initialisations, trained as one vectorised batch."""

from __future__ import annotations

from dataclasses import dataclass

from pyro import poutine

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
    """K independent MAP fits: member k minimises its own MAP objective

        −log p(θ_k) − (N/B) Σ_b log p(y_b | x_b, θ_k)      (in the units of ``optim.objective_scale``)

    and starts where ``map`` with seed s + k starts (:func:`~pyro_ibdr.initialisation.seeded_particles`).
    IBDR's machinery with no interaction (α = 0, no ascent, σ = 0, the Monte-Carlo KL, which for point masses
    is −log p(θ_k)); IBDRLoss averages over the K particles, so the steps run under ``poutine.scale(K)``: the
    objective is the SUM of the members' objectives and each member gets a full MAP step, exactly the step
    ``map`` would take on the same minibatch. The K fits share only the forward pass; the logged terms are
    sums over the members.
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

    def objective_units(self) -> poutine.messenger.Messenger:
        factor = self.optim_settings.scale_factor(self.model.num_data)
        return poutine.scale(scale=self.config.num_particles * factor)
