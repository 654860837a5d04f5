"""IBDR: ParticleGuide + IBDRLoss under ``pyro.infer.SVI``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pyro.infer import SVI

from ..functional import Inputs
from ..guides import ParticleGuide
from ..losses import IBDRLoss
from ..model import BayesianLoRA
from ..posterior import Posterior
from .base import Method, OptimSettings, set_learning_rate


class IBDR(Method):
    """Interactive Bayesian Distributional Robustness with K particles.

    ``preset="official"`` uses the authors' code's loss (:meth:`IBDRLoss.official`), whose dual step
    follows the weights' scheduled learning rate; remaining keyword options override loss settings.
    """

    name = "ibdr"

    def __init__(
        self,
        model: BayesianLoRA,
        optim: OptimSettings | None = None,
        *,
        seed: int = 0,
        num_particles: int = 4,
        sigma: float = 0.0,
        learn_sigma: bool = False,
        preset: Literal["paper", "official"] = "paper",
        **loss_options: Any,
    ) -> None:
        super().__init__(model, optim, seed=seed)
        self.guide = ParticleGuide(model, num_particles, sigma, learn_sigma=learn_sigma, seed=seed, name=self.name)
        if preset == "official":
            self.loss = IBDRLoss.official(lr=lambda: self.lr, **loss_options)
        elif preset == "paper":
            self.loss = IBDRLoss(**loss_options)
        else:
            raise ValueError(f"preset must be 'paper' or 'official', got {preset!r}")
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = SVI(model, self.guide, self.optim, loss=self.loss)

    @property
    def passes_per_step(self) -> int:
        ascent_passes = 1 if self.loss.settings.ascent == "none" else 2
        return ascent_passes * self.guide.num_particles

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        self.svi.step(x, y)
        return dict(self.loss.terms)

    def posterior(self) -> Posterior:
        return self.guide.posterior()

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        set_learning_rate(self.optim, lr)

    def state(self) -> dict[str, Any]:
        return self.loss.state_dict()
