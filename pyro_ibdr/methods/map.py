"""MAP: LoRA fine-tuning with the Gaussian prior as weight decay, AutoDelta + Trace_ELBO under ``pyro.infer.SVI``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value

from ..functional import Inputs
from ..initialisation import seeded_particles
from ..model import THETA, BayesianLoRA
from ..posterior import ParticlePosterior, Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class MAPConfig(MethodConfig):
    """MAP has no settings beyond the model's prior and the optimiser."""


class MAP(Method):
    r"""θ_MAP = argmax_θ [log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ)], started at the seeded LoRA initialisation
    θ_s (:func:`~pyro_ibdr.initialisation.seeded_particles` with K = 1: the start of ensemble member k of a run with
    seed s − k).

    With a point-mass guide the ELBO is the log joint, so SVI with ``Trace_ELBO`` is MAP estimation. This is BLoB's
    MAP baseline (Wang et al., NeurIPS 2024, §5: LoRA trained with weight decay); :class:`~pyro_ibdr.methods.MLE`
    is the same without the prior.

    Prior scale and weight decay. The loss is in ELBO units: the negative log joint with the minibatch likelihood
    scaled to the data set, −log p(θ) − (N/B) Σ_b log p(y_b | x_b, θ). Divided by N it is the per-example objective

        (1/B) Σ_b CE(f(x_b; θ), y_b) + ||θ||² / (2 N s²),

    so the N(0, s²I) prior is coupled L2 weight decay wd = 1/(N s²): its gradient is θ/(N s²) per example
    (θ/s² in ELBO units), exactly what torch's SGD and Adam add to the gradient for ``weight_decay=wd``. Under Adam
    that prior gradient is rescaled by the second-moment estimate like the data gradient. AdamW's decoupled decay
    instead shrinks θ ← θ − lr·wd·θ outside the adaptive step (Loshchilov & Hutter, ICLR 2019), which equals the
    prior only for plain SGD. ``OptimSettings.weight_decay`` acts on top of the prior, on ELBO-unit gradients.
    Steps run in the units of ``optim.objective_scale``. The posterior is one point mass (K = 1).
    """

    name = "map"
    config_class = MAPConfig

    def __init__(
        self, model: BayesianLoRA, config: MAPConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        self.theta_init = seeded_particles(model, 1, seed)[0]
        # init_to_value's tensor becomes the parameter storage: pass a clone.
        self.guide = AutoDelta(model, init_loc_fn=init_to_value(values={THETA: self.theta_init.clone()}))
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = SVI(self.objective(), self.guide, self.optim, Trace_ELBO(max_plate_nesting=model.max_plate_nesting))

    def objective(self) -> Callable:
        """The Pyro model whose log joint the point estimate maximises: the model itself (prior and likelihood)."""
        return self.model

    @property
    def passes_per_step(self) -> int:
        return 1

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        with self.objective_units():
            return {"loss": float(self.svi.step(x, y))}

    def theta(self) -> torch.Tensor:
        """The current point estimate (D,); the initialisation before the first step."""
        if self.guide.prototype_trace is None:
            return self.theta_init.clone()
        return self.guide.median()[THETA].detach().clone()

    def posterior(self) -> Posterior:
        return ParticlePosterior(self.theta().unsqueeze(0))
