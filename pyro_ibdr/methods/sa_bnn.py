"""Flat-seeking BNN: the mean-field ELBO with a SAM ascent on every sampled θ."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.infer import SVI

from ..functional import Inputs
from ..losses import IBDRLoss
from ..model import BayesianLoRA
from .base import MethodConfig, OptimSettings
from .bbb import BayesByBackprop, check_mean_field


@dataclass(frozen=True)
class SABNNConfig(MethodConfig):
    """S training samples, the initial posterior scale, ρ the radius of the SAM step on each sample."""

    size_field = "num_samples"

    num_samples: int = 4
    init_scale: float = 1e-3
    rho: float = 0.05

    def __post_init__(self) -> None:
        check_mean_field(self.num_samples, self.init_scale)


class SABNN(BayesByBackprop):
    """Nguyen et al. (2023), flat-seeking Bayesian neural networks: q(θ) = N(μ, diag σ²) minimising

        (1/S) Σ_s [(N/B) Σ_b −log p(y_b | x_b, θ_s + e_s) + log q(θ_s) − log p(θ_s)],  θ_s = μ + σ ε_s,

    with e_s = ρ g_s/||g_s|| the SAM step for sample s (held constant). IBDRLoss with α = 0, the "sam" ascent
    and the Monte-Carlo KL on the mean-field guide of :class:`BayesByBackprop` (no KL annealing).
    """

    name = "sa_bnn"
    config_class = SABNNConfig

    def __init__(
        self, model: BayesianLoRA, config: SABNNConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        config = config if config is not None else SABNNConfig()
        self.loss = IBDRLoss(alpha=0.0, ascent="sam", sam_radius=config.rho, kl="mc")
        self.loss.num_particles = config.num_samples
        super().__init__(model, config, optim, seed=seed)

    @property
    def kl_anneal_steps(self) -> int:
        return 0

    def _build_svi(self) -> SVI:
        return SVI(self.model, self.guide, self.optim, self.loss)

    @property
    def passes_per_step(self) -> int:
        return 2 * self.num_samples

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        with self.objective_units():
            self.svi.step(x, y)
        self.num_steps += 1
        return {name: self.loss.terms[name] for name in ("loss", "data", "kl")}

    def state(self) -> dict[str, float | int]:
        return {"num_steps": self.num_steps, "rho": self.loss.settings.sam_radius}
