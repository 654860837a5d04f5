"""Bayes-by-Backprop: a mean-field Gaussian over θ fitted with the analytic-KL ELBO."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from ..functional import Inputs
from ..model import THETA, BayesianLoRA
from ..posterior import GaussianPosterior, Posterior
from .base import Method, MethodConfig, OptimSettings


class _ScaleSite(Messenger):
    """Multiply the log-density scale of one named sample site by ``weight()`` (read at every call)."""

    def __init__(self, name: str, weight: Callable[[], float]) -> None:
        super().__init__()
        self.name = name
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == self.name:
            msg["scale"] = msg["scale"] * self.weight()


class MeanFieldGuide:
    """q(θ) = N(μ, diag σ²) sampled at the θ site itself, μ starting at θ0 and σ at ``init_scale``.

    Pyro's ``AutoNormal`` samples an auxiliary unconstrained site and passes θ through a ``Delta``, so
    ``TraceMeanField_ELBO`` finds no Normal at θ and falls back to a Monte-Carlo KL; this guide keeps the KL
    in closed form. σ is a ``softplus``-positive parameter, as in ``AutoNormal``.
    """

    def __init__(self, model: BayesianLoRA, init_scale: float, name: str) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self.init_loc = model.theta0.detach().clone()
        self.init_scale = float(init_scale)
        self.name = name

    @property
    def loc(self) -> torch.Tensor:
        return pyro.param(f"{self.name}.loc", lambda: self.init_loc.clone())

    @property
    def scale(self) -> torch.Tensor:
        return pyro.param(
            f"{self.name}.scale",
            lambda: torch.full_like(self.init_loc, self.init_scale),
            constraint=constraints.softplus_positive,
        )

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return pyro.sample(THETA, dist.Normal(self.loc, self.scale).to_event(1))


def check_mean_field(num_samples: int, init_scale: float) -> None:
    """The checks shared by the mean-field methods' configs."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")


@dataclass(frozen=True)
class BBBConfig(MethodConfig):
    """S reparameterised training samples per step, the initial posterior scale, KL-annealing steps T."""

    size_field = "num_samples"

    num_samples: int = 4
    init_scale: float = 1e-3
    kl_anneal_steps: int = 0

    def __post_init__(self) -> None:
        check_mean_field(self.num_samples, self.init_scale)
        if self.kl_anneal_steps < 0:
            raise ValueError(f"kl_anneal_steps must be >= 0, got {self.kl_anneal_steps}")


class BayesByBackprop(Method):
    """Blundell et al. (2015): q(θ) = N(μ, diag σ²) maximising

        E_q[(N/B) Σ_b log p(y_b | x_b, θ)] − w_t KL(q ‖ N(0, s²I)),

    with S reparameterised draws per step (vectorised) and the KL in closed form (``TraceMeanField_ELBO`` with
    :class:`MeanFieldGuide`). μ starts at the LoRA initialisation θ0 and σ at ``init_scale``: μ = 0 would put
    A = B = 0, a saddle point of LoRA with zero gradient. KL annealing: w_t = min(1, (t + 1)/T) for
    ``kl_anneal_steps`` = T > 0 (w = 1 otherwise), applied as a scale on the θ site of model and guide,
    which ``TraceMeanField_ELBO`` multiplies into the KL. Steps run in the units of ``optim.objective_scale``
    (``loss`` with them; ``kl`` is KL(q ‖ p) itself).
    """

    name = "bbb"
    config_class = BBBConfig

    def __init__(
        self, model: BayesianLoRA, config: BBBConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        self.num_samples = int(self.config.num_samples)
        self.num_steps = 0
        self.guide = MeanFieldGuide(model, self.config.init_scale, name=self.name)
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = self._build_svi()

    def _build_svi(self) -> SVI:
        anneal = _ScaleSite(THETA, lambda: self.kl_weight)
        elbo = TraceMeanField_ELBO(
            num_particles=self.num_samples, vectorize_particles=True, max_plate_nesting=self.model.max_plate_nesting
        )
        return SVI(anneal(self.model), anneal(self.guide), self.optim, elbo)

    @property
    def kl_anneal_steps(self) -> int:
        """T, the number of steps over which the KL weight rises to 1 (0: no annealing)."""
        return self.config.kl_anneal_steps

    @property
    def kl_weight(self) -> float:
        """w_t, the weight of the KL term at the current step."""
        if self.kl_anneal_steps == 0:
            return 1.0
        return min(1.0, (self.num_steps + 1) / self.kl_anneal_steps)

    @property
    def passes_per_step(self) -> int:
        return self.num_samples

    def loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ), each (D,)."""
        return self.guide.loc.detach().clone(), self.guide.scale.detach().clone()

    def kl(self) -> torch.Tensor:
        """KL(q ‖ p) = Σ_d [log(s/σ_d) + (σ_d² + μ_d²)/(2s²) − 1/2] at the current parameters."""
        loc, scale = self.loc_scale()
        prior = dist.Normal(torch.zeros_like(loc), self.model.prior_scale)
        return kl_divergence(dist.Normal(loc, scale), prior).sum()

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        weight = self.kl_weight
        with self.objective_units():
            loss = self.svi.step(x, y)
        self.num_steps += 1
        return {"loss": float(loss), "kl": float(self.kl()), "kl_weight": weight}

    def posterior(self) -> Posterior:
        return GaussianPosterior(*self.loc_scale())

    def state(self) -> dict[str, float | int]:
        return {"num_steps": self.num_steps, "kl_weight": self.kl_weight}
