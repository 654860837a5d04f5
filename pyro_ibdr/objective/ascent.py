"""The inner maximisation of IBDR: one ascent step θ' = θ + e per particle, from the ascent gradient g.

Every rule maps the gradient g (K, ..., D) of the per-example-mean ascent objective at the sampled θ to the
perturbation e = θ' − θ of the same shape. Two helpers prepare g: :func:`tie_shared` (a head shared by all
particles is one tensor, so its gradient is the sum over particles) and :func:`clip_global_norm`.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def _rows(grad: torch.Tensor) -> torch.Tensor:
    """g viewed as (K, D): one row per particle."""
    return grad.reshape(grad.shape[0], -1)


def tie_shared(grad: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """g with the shared entries (boolean mask (D,)) replaced by their sum over the K particles.

    A head shared by all particles is one tensor: the gradient of the joint ascent objective with respect to
    it is Σ_i ∂/∂head_i, and its perturbation is the same for every particle.
    """
    if shared is None or not bool(shared.any()):
        return grad
    return torch.where(shared, grad.sum(0, keepdim=True), grad)


def clip_global_norm(grad: torch.Tensor, max_norm: float, shared: torch.Tensor | None = None) -> torch.Tensor:
    """g scaled by min(1, max_norm / ||g||), the norm taken jointly over all particles (and the head).

    Shared entries (mask (D,), already tied by :func:`tie_shared`) count once, as the one tensor they are.
    Source: the authors' code (``clip_grad_norm_`` over all parameters before the ascent, max_norm 0.12–0.3).
    """
    rows = _rows(grad)
    if shared is None or not bool(shared.any()):
        squared = rows.pow(2).sum()
    else:
        own = rows[:, ~shared.reshape(-1)]
        squared = own.pow(2).sum() + rows[0, shared.reshape(-1)].pow(2).sum()
    factor = (max_norm / squared.sqrt().clamp_min(_TINY)).clamp(max=1.0)
    return grad * factor


class ClosedFormAscent:
    r"""The maximiser of the first-order expansion minus the squared-Euclidean transport cost:

        θ'_i = argmax_{θ'} [ l(θ_i) + gᵢᵀ(θ' − θ_i) − λ ||θ' − θ_i||² ] = θ_i + g_i / (2λ).

    Source: the paper (inner max of ℓ̃ with c = ||θ − θ'||², Algorithm 1's ascent step with α₁ = 1/(2λ));
    the authors' code uses the same step on the clipped joint gradient. The step shrinks as λ grows.
    """

    name = "closed_form"
    active = True
    uses_dual = True

    def __call__(self, grad: torch.Tensor, lam: float) -> torch.Tensor:
        return grad / (2.0 * lam)


class NormalisedAscent:
    r"""SAM's normalised step, per particle: θ'_i = θ_i + r g_i / ||g_i|| (λ plays no part).

    Source: Foret et al. (2021), "Sharpness-aware minimization"; the common practical alternative to the
    closed form named in the paper's discussion of the inner maximisation.
    """

    name = "sam"
    active = True
    uses_dual = False

    def __init__(self, radius: float) -> None:
        if not radius >= 0:
            raise ValueError(f"the SAM radius must be >= 0, got {radius}")
        self.radius = float(radius)

    def __call__(self, grad: torch.Tensor, lam: float) -> torch.Tensor:
        norms = _rows(grad).norm(dim=1).clamp_min(_TINY)
        return self.radius * grad / norms.view(-1, *([1] * (grad.dim() - 1)))


class NoAscent:
    """θ' = θ: no inner maximisation, so the loss skips the ascent pass (the ablation "ascent off"; deep
    ensembles; mixture-of-Gaussians VI)."""

    name = "none"
    active = False
    uses_dual = False


AscentRule = ClosedFormAscent | NormalisedAscent | NoAscent
