"""MC dropout: MAP training with dropout on, then dropout masks sampled at prediction time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dropout import dropout_mode, has_dropout
from ..functional import Inputs
from ..model import BayesianLoRA
from ..posterior import Posterior
from .base import MethodConfig, OptimSettings
from .map import MAP


@dataclass(frozen=True)
class MCDropoutConfig(MethodConfig):
    """MC dropout has no settings of its own: the dropout rate is the network's (e.g. peft ``lora_dropout``)."""


class MCDropout(MAP):
    """Gal & Ghahramani (2016): θ_MAP trained with dropout; the predictive averages p(y | x, θ_MAP, mask_s)
    over S independent dropout masks. Only the dropout modules are switched to training mode, in training and
    prediction (:func:`~pyro_ibdr.dropout.dropout_mode`): BatchNorm and other layers keep the network's mode.
    """

    name = "mc_dropout"
    config_class = MCDropoutConfig

    def __init__(
        self, model: BayesianLoRA, config: MCDropoutConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        self.check_network(model)
        super().__init__(model, config, optim, seed=seed)

    @staticmethod
    def check_network(model: BayesianLoRA) -> None:
        """Raise ``ValueError`` unless the network has a source of noise to sample at test (a dropout module)."""
        if not has_dropout(model.net):
            raise ValueError(
                "MC dropout needs a network with a dropout module of rate p > 0; set peft's "
                "LoraConfig(lora_dropout=...) or use a backbone with dropout"
            )

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        with dropout_mode(self.model.net):
            return super().step(x, y)

    def posterior(self) -> Posterior:
        posterior = super().posterior()
        posterior.dropout_at_test = True
        return posterior
