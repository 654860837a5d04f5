"""IVON: variational learning with the ``ivon-opt`` optimiser, whose state is a diagonal Gaussian posterior over θ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine

from .. import distributed
from ..functional import Inputs
from ..model import THETA, BayesianLoRA
from ..posterior import GaussianPosterior, Posterior
from .base import Method, MethodConfig, OptimSettings


@dataclass(frozen=True)
class IVONConfig(MethodConfig):
    """IVON's settings (``ivon.IVON``'s arguments of the same names).

    ``ess`` (effective sample size λ) and ``weight_decay`` (δ) default to N and 1/(N s²), which makes the
    optimiser's prior the model's N(0, s²I); the others default to ivon-opt's own defaults.
    """

    ess: float | None = None
    weight_decay: float | None = None
    hess_init: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99999
    mc_samples: int = 1
    clip_radius: float = math.inf

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ess is not None and not self.ess > 0:
            raise ValueError(f"ess must be positive, got {self.ess}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.hess_init > 0:
            raise ValueError(f"hess_init must be positive, got {self.hess_init}")
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {self.mc_samples}")


class IVON(Method):
    r"""Improved Variational Online Newton (Shen et al., ICML 2024) through ``ivon-opt``'s ``ivon.IVON`` optimiser.

    The optimiser holds q(θ) = N(m, diag(1 / (λ (h + δ)))): mean m, Hessian estimate h, effective sample size λ
    and weight decay δ. Each step draws ``mc_samples`` θ ~ q (``sampled_params``), takes the gradient g of the
    per-example negative log-likelihood ℓ̄(θ) = −(1/B) Σ_b log p(y_b | x_b, θ) there, and updates

        ĝ ← β1 ĝ + (1 − β1) g,    h ← β2 h + (1 − β2) ĥ + ½ (1 − β2)² (h − ĥ)² / (h + δ),
        m ← m − α (ĝ/(1 − β1^t) + δ m) / (h + δ),

    with ĥ = λ g·(θ − m)(h + δ) (the reparameterisation-trick Hessian estimate) and α = lr·(h0 + δ)
    (ivon-opt's ``rescale_lr``). With λ = N the variational objective is the ELBO per example with prior
    N(0, 1/(N δ)), so δ = 1/(N s²) is the model's prior. The learning rate has the scale of an SGD step on ℓ̄
    (the first steps are m ← m − lr·ĝ while h ≈ h0): Adam-sized rates are too small. m starts at θ0.
    The posterior is the optimiser's Gaussian (loc m, scale (λ (h + δ))^{-1/2}).

    Data-parallel (:mod:`pyro_ibdr.distributed`, ``"data"``): each process backpropagates its shard at the shared
    weight sample (ivon-opt draws it from torch's global generator, which stays in step across processes) and the
    gradient is reduced to the global batch's mean before ivon-opt reads it for its gradient and Hessian
    estimates, so every process holds the same posterior.
    """

    name = "ivon"
    config_class = IVONConfig
    distributed_modes = frozenset({"data"})

    def __init__(
        self, model: BayesianLoRA, config: IVONConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        import ivon

        super().__init__(model, config, optim, seed=seed)
        c = self.config
        self.mc_samples = int(c.mc_samples)
        ess = float(c.ess) if c.ess is not None else float(model.num_data)
        weight_decay = (float(c.weight_decay) if c.weight_decay is not None
                        else 1.0 / (model.num_data * model.prior_scale**2))
        self.theta = torch.nn.Parameter(model.theta0.clone())
        self.optimizer = ivon.IVON(
            [self.theta], lr=self.lr, ess=ess, hess_init=c.hess_init, beta1=c.beta1, beta2=c.beta2,
            weight_decay=weight_decay, mc_samples=self.mc_samples, clip_radius=c.clip_radius,
        )
        self.num_steps = 0

    @property
    def group(self) -> dict[str, Any]:
        """The optimiser's one parameter group: ``hess`` (D,), ``ess``, ``weight_decay``, ``lr``, ..."""
        return self.optimizer.param_groups[0]

    @property
    def passes_per_step(self) -> int:
        return self.mc_samples

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        self.group["lr"] = lr

    def nll(self, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """ℓ̄(θ) = −(1/B) Σ_b log p(y_b | x_b, θ) at the optimiser's current (sampled) θ, from the model's trace."""
        trace = poutine.trace(poutine.condition(self.model, data={THETA: self.theta})).get_trace(x, y)
        return -trace.log_prob_sum(lambda name, site: name == "obs") / self.model.num_data

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        losses = []
        for _ in range(self.mc_samples):
            with self.optimizer.sampled_params(train=True):
                self.optimizer.zero_grad()
                loss = self.nll(x, y)
                loss.backward()
                distributed.reduce_gradients({"theta": self.theta}, len(y))
            losses.append(float(loss.detach()))
        self.optimizer.step()
        self.num_steps += 1
        return {"loss": sum(losses) / len(losses)}

    def loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, (λ (h + δ))^{-1/2}), each (D,): the optimiser's Gaussian."""
        group = self.group
        scale = (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt()
        return self.theta.detach().clone(), scale.detach().clone()

    def posterior(self) -> Posterior:
        return GaussianPosterior(*self.loc_scale())

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's mean m, momentum ĝ, Hessian estimate h and step count, with the rate and step counter
        (between steps ivon-opt keeps no other state: its per-step sample averages are reset by every step)."""
        group = self.group
        return {"theta": self.theta.detach().clone(), "momentum": group["momentum"].clone(),
                "hess": group["hess"].clone(), "current_step": int(self.optimizer.current_step),
                "num_steps": self.num_steps, "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        group = self.group
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        group["momentum"] = state["momentum"].to(self.theta.device)
        group["hess"] = state["hess"].to(self.theta.device)
        self.optimizer.current_step = state["current_step"]
        self.num_steps = state["num_steps"]
        self.set_lr(state["lr"])

    def state(self) -> dict[str, Any]:
        group = self.group
        return {"num_steps": self.num_steps, "ess": float(group["ess"]), "weight_decay": float(group["weight_decay"]),
                "hess_mean": float(group["hess"].mean())}
