"""The complexity term of IBDR: KL(Q ‖ P) between the particle mixture Q and the prior P = N(0, s²I).

Each term returns its value in ELBO units (as the evidence bound counts it, next to a likelihood summed over
the data set); :class:`~pyro_ibdr.IBDRLoss` multiplies it by the θ site's scale, so that under
``poutine.scale(scale=1/N)`` it stays in the units of the data term. β is the term's weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..model import THETA


def _loc_and_sigma(guide: Callable, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (hasattr(guide, "loc") and hasattr(guide, "scale")):
        raise ValueError(f"kl={kind!r} needs a guide with .loc (K, D) and .scale (σ); use kl='mc' for other guides")
    return guide.loc, guide.scale


def _prior_scale(model: Callable) -> float:
    return float(getattr(model, "prior_scale", 1.0))


class _Weighted:
    """A term with a weight β ≥ 0."""

    def __init__(self, weight: float = 1.0) -> None:
        if not weight >= 0:
            raise ValueError(f"the KL weight must be >= 0, got {weight}")
        self.weight = float(weight)


class PaperKL(_Weighted):
    r"""The paper's relaxed KL term, for Q = (1/K) Σ_i N(μ_i, σ²I) and P = N(0, s²I):

        (β/K) [ Σ_i ||μ_i||² / s² + d (σ/s − log(σ/s)) ],   d = dim θ.

    Source: the paper's practical objective, (β/K)[Σ_i ||μ_i||² + d(σ − log σ)] for s = 1; with a prior
    scale s every length is measured in units of s. For point masses (σ = 0) the σ part is infinite and
    constant; it is left out.
    """

    name = "paper"

    def __call__(self, guide, model, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor:
        loc, sigma = _loc_and_sigma(guide, self.name)
        s = _prior_scale(model)
        size, dim = loc.shape
        total = loc.pow(2).sum() / s**2
        if float(sigma.detach()) > 0:
            ratio = sigma / s
            total = total + dim * (ratio - ratio.log())
        return self.weight / size * total


class ExactKL(_Weighted):
    r"""The mean over components of the exact Gaussian KL, an upper bound on KL(Q ‖ P) (convexity):

        (β/K) Σ_i KL(N(μ_i, σ²I) ‖ N(0, s²I)) = (β/K) Σ_i ½ [ ||μ_i||²/s² + d (σ²/s² − 1 − log(σ²/s²)) ].

    Source: the standard Gaussian KL; the paper's term relaxes it. Infinite for point masses (σ = 0).
    """

    name = "exact"

    def __call__(self, guide, model, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor:
        loc, sigma = _loc_and_sigma(guide, self.name)
        if float(sigma.detach()) == 0:
            raise ValueError("kl='exact' is infinite for point-mass particles (sigma = 0); use 'paper' or 'none'")
        s = _prior_scale(model)
        size, dim = loc.shape
        variance_ratio = sigma.pow(2) / s**2
        per_component = 0.5 * (loc.pow(2).sum(-1) / s**2 + dim * (variance_ratio - 1 - variance_ratio.log()))
        return self.weight / size * per_component.sum()


class MonteCarloKL(_Weighted):
    r"""A one-sample estimate per drawn θ_p from the traces: β (1/P) Σ_p [log q(θ_p) − log p(θ_p)].

    For point masses log q = 0, so this is the MAP prior term −(β/P) Σ_p log p(θ_p). Works with any guide that
    samples θ itself (a ``ParticleGuide``, a mean-field Normal at θ), not with one that samples an auxiliary
    site and passes θ through a Delta (``AutoNormal``): log q(θ) would then be wrong.
    """

    name = "mc"

    def __call__(self, guide, model, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor:
        auxiliary = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                     and not site["is_observed"] and not site_is_subsample(site) and name != THETA]
        if auxiliary:
            raise ValueError(f"kl='mc' needs a guide that samples θ directly; this one also samples {auxiliary} "
                             "(e.g. AutoNormal's unconstrained site), so log q(θ) would be wrong")
        theta_site = guide_trace.nodes[THETA]
        log_q = theta_site["fn"].log_prob(theta_site["value"])
        log_p = model_trace.nodes[THETA]["fn"].log_prob(theta_site["value"])
        return self.weight * (log_q - log_p).mean()


class NoKL:
    """No complexity term (the authors' code; point-mass particles)."""

    name = "none"

    def __call__(self, guide, model, model_trace: poutine.Trace, guide_trace: poutine.Trace) -> torch.Tensor:
        return guide_trace.nodes[THETA]["value"].new_zeros(())


KLTerm = PaperKL | ExactKL | MonteCarloKL | NoKL
