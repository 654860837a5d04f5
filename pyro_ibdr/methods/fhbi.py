"""Flat Hilbert Bayesian inference: SVGD whose gradients are taken after a sharpness-aware ascent in function space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVGD
from pyro.infer.svgd import SteinKernel

from .. import distributed
from ..functional import batch_size
from ..likelihood import log_likelihood
from ..model import THETA, BayesianLoRA
from .svgd import SteinVGD, SVGDConfig


class SharpnessAwareSVGD(SVGD):
    r"""Pyro's :class:`~pyro.infer.SVGD` (``mode="multivariate"``) with the log joint's gradients taken at
    perturbed particles θ_j + e_j, the kernel still at θ.

    Pass 1 (ascent): e_i = ρ ψ_i / ||ψ_i||, ψ_i = Σ_j k(θ_j, θ_i) ∇L(θ_j), L the minibatch per-example mean
    NLL. Pass 2: Pyro's SVGD step with ∇ log p(θ_j + e_j, D_b) in place of ∇ log p(θ_j, D_b), e held constant.
    With ρ = 0 this is exactly Pyro's SVGD.
    """

    def __init__(self, model: BayesianLoRA, kernel: SteinKernel, optim: pyro.optim.PyroOptim, num_particles: int,
                 rho: float) -> None:
        super().__init__(model, kernel, optim, num_particles, model.max_plate_nesting, mode="multivariate")
        self.bayesian_model = model
        self.rho = float(rho)
        self.loss = self._perturbed_loss
        self.last_perturbation: torch.Tensor | None = None

    @torch.enable_grad()
    def perturbation(self, particles: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        """e (K, D) for particles (K, D): the kernel-weighted ascent direction of each particle, length ρ."""
        theta = particles.detach().requires_grad_(True)
        mean_nll = -log_likelihood(self.bayesian_model, theta, x, y) / self.bayesian_model.num_data
        (grads,) = torch.autograd.grad(mean_nll.sum(), theta)
        (grads,) = distributed.batch_mean([grads], count=batch_size(x))  # data mode: the global batch's mean
        log_kernel, _ = self.kernel.log_kernel_and_grad(theta.detach())
        direction = log_kernel.sum(-1).exp() @ grads
        return self.rho * direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _perturbed_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """−Σ_j log p(θ_j + e_j, D_b), differentiable in the particles θ (through the guide), e constant."""
        theta = poutine.trace(guide).get_trace(*args, **kwargs).nodes[THETA]["value"]  # (K, 1, D)
        perturbation = torch.zeros_like(theta)
        if self.rho > 0:
            flat = theta.detach().reshape(self.num_particles, -1)
            perturbation = self.perturbation(flat, *args, **kwargs).reshape(theta.shape)
        self.last_perturbation = perturbation.reshape(self.num_particles, -1)
        conditioned = poutine.condition(model, data={THETA: theta + perturbation})
        return -poutine.trace(conditioned).get_trace(*args, **kwargs).log_prob_sum()


@dataclass(frozen=True)
class FHBIConfig(SVGDConfig):
    """SVGD's settings (K particles, the Stein kernel and its bandwidth factor) and ρ, the ascent radius."""

    rho: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho >= 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")


class FHBI(SteinVGD):
    r"""Truong et al. (ICML 2025, arXiv 2410.04196), flat Hilbert Bayesian inference, Algorithm 1: each step

        e_i = ρ ψ_i / ||ψ_i||₂,   ψ_i = Σ_j k(θ_j, θ_i) ∇_θ L_B(θ_j)                    (functional ascent)
        θ_i ← θ_i + ε (1/K) Σ_j [k(θ_j, θ_i) ∇ log p(θ_j + e_j, D_B) + ∇_{θ_j} k(θ_j, θ_i)]   (SVGD descent)

    with L_B the minibatch per-example mean NLL and log p(θ, D_B) = log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ).
    The ascent couples the particles through the kernel (the paper's "angle repulsion": a particle's
    perturbation leans on its neighbours' gradients); the descent is SVGD's, with its spatial repulsion.
    ρ = 0 gives SVGD and K = 1 SAM. The kernel, the start from K LoRA initialisations and the optimiser are
    those of :class:`SteinVGD` (Pyro's SVGD machinery); ``step`` also reports ``perturbation``, the mean ||e_i||.

    Choices: the ascent follows the data term only (as SAM), not the prior; ρ = 0.05 (SAM's default).
    Cost: two forward+backward passes per particle and step.
    """

    name = "fhbi"
    config_class = FHBIConfig
    #: Data-parallel: the ascent's per-particle gradients are reduced to the global batch's mean before the kernel
    #: mixes them, and the descent is SVGD's data-parallel step taken at θ + e. Particle-parallel is not offered:
    #: ψ_i needs every particle's gradient (a gather of K·D values per step, what SVGD's particle mode avoids).
    distributed_modes = frozenset({"data"})

    def _make_svgd(self) -> SVGD:
        return SharpnessAwareSVGD(self.model, self.kernel, self.optim, self.num_particles, self.config.rho)

    @property
    def passes_per_step(self) -> int:
        return 2 * self.num_particles

    def _offset(self, particles: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """e (K, D) of the functional ascent at the particles (data mode's descent; one process uses
        :class:`SharpnessAwareSVGD`'s own loss)."""
        offset = (self.svgd.perturbation(particles, *args, **kwargs) if self.config.rho > 0
                  else torch.zeros_like(particles))
        self.svgd.last_perturbation = offset
        return offset

    def step(self, x: Any, y: torch.Tensor) -> dict[str, float]:
        terms = super().step(x, y)
        terms["perturbation"] = float(self.svgd.last_perturbation.norm(dim=-1).mean())
        return terms

    def state(self) -> dict[str, Any]:
        return {**super().state(), "rho": self.config.rho}
