"""Stochastic-gradient Langevin dynamics on θ, keeping a thinned chain."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine

from ..functional import Inputs
from ..model import THETA, BayesianLoRA
from ..posterior import EmpiricalPosterior, Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class SGLDConfig(MethodConfig):
    """Burn-in steps, thinning interval, the number of kept samples and the temperature T."""

    burn_in: int = 100
    thin: int = 10
    num_samples: int = 20
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.burn_in < 0 or self.thin < 1 or self.num_samples < 1:
            raise ValueError(
                f"need burn_in >= 0, thin >= 1, num_samples >= 1; got {self.burn_in}, {self.thin}, {self.num_samples}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


class SGLD(Method):
    r"""Welling & Teh (2011) at temperature T:

        θ ← θ − (ε/2) ∇U(θ) + N(0, ε T I),    U(θ) = −log p(θ) − (N/B) Σ_b log p(y_b | x_b, θ).

    The step size is ε = 2·lr/N, so the drift is plain SGD with rate ``lr`` on the per-example loss U/N
    (schedules scale it); the noise has std √(εT). SGLD's ``lr`` is therefore always in the units of
    ``OptimSettings(objective_scale="per_example")``, whatever ``objective_scale`` says: a rate set for the
    ELBO units of the other methods corresponds to ``lr`` = N × that rate here.
    The chain starts at the LoRA initialisation θ0; after ``burn_in`` steps every ``thin``-th state is kept
    in a FIFO buffer of at most ``num_samples``. The optimiser settings other than ``lr`` are not used.
    """

    name = "sgld"
    config_class = SGLDConfig

    def __init__(
        self, model: BayesianLoRA, config: SGLDConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        c = self.config
        self.burn_in, self.thin, self.temperature = int(c.burn_in), int(c.thin), float(c.temperature)
        self.theta = model.theta0.clone()
        self.samples: deque[torch.Tensor] = deque(maxlen=int(c.num_samples))
        self.num_steps = 0
        self.generator = torch.Generator(device=self.theta.device).manual_seed(seed)

    @property
    def step_size(self) -> float:
        """ε = 2·lr/N."""
        return 2.0 * self.lr / self.model.num_data

    @property
    def passes_per_step(self) -> int:
        return 1

    def potential_and_grad(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U(θ), ∇U(θ)) at the current θ from the model's trace (the likelihood scaled by N/B)."""
        theta = self.theta.detach().requires_grad_(True)
        trace = poutine.trace(poutine.condition(self.model, data={THETA: theta})).get_trace(x, y)
        potential = -trace.log_prob_sum()
        (grad,) = torch.autograd.grad(potential, theta)
        return potential.detach(), grad

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        potential, grad = self.potential_and_grad(x, y)
        eps = self.step_size
        noise = torch.randn(self.theta.shape, generator=self.generator, device=self.theta.device)
        self.theta = self.theta - 0.5 * eps * grad + math.sqrt(eps * self.temperature) * noise
        self.num_steps += 1
        if self.num_steps > self.burn_in and (self.num_steps - self.burn_in) % self.thin == 0:
            self.samples.append(self.theta.clone())
        return {"loss": float(potential) / self.model.num_data, "step_size": eps}

    def posterior(self) -> Posterior:
        """The kept samples; during burn-in (none kept yet) the current state alone."""
        if not self.samples:
            return EmpiricalPosterior(self.theta.unsqueeze(0))
        return EmpiricalPosterior(torch.stack(list(self.samples)))

    def state(self) -> dict[str, Any]:
        return {"theta": self.theta.clone(), "num_steps": self.num_steps}
