"""BayesTune: Laplace-prior scales inferred by SGLD pick the entries of θ to fine-tune; only those are then trained."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pyro
import pyro.distributions as dist
import torch

from .. import distributed
from ..functional import Inputs
from ..likelihood import log_likelihood
from ..model import BayesianLoRA
from ..posterior import ParticlePosterior, Posterior
from .base import Method, MethodConfig, OptimSettings

#: λ is kept at or above this floor after every step (the authors' clamp).
SCALE_FLOOR = 1e-8


@dataclass(frozen=True)
class BayesTuneConfig(MethodConfig):
    """p, the fraction of θ's entries fine-tuned in stage 2; the stage-1 length (``selection_steps``, or the
    ``selection_fraction`` of the run that :func:`~pyro_ibdr.fit` plans) and the part of it that is burn-in;
    the Gamma(α, β) hyper-prior (shape, rate) of the Laplace scales λ, their initial value λ₀, their own
    learning rate, γ the SGLD noise discount, and N̂ (``effective_num_data``; None: the training-set size N).
    """

    keep_fraction: float = 0.1
    selection_steps: int | None = None
    selection_fraction: float = 0.5
    burn_in_fraction: float = 0.5
    shape: float = 0.01
    rate: float = 100.0
    init_scale: float = 1e-4
    scale_lr: float = 1e-4
    temperature: float = 1.0
    effective_num_data: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("keep_fraction", "selection_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.burn_in_fraction < 1:
            raise ValueError(f"burn_in_fraction must lie in [0, 1), got {self.burn_in_fraction}")
        if self.selection_steps is not None and self.selection_steps < 1:
            raise ValueError(f"selection_steps must be >= 1 or None, got {self.selection_steps}")
        for name in ("shape", "rate", "init_scale", "scale_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.effective_num_data is not None and not self.effective_num_data > 0:
            raise ValueError(f"effective_num_data must be positive or None, got {self.effective_num_data}")


class BayesTune(Method):
    r"""Kim & Hospedales (NeurIPS 2023), BayesTune, Algorithm 1, on the flat vector θ.

    Stage 1 samples (θ, λ) from the posterior of

        λ_d ~ Gamma(α, β),   θ_d | λ_d ~ Laplace(θ0_d, λ_d),   y | x, θ ~ Categorical(f(x; θ)),

    with SGLD (the paper's Eq. 5): each step follows the gradient of U/N̂, U = −log p(λ) − log p(θ | λ) −
    (N̂/B) Σ_b log p(y_b | x_b, θ), plus injected noise γ √(2/(N̂·lr)) ξ, ξ ~ N(0, I), as the authors' code
    does; with ``optimizer="sgd"`` this is SGLD with step size ε = 2·lr/N̂ and temperature γ², with Adam
    (the default here and in the authors' code) the noisy gradient is preconditioned. As for SGLD, ``lr`` is
    always in the per-example units of ``OptimSettings(objective_scale="per_example")``, whatever
    ``objective_scale`` says (the paper's own units). λ has its own rate
    (``scale_lr``) and is clamped at 1e-8 after each step. After burn-in, λ̂ accumulates the running mean of
    λ; at the end of stage 1 the k = round(p·D) entries with the largest λ̂ are selected, D counting the entries
    outside the new task head (peft's ``modules_to_save``): the head starts at zero and is always fine-tuned,
    since a head left at θ0 keeps the classifier constant (measured on the offline default: chance accuracy,
    stage-2 loss log C); the sparse selection is over the pre-trained part's adaptation. Stage 2 restarts
    from θ0 (the authors' stage 2 reloads the initial model) and minimises the plain per-example NLL over the
    selected entries only; every other entry stays exactly at θ0. The posterior is the stage-2 point estimate
    (during stage 1, the sampler's current θ).

    Setting: θ is whatever the model makes latent. With LoRA θ (the default) the selection is over the LoRA
    and head entries, a sparse LoRA; the paper's whole-model setting is the same code on a model whose θ is
    every backbone weight. N̂ is the paper's data-size hyper-parameter (default: the training-set size N, the
    actual posterior; a larger N̂ weakens the prior, which on small data sets otherwise pins most λ near its
    mode). Simplification: stage 1 takes a fixed share of the run's steps, so BayesTune costs the same
    number of passes as the other methods rather than two full trainings.

    Data-parallel (:mod:`pyro_ibdr.distributed`, ``"data"``): the gradients of U/N̂ (stage 1) and of the NLL
    (stage 2) are reduced to the global batch's before the step; the Langevin noise comes from the method's own
    seeded generator, the same on every process, so every process holds the same chain and selection.
    """

    name = "bayestune"
    config_class = BayesTuneConfig
    distributed_modes = frozenset({"data"})

    def __init__(
        self, model: BayesianLoRA, config: BayesTuneConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        c = self.config
        self.theta0 = model.theta0.detach().clone()
        self.effective_num_data = float(c.effective_num_data or model.num_data)
        self.head = model.spec.head_mask().to(self.theta0.device)
        self.num_selected = max(1, round(c.keep_fraction * int((~self.head).sum())))
        self.optim = self.optim_settings.pyro_optimizer()
        self.scale_optim = replace(self.optim_settings, lr=c.scale_lr).pyro_optimizer()
        self.generator = torch.Generator(device=self.theta0.device).manual_seed(seed)
        self.num_steps = 0
        self.num_accumulated = 0
        self.scale_mean: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None

    # -------------------------------------------------------------------------------------- schedule
    @property
    def selection_steps(self) -> int:
        """The length of stage 1: ``config.selection_steps``, else ``selection_fraction`` of the planned run."""
        if self.config.selection_steps is not None:
            return self.config.selection_steps
        if self.planned_steps is None:
            raise ValueError("BayesTune needs the length of stage 1: pass selection_steps=..., or train with "
                             "pyro_ibdr.fit, which plans it as selection_fraction of the run")
        return max(1, round(self.config.selection_fraction * self.planned_steps))

    @property
    def burn_in(self) -> int:
        """Stage-1 steps before λ̂ starts accumulating (at least one step is accumulated)."""
        return min(math.floor(self.config.burn_in_fraction * self.selection_steps), self.selection_steps - 1)

    @property
    def stage(self) -> int:
        return 1 if self.selected is None else 2

    @property
    def passes_per_step(self) -> int:
        return 1

    # ---------------------------------------------------------------------------------------- params
    def _theta(self) -> torch.Tensor:
        return pyro.param(f"{self.name}.theta", lambda: self.theta0.clone())

    def _scale(self) -> torch.Tensor:
        return pyro.param(f"{self.name}.scale", lambda: torch.full_like(self.theta0, self.config.init_scale))

    def _selected_values(self) -> torch.Tensor:
        return pyro.param(f"{self.name}.selected", lambda: self.theta0[self.selected].clone())

    def theta(self) -> torch.Tensor:
        """The current θ (D,): stage 2's θ0 with the selected entries replaced, or stage 1's sample."""
        if self.stage == 1:
            return self._theta().detach().clone()
        return self.theta0.index_put((self.selected,), self._selected_values().detach())

    # ------------------------------------------------------------------------------------------ steps
    def potential(self, theta: torch.Tensor, scale: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """U/N̂ = −[log p(λ) + log p(θ | λ)]/N̂ − (1/B) Σ_b log p(y_b | x_b, θ) on a minibatch."""
        c = self.config
        log_hyper = dist.Gamma(torch.tensor(c.shape).to(scale), torch.tensor(c.rate).to(scale)).log_prob(scale).sum()
        log_prior = dist.Laplace(self.theta0, scale).log_prob(theta).sum()
        mean_log_lik = log_likelihood(self.model, theta, x, y) / self.model.num_data
        return -(log_hyper + log_prior) / self.effective_num_data - mean_log_lik

    def _langevin_noise(self, like: torch.Tensor, lr: float) -> torch.Tensor:
        std = self.config.temperature * math.sqrt(2.0 / (self.effective_num_data * lr))
        return std * torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _sample_step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        theta, scale = self._theta(), self._scale()
        potential = self.potential(theta, scale, x, y)
        potential.backward()
        theta_u, scale_u = theta.unconstrained(), scale.unconstrained()
        distributed.reduce_gradients({"theta": theta_u, "scale": scale_u}, len(y))
        theta_u.grad += self._langevin_noise(theta_u, self.lr)
        scale_u.grad += self._langevin_noise(scale_u, self.config.scale_lr)
        self.optim([theta_u])
        self.scale_optim([scale_u])
        pyro.infer.util.zero_grads([theta_u, scale_u])
        with torch.no_grad():
            scale_u.clamp_(min=SCALE_FLOOR)
        self.num_steps += 1
        if self.num_steps > self.burn_in:
            self._accumulate(scale_u.detach())
        if self.num_steps == self.selection_steps:
            self.selected = self._select(self.scale_mean)
        return {"loss": float(potential.detach()), "stage": 1.0, "scale_mean": float(scale_u.detach().mean())}

    def _top_k(self, scale_mean: torch.Tensor) -> torch.Tensor:
        """The indices of the k = round(p · D_adapter) entries outside the head with the largest λ̂."""
        return torch.topk(scale_mean.masked_fill(self.head, -math.inf), self.num_selected).indices

    def _select(self, scale_mean: torch.Tensor) -> torch.Tensor:
        """The entries fine-tuned in stage 2, sorted: the top-k adapter entries by λ̂ and every head entry."""
        return torch.cat([self._top_k(scale_mean), self.head.nonzero().squeeze(1)]).sort().values

    def _accumulate(self, scale: torch.Tensor) -> None:
        """λ̂ ← (1 − ζ) λ̂ + ζ λ with ζ = 1/(number of accumulated samples + 1)."""
        zeta = 1.0 / (self.num_accumulated + 1)
        self.scale_mean = scale.clone() if self.scale_mean is None else (1 - zeta) * self.scale_mean + zeta * scale
        self.num_accumulated += 1

    def _fine_tune_step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        values = self._selected_values()
        theta = self.theta0.index_put((self.selected,), values)
        loss = -log_likelihood(self.model, theta, x, y) / self.model.num_data
        loss.backward()
        values_u = values.unconstrained()
        distributed.reduce_gradients({"selected": values_u}, len(y))
        self.optim([values_u])
        pyro.infer.util.zero_grads([values_u])
        self.num_steps += 1
        return {"loss": float(loss.detach()), "stage": 2.0}

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        return self._sample_step(x, y) if self.stage == 1 else self._fine_tune_step(x, y)

    def posterior(self) -> Posterior:
        return ParticlePosterior(self.theta().unsqueeze(0))

    def state_dict(self) -> dict[str, Any]:
        """The default (param store, θ's optimiser, rate) and BayesTune's own state: the λ optimiser, the
        Langevin noise generator, the step counters, the running mean λ̂ and the selected entries."""
        return {**super().state_dict(), "scale_optim": self.scale_optim.get_state(),
                "generator": self.generator.get_state(), "num_steps": self.num_steps,
                "num_accumulated": self.num_accumulated, "scale_mean": self.scale_mean, "selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale_optim.set_state(state["scale_optim"])
        self.generator.set_state(state["generator"])
        self.num_steps, self.num_accumulated = int(state["num_steps"]), int(state["num_accumulated"])
        self.scale_mean, self.selected = state["scale_mean"], state["selected"]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_steps": self.num_steps, "stage": self.stage, "num_selected": self.num_selected}
        if self.config.selection_steps is not None or self.planned_steps is not None:
            state["selection_steps"] = self.selection_steps
        if self.selected is not None:
            state["scale_threshold"] = float(self.scale_mean[self._top_k(self.scale_mean)].min())
            state["num_head_entries"] = int(self.head.sum())
        return state
