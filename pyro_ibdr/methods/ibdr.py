"""IBDR: ParticleGuide + IBDRLoss under ``pyro.infer.SVI``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from pyro.infer import SVI

from ..functional import Inputs
from ..guides import ParticleGuide
from ..losses import IBDRLoss, IBDRSettings
from ..metrics import EnsembleMode
from ..model import BayesianLoRA
from ..posterior import Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class IBDRConfig(MethodConfig):
    """K particles, the mixture scale σ, the head sharing, the prediction mode and the loss settings.

    ``from_options`` accepts the loss settings' fields directly (``create_method("ibdr", model, alpha=0.1)``);
    given next to ``loss=IBDRSettings(...)`` they override its fields (a preset's loss, then the user's
    changes).

    :param shared_head: one task head for all particles (:class:`~pyro_ibdr.ParticleGuide`); the authors'
        code shares it.
    :param prediction: how the particles' predictions combine (recorded on the posterior): the mean of
        probabilities, or the mean of logits (for particles trained through the ensemble cross-entropy).
    """

    size_field = "num_particles"

    num_particles: int = 4
    sigma: float = 0.0
    learn_sigma: bool = False
    shared_head: bool = False
    prediction: EnsembleMode = "mean_probs"
    loss: IBDRSettings = field(default_factory=IBDRSettings)

    def __post_init__(self) -> None:
        if self.prediction not in ("mean_probs", "mean_logits"):
            raise ValueError(f"prediction must be 'mean_probs' or 'mean_logits', got {self.prediction!r}")

    @classmethod
    def from_options(cls, **options: Any) -> IBDRConfig:
        loss_fields = {f.name for f in fields(IBDRSettings)}
        loss_options = {k: options.pop(k) for k in list(options) if k in loss_fields}
        config = super().from_options(**options)
        if loss_options:
            config = replace(config, loss=replace(config.loss, **loss_options))
        return config


class IBDR(Method):
    """Interactive Bayesian Distributional Robustness with K particles.

    A loss setting ``dual_lr=None`` takes the weights' base learning rate (the authors' choice), and
    ``dual_schedule=True`` makes λ's step follow the weights' schedule: :meth:`set_lr` passes the multiplier
    m(t) = lr_t / lr to the loss. Steps run in the units of ``optim.objective_scale``.
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
        self.prediction = c.prediction
        self.guide = ParticleGuide(self.model, c.num_particles, c.sigma, learn_sigma=c.learn_sigma,
                                   shared_head=c.shared_head, seed=self.seed, name=self.name)
        settings = c.loss if c.loss.dual_lr is not None else replace(c.loss, dual_lr=self.optim_settings.lr)
        self.loss = IBDRLoss(settings)
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = SVI(self.model, self.guide, self.optim, loss=self.loss)

    @property
    def passes_per_step(self) -> int:
        ascent_passes = 2 if self.loss.pieces.ascent.active else 1
        return ascent_passes * self.guide.num_particles

    def set_lr(self, lr: float) -> None:
        super().set_lr(lr)
        self.loss.schedule_factor = lr / self.optim_settings.lr

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        with self.objective_units():
            self.svi.step(x, y)
        return dict(self.loss.terms)

    def posterior(self) -> Posterior:
        posterior = self.guide.posterior()
        posterior.prediction = self.prediction
        return posterior

    def state(self) -> dict[str, Any]:
        return self.loss.state_dict()
