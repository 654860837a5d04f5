"""IBDR: ParticleGuide + IBDRLoss under ``pyro.infer.SVI``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from pyro.infer import SVI

from ..functional import Inputs
from ..guides import ParticleGuide
from ..losses import IBDRLoss, IBDRSettings
from ..model import BayesianLoRA
from ..posterior import Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class IBDRConfig(MethodConfig):
    """K particles, the mixture scale σ, the preset, and the loss settings (:class:`~pyro_ibdr.IBDRSettings`).

    ``from_options`` accepts the loss settings' fields directly (``create_method("ibdr", model, alpha=0.1)``).
    """

    size_field = "num_particles"

    num_particles: int = 4
    sigma: float = 0.0
    learn_sigma: bool = False
    preset: Literal["paper", "official"] = "paper"
    loss: IBDRSettings = field(default_factory=IBDRSettings)

    @classmethod
    def from_options(cls, **options: Any) -> IBDRConfig:
        loss_fields = {f.name for f in fields(IBDRSettings)}
        loss_options = {k: options.pop(k) for k in list(options) if k in loss_fields}
        if "loss" in options and loss_options:
            raise TypeError(f"give either loss=IBDRSettings(...) or its fields {sorted(loss_options)}, not both")
        config = super().from_options(**options)
        if loss_options:
            config = replace(config, loss=IBDRSettings(**loss_options))
        return config


class IBDR(Method):
    """Interactive Bayesian Distributional Robustness with K particles.

    ``preset="official"`` uses the authors' code's loss (:meth:`IBDRLoss.official`), whose dual step
    follows the weights' scheduled learning rate; the config's loss settings then override its fields
    that differ from the defaults.
    """

    name = "ibdr"
    config_class = IBDRConfig

    def __init__(
        self, model: BayesianLoRA, config: IBDRConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        self._build(self.config)

    def _build(self, c: IBDRConfig) -> None:
        """Guide, loss, optimiser and SVI for the IBDR settings ``c`` (also used by IBDR's special cases)."""
        self.guide = ParticleGuide(self.model, c.num_particles, c.sigma, learn_sigma=c.learn_sigma, seed=self.seed,
                                   name=self.name)
        if c.preset == "official":
            overrides = {f.name: getattr(c.loss, f.name) for f in fields(IBDRSettings)
                         if getattr(c.loss, f.name) != getattr(IBDRSettings(), f.name)}
            self.loss = IBDRLoss.official(lr=lambda: self.lr, **overrides)
        elif c.preset == "paper":
            self.loss = IBDRLoss(c.loss)
        else:
            raise ValueError(f"preset must be 'paper' or 'official', got {c.preset!r}")
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = SVI(self.model, self.guide, self.optim, loss=self.loss)

    @property
    def passes_per_step(self) -> int:
        ascent_passes = 1 if self.loss.settings.ascent == "none" else 2
        return ascent_passes * self.guide.num_particles

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        self.svi.step(x, y)
        return dict(self.loss.terms)

    def posterior(self) -> Posterior:
        return self.guide.posterior()

    def state(self) -> dict[str, Any]:
        return self.loss.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """The default (param store, optimiser, rate) and the loss's dual variable λ."""
        return {**super().state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss.load_state_dict(state["loss"])
