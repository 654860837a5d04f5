"""What every inference method returns: a posterior over θ that can be sampled and saved."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .model import THETA


class Posterior(ABC):
    """A distribution over the flat adapter vector θ ∈ R^D.

    ``sample(S)`` gives ``{"theta": (S, D)}`` for :func:`~pyro_ibdr.predictive_probs`. ``dropout_at_test``
    marks posteriors whose predictive also samples dropout masks (MC dropout): the network is then run in
    training mode while predicting.
    """

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Posterior]]] = {}
    dropout_at_test: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Posterior.registry[cls.kind] = cls

    @abstractmethod
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"theta": (S, D)}``."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the posterior (for checkpoints)."""

    @property
    def dim(self) -> int:
        return next(iter(self.tensors().values())).shape[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tensors": self.tensors(), "dropout_at_test": self.dropout_at_test}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> Posterior:
        kind = state.get("kind")
        if kind not in Posterior.registry:
            raise ValueError(f"unknown posterior kind {kind!r}; known: {sorted(Posterior.registry)}")
        posterior = Posterior.registry[kind](**state["tensors"])
        posterior.dropout_at_test = bool(state.get("dropout_at_test", False))
        return posterior


def _check_rows(name: str, value: torch.Tensor) -> torch.Tensor:
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value.detach()


class ParticlePosterior(Posterior):
    """(1/K) Σ_i N(μ_i, σ_i² diag(w_i²)): K particles μ_i, each with a scale σ_i and per-entry multipliers w_i.

    ``sigma`` is one σ shared by all particles, shape (), or one per particle, shape (K,); σ = 0 gives K point
    masses (IBDR, deep ensembles, SVGD, MAP with K = 1). ``relative_scale`` (w, default 1: isotropic over all
    of θ) is shape (D,) or (K, D); it confines the noise to some entries and shapes it, e.g. TFB's noise on
    the LoRA A factors only (:func:`pyro_ibdr.tfb.bayesianize`). Draw s comes from component s mod K, so S = K
    draws visit every particle once.

    :raises ValueError: for a σ or w of the wrong shape, negative, or not finite.
    """

    kind = "particles"

    def __init__(self, particles: torch.Tensor, sigma: torch.Tensor | float = 0.0,
                 relative_scale: torch.Tensor | None = None) -> None:
        self.particles = _check_rows("particles", particles)
        num, dim = self.particles.shape
        self.sigma = torch.as_tensor(sigma, dtype=self.particles.dtype).detach()
        if self.sigma.shape not in ((), (1,), (num,)) or not torch.isfinite(self.sigma).all() or (self.sigma < 0).any():
            raise ValueError(f"sigma must be a scalar or one value per particle ({num}), finite and >= 0; got {sigma}")
        if self.sigma.shape == (1,):
            self.sigma = self.sigma.reshape(())
        self.relative_scale = None
        if relative_scale is not None:
            scale = relative_scale.detach().to(self.particles.dtype)
            if scale.shape not in ((dim,), (num, dim)) or not torch.isfinite(scale).all() or (scale < 0).any():
                raise ValueError(f"relative_scale must have shape ({dim},) or ({num}, {dim}), finite and >= 0; "
                                 f"got shape {tuple(scale.shape)}")
            self.relative_scale = scale

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    @property
    def is_point_mass(self) -> bool:
        """True when every component is a point mass (σ = 0 or w = 0 throughout)."""
        return bool((self.scales() == 0).all())

    def scales(self) -> torch.Tensor:
        """The per-entry standard deviations σ_i w_i of every component, (K, D)."""
        sigma = self.sigma.unsqueeze(-1) if self.sigma.dim() else self.sigma
        weight = self.relative_scale if self.relative_scale is not None else torch.ones_like(self.particles)
        return (sigma * weight).expand_as(self.particles)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        components = torch.arange(num_samples) % self.num_particles
        picked = self.particles[components]
        noise = torch.randn(picked.shape, generator=generator).to(picked)
        return {THETA: picked + self.scales()[components] * noise}

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"particles": self.particles, "sigma": self.sigma}
        if self.relative_scale is not None:
            tensors["relative_scale"] = self.relative_scale
        return tensors


class GaussianPosterior(Posterior):
    """N(loc, diag(scale²)): mean-field variational posteriors (Bayes-by-Backprop, SA-BNN)."""

    kind = "gaussian"

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        self.loc = _check_rows("loc", loc.reshape(1, -1))[0]
        self.scale = _check_rows("scale", scale.reshape(1, -1))[0]
        if self.scale.shape != self.loc.shape or (self.scale < 0).any():
            raise ValueError("scale must be non-negative with the shape of loc")

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        noise = torch.randn((num_samples, *self.loc.shape), generator=generator).to(self.loc)
        return {THETA: self.loc + self.scale * noise}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"loc": self.loc, "scale": self.scale}


class EmpiricalPosterior(Posterior):
    """Equal-weight stored samples (SGLD's thinned chain); draw s is stored sample s mod N."""

    kind = "samples"

    def __init__(self, samples: torch.Tensor) -> None:
        self.samples = _check_rows("samples", samples)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {THETA: self.samples[torch.arange(num_samples) % self.samples.shape[0]]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples}
