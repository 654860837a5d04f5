"""The dual variable λ of IBDR's Wasserstein constraint: transport costs and the projected dual step.

The objective holds λρ − λ c(θ, θ'): its derivative in λ is ρ − c, so a projected gradient step is
λ ← Π(λ − η(ρ − c)). λ rises while the realised cost c exceeds the budget ρ (shrinking the closed-form
ascent g/(2λ)) and falls while it is below. Costs are plain floats: λ is not a ``pyro.param``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ParameterCost:
    r"""The paper's squared-Euclidean cost in parameter space, averaged over particles:

        c(θ, θ') = (1/K) Σ_i ||θ'_i − θ_i||².

    Source: the paper (c in ℓ̃, the cost under which the closed-form ascent is g/(2λ)). ρ is in units of θ².
    """

    name = "parameter"

    def __call__(self, perturbation: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
        """c from e = θ' − θ (K, ..., D); the logits before/after (K, B, C) are not used."""
        return float(perturbation.detach().reshape(perturbation.shape[0], -1).pow(2).sum(1).mean())


class OutputCost:
    r"""The authors' cost in output space, with an exponential barrier above the budget ε:

        d = (1/B) Σ_b || softmax(z̄_b(θ')) − softmax(z̄_b(θ)) ||₂,   z̄ = (1/K) Σ_i z_i (mean of logits),
        d̃ = d · exp(max(0, d − ε) / τ),   τ = 0.01.

    Source: the authors' code (not the paper). ρ = ε is in units of a probability-vector distance (0 – √2).
    """

    name = "output"

    def __init__(self, epsilon: float, temperature: float = 0.01) -> None:
        if not temperature > 0:
            raise ValueError(f"the barrier temperature must be positive, got {temperature}")
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)

    def __call__(self, perturbation: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> float:
        """d̃ from the particles' logits (K, B, C) at θ (``before``) and θ' (``after``)."""
        p_before = before.detach().mean(0).softmax(-1)
        p_after = after.detach().mean(0).softmax(-1)
        distance = float((p_after - p_before).norm(dim=-1).mean())
        return distance * math.exp(max(0.0, distance - self.epsilon) / self.temperature)


TransportCost = ParameterCost | OutputCost


@dataclass(frozen=True)
class ProjectedDualStep:
    r"""λ ← clamp(λ − η_t (ρ − c), low, high), with η_t = η · m(t) when it follows the weights' schedule.

    Source: the paper's Algorithm 1 (λ ← λ − α_λ ∇_λ, projected onto λ ≥ 0; here onto [low, high] with low > 0
    for the closed-form ascent); the authors' code uses the weights' scheduled rate as η_t, ρ = ε and
    [low, high] = [0.5, 5]. λ lives in its own units, independent of the objective's scale.

    :param rho: ρ, the budget, in the units of the cost.
    :param step_size: η.
    :param bounds: the projection interval [low, high].
    :param follow_schedule: multiply η by the weights' schedule multiplier m(t) (passed at each step).
    """

    rho: float
    step_size: float
    bounds: tuple[float, float]
    follow_schedule: bool = False

    def __call__(self, lam: float, cost: float, schedule_factor: float = 1.0) -> float:
        rate = self.step_size * (schedule_factor if self.follow_schedule else 1.0)
        low, high = self.bounds
        return min(max(lam - rate * (self.rho - cost), low), high)
