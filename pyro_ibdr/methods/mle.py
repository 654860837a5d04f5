"""MLE: LoRA fine-tuning without a prior (BLoB's MLE baseline), the MAP machinery with the θ prior masked out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyro.poutine.messenger import Messenger

from ..model import THETA
from .base import MethodConfig
from .map import MAP


class _WithoutPrior(Messenger):
    """Mask the log-density of the θ site out of the model's trace, so the prior adds nothing to the ELBO."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == THETA:
            msg["mask"] = False


@dataclass(frozen=True)
class MLEConfig(MethodConfig):
    """MLE has no settings beyond the optimiser."""


class MLE(MAP):
    r"""θ_MLE = argmax_θ (N/B) Σ_b log p(y_b | x_b, θ), started at the LoRA initialisation θ0.

    Plain LoRA training: BLoB's MLE baseline (Wang et al., NeurIPS 2024, §5), :class:`~pyro_ibdr.methods.MAP` with
    the N(0, s²I) prior masked out of the model (``Trace_ELBO`` with a point-mass guide then maximises the scaled
    log-likelihood alone). In per-example units the objective is (1/B) Σ_b CE(f(x_b; θ), y_b) and a step is a
    plain cross-entropy step; MAP adds the prior gradient θ/(N s²) per example, i.e. coupled weight decay
    wd = 1/(N s²) (see :class:`~pyro_ibdr.methods.MAP` for AdamW's decoupled decay). The loss is reported in ELBO
    units (N times the per-example cross-entropy). The posterior is one point mass (K = 1).
    """

    name = "mle"
    config_class = MLEConfig

    def objective(self) -> Callable:
        """The model with the θ prior masked: only the likelihood enters the loss."""
        return _WithoutPrior()(self.model)
