"""TFB: training-free Bayesianization of trained LoRA point estimates (Shi et al., 2024/2025, arXiv 2412.05723).

Any point estimate of θ (MAP, each particle of an ensemble, IBDR, SVGD or FHBI) becomes a Gaussian (mixture)
posterior without training: per LoRA layer W = W0 + s·B A with B = U diag(d) Vᵀ, the factors are rotated to
B' = B V = U diag(d), A' = Vᵀ A (so B'A' = BA: the same function), and

    A'_ij ~ N(A'_ij, (σ / d_i)²),   B' and every non-LoRA entry of θ fixed,

which makes the noise of the full weight update s·B'(A' − E[A']) = s·σ U Z, Z ~ N(0, I): the paper's
low-rank isotropic Gaussian family with one scale σ (its Theorem 4.1). σ is the largest value whose drop in
performance on an anchor set of training data stays within a tolerance, found by bisection (the paper's
Algorithm 1). A direction with d_i = 0 (B has lower rank than r, e.g. B = 0 at initialisation) cannot carry
noise into W and gets none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .model import THETA, BayesianLoRA
from .params import ParamSpec, is_lora_a
from .posterior import ParticlePosterior, Posterior
from .predictive import predict_loader

Metric = Literal["accuracy", "nll"]


@dataclass
class TFBResult:
    """What :func:`bayesianize` found.

    :ivar posterior: the Bayesianized posterior: the rotated particles (same functions as the input ones),
        σ of shape (K,) (``per_particle``) or (), and the per-entry multipliers 1/d_i on the A' entries.
    :ivar sigma: σ_k per particle (K,), or one shared σ as a tensor of shape ().
    :ivar brackets: per search, (σ, next): σ satisfied the tolerance, ``next`` (the search's next step up) did not
        (None when the tolerance held up to the largest σ tried).
    :ivar history: per search, every (σ, drop) evaluated, in order.
    :ivar baseline: per search, the metric of the point estimate(s) on the anchor set.
    """

    posterior: ParticlePosterior
    sigma: torch.Tensor
    brackets: list[tuple[float, float | None]]
    history: list[list[tuple[float, float]]]
    baseline: list[float]

    def summary(self) -> dict[str, Any]:
        """Plain values for a results file."""
        return {"sigma": self.sigma.tolist(), "brackets": [list(b) for b in self.brackets],
                "evaluations": sum(len(h) for h in self.history), "baseline": self.baseline}


def lora_pairs(spec: ParamSpec) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA layer in θ, matched by replacing ``lora_A`` with ``lora_B``."""
    names = set(spec.names)
    pairs = [(name, name.replace("lora_A", "lora_B", 1)) for name in spec.names if is_lora_a(name)]
    missing = [b for _, b in pairs if b not in names]
    if missing:
        raise ValueError(f"TFB needs both LoRA factors in θ; B missing for {missing[:3]}")
    if not pairs:
        raise ValueError("TFB needs LoRA A and B factors in θ (tensors named '...lora_A...'/'...lora_B...'); "
                         "this model has none")
    return pairs


def low_rank_form(spec: ParamSpec, particles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated particles (K, D), relative scales w (K, D)) for particles (K, D).

    Per LoRA layer, with BᵀB = V diag(d²) Vᵀ: B' = B V, A' = Vᵀ A; w = 1/d_i on row i of A' (0 where
    d_i <= max(out, r)·eps·max(d), and on every entry outside the A factors).
    """
    rotated = particles.detach().clone()
    scale = torch.zeros_like(rotated)
    views, weights = spec.unflatten(rotated), spec.unflatten(scale)
    dims = dict(zip(spec.names, spec.shapes, strict=True))
    for a_name, b_name in lora_pairs(spec):
        num = particles.shape[0]
        a = views[a_name].reshape(num, dims[a_name][0], -1)
        b = views[b_name].reshape(num, dims[b_name][0], -1)
        if b.shape[-1] != a.shape[1]:
            raise ValueError(f"{b_name} has {b.shape[-1]} columns but {a_name} has rank {a.shape[1]} rows")
        gram = b.transpose(-1, -2).double() @ b.double()
        eigenvalues, vectors = torch.linalg.eigh(gram)
        singular = eigenvalues.clamp_min(0).sqrt()
        tolerance = max(b.shape[1], b.shape[2]) * torch.finfo(b.dtype).eps * singular.amax(-1, keepdim=True)
        inverse = torch.where(singular > tolerance, 1.0 / singular.clamp_min(1e-300), torch.zeros_like(singular))
        vectors = vectors.to(b.dtype)
        views[b_name].copy_((b @ vectors).reshape(views[b_name].shape))
        views[a_name].copy_((vectors.transpose(-1, -2) @ a).reshape(views[a_name].shape))
        row_scale = inverse.to(b.dtype).unsqueeze(-1).expand(a.shape)
        weights[a_name].copy_(row_scale.reshape(weights[a_name].shape))
    return rotated, scale


def _metric(probs: torch.Tensor, targets: torch.Tensor, metric: Metric) -> float:
    """Accuracy, or NLL, of the mean predictive of probs (S, N, C)."""
    mean = probs.mean(0)
    if metric == "accuracy":
        return float((mean.argmax(-1) == targets).float().mean())
    return float(-mean.gather(-1, targets.unsqueeze(-1)).clamp_min(1e-12).log().mean())


def drop_in(metric: Metric, baseline: float, value: float) -> float:
    """The loss of performance: accuracy lost (absolute), or the NLL's relative increase."""
    if metric == "accuracy":
        return baseline - value
    return (value - baseline) / max(abs(baseline), 1e-12)


def bisect(drop: Callable[[float], float], tolerance: float, upper: float, iterations: int,
           max_doublings: int = 10) -> tuple[float, float | None, list[tuple[float, float]]]:
    """The largest σ with drop(σ) <= tolerance, by bisection on [0, upper].

    If the tolerance still holds at ``upper``, the upper end doubles first (at most ``max_doublings`` times).
    Returns (σ, next, history): drop(σ) <= tolerance < drop(next), next − σ = the final bracket width (next is
    None, with a warning, when the tolerance held at every upper end tried).
    """
    history: list[tuple[float, float]] = []

    def within(sigma: float) -> bool:
        value = drop(sigma)
        history.append((sigma, value))
        return value <= tolerance

    low, high = 0.0, upper
    for _ in range(max_doublings):
        if not within(high):
            break
        low, high = high, 2 * high
    else:
        warnings.warn(f"TFB: the tolerance {tolerance} still holds at sigma = {low}; keeping that value",
                      stacklevel=3)
        return low, None, history
    for _ in range(iterations):
        middle = (low + high) / 2
        if within(middle):
            low = middle
        else:
            high = middle
    return low, high, history


def bayesianize(
    model: BayesianLoRA,
    posterior: Posterior,
    loader: Iterable[tuple[Any, torch.Tensor]],
    *,
    tolerance: float = 0.01,
    metric: Metric = "accuracy",
    num_samples: int = 8,
    upper: float = 0.05,
    iterations: int = 8,
    per_particle: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> TFBResult:
    """Training-free Bayesianization of a point-estimate posterior (TFB, Shi et al., Algorithm 1).

    :param posterior: K point masses (a :class:`ParticlePosterior` with σ = 0 and no test-time dropout).
    :param loader: the anchor set: re-iterable batches (x, y) of TRAINING data (the paper draws a subset of
        the training split); never the test split.
    :param tolerance: the largest admissible drop: accuracy points lost (``metric="accuracy"``, absolute,
        e.g. 0.01 = one point) or the relative increase of the NLL (``metric="nll"``).
    :param num_samples: S posterior draws per evaluation, with the same noise at every σ (common random
        numbers, so the drop is a deterministic function of σ).
    :param upper: the initial upper end of the search (doubled while the tolerance still holds there).
    :param iterations: bisection steps; the final bracket is (upper end)/2^iterations wide.
    :param per_particle: one σ_k per particle, each searched on that particle's own predictive (the
        particle Bayesianized alone); else one σ for the mixture's predictive.
    :raises ValueError: for a posterior that is not K point masses, θ without LoRA factors, or bad settings.
    """
    if not isinstance(posterior, ParticlePosterior) or not posterior.is_point_mass or posterior.dropout_at_test:
        raise ValueError("TFB Bayesianizes point estimates: pass a ParticlePosterior with sigma = 0 "
                         f"(got {type(posterior).__name__})")
    if metric not in ("accuracy", "nll"):
        raise ValueError(f"metric must be 'accuracy' or 'nll', got {metric!r}")
    if not tolerance >= 0 or not upper > 0 or iterations < 1 or num_samples < 1:
        raise ValueError(f"need tolerance >= 0, upper > 0, iterations >= 1, num_samples >= 1; got {tolerance}, "
                         f"{upper}, {iterations}, {num_samples}")
    rotated, scale = low_rank_form(model.spec, posterior.particles)
    generator = torch.Generator().manual_seed(seed)

    def evaluate(thetas: torch.Tensor) -> float:
        probs, targets = predict_loader(model, {THETA: thetas}, loader, device=device)
        return _metric(probs, targets, metric)

    groups = [[k] for k in range(len(rotated))] if per_particle else [list(range(len(rotated)))]
    sigmas, brackets, histories, baselines = [], [], [], []
    for members in groups:
        count = math.ceil(num_samples / len(members)) * len(members)  # every member drawn equally often
        component = torch.tensor(members)[torch.arange(count) % len(members)]
        means, weights = rotated[component], scale[component]
        noise = torch.randn(means.shape, generator=generator).to(means)
        baseline = evaluate(rotated[members])
        sigma, following, history = bisect(
            lambda s, m=means, w=weights, z=noise, b=baseline: drop_in(metric, b, evaluate(m + s * w * z)),
            tolerance, upper, iterations,
        )
        sigmas.append(sigma)
        brackets.append((sigma, following))
        histories.append(history)
        baselines.append(baseline)
    sigma = torch.tensor(sigmas, dtype=rotated.dtype) if per_particle else torch.tensor(sigmas[0], dtype=rotated.dtype)
    return TFBResult(ParticlePosterior(rotated, sigma, relative_scale=scale), sigma, brackets, histories, baselines)
