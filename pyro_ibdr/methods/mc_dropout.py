"""MC dropout: MAP training with dropout on, then dropout masks sampled at prediction time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..functional import Inputs
from ..model import BayesianLoRA
from ..posterior import Posterior
from ..predictive import training_mode
from .base import MethodConfig, OptimSettings
from .map import MAP

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def has_dropout(net: nn.Module) -> bool:
    """Whether ``net`` holds a dropout module with rate p > 0 (e.g. peft ``lora_dropout`` or the backbone's)."""
    return any(isinstance(m, _DROPOUT) and m.p > 0 for m in net.modules())


@dataclass(frozen=True)
class MCDropoutConfig(MethodConfig):
    """MC dropout has no settings of its own: the dropout rate is the network's (e.g. peft ``lora_dropout``)."""


class MCDropout(MAP):
    """Gal & Ghahramani (2016): θ_MAP trained with dropout; the predictive averages p(y | x, θ_MAP, mask_s)
    over S independent dropout masks (the network runs in training mode while predicting).
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
        with training_mode(self.model.net, True):
            return super().step(x, y)

    def posterior(self) -> Posterior:
        posterior = super().posterior()
        posterior.dropout_at_test = True
        return posterior
