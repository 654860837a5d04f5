"""MAP: plain LoRA fine-tuning as a point estimate, AutoDelta + Trace_ELBO under ``pyro.infer.SVI``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value

from ..functional import Inputs
from ..model import THETA, BayesianLoRA
from ..posterior import ParticlePosterior, Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class MAPConfig(MethodConfig):
    """MAP has no settings beyond the model's prior and the optimiser."""


class MAP(Method):
    """θ_MAP = argmax_θ [log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ)], started at the LoRA initialisation θ0.

    With a point-mass guide the ELBO is the log joint, so SVI with ``Trace_ELBO`` is MAP estimation; the
    N(0, s²I) prior acts as weight decay 1/(N s²) per example. The posterior is one point mass (K = 1).
    """

    name = "map"
    config_class = MAPConfig

    def __init__(
        self, model: BayesianLoRA, config: MAPConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        # init_to_value's tensor becomes the parameter storage: pass a clone.
        self.guide = AutoDelta(model, init_loc_fn=init_to_value(values={THETA: model.theta0.clone()}))
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = SVI(model, self.guide, self.optim, Trace_ELBO(max_plate_nesting=model.max_plate_nesting))

    @property
    def passes_per_step(self) -> int:
        return 1

    def prepare(self, x: Inputs, y: torch.Tensor) -> None:
        """Trace the model once to set up the AutoDelta guide (its prototype draws dropout masks, if any)."""
        if self.guide.prototype_trace is None:
            self.guide(x, y)

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        return {"loss": float(self.svi.step(x, y))}

    def theta(self) -> torch.Tensor:
        """The current point estimate (D,); θ0 before the first step."""
        if self.guide.prototype_trace is None:
            return self.model.theta0.clone()
        return self.guide.median()[THETA].detach().clone()

    def posterior(self) -> Posterior:
        return ParticlePosterior(self.theta().unsqueeze(0))
