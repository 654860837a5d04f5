"""What every inference method returns: a posterior over θ that can be sampled and saved."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .model import THETA

if TYPE_CHECKING:
    from .functional import Inputs
    from .model import BayesianLoRA


class Posterior(ABC):
    """A distribution over the flat adapter vector θ ∈ R^D.

    ``sample(S)`` gives ``{"theta": (S, D)}`` for :func:`~pyro_ibdr.predictive_probs`. ``dropout_at_test``
    marks posteriors whose predictive also samples dropout masks (MC dropout): the network is then run in
    training mode while predicting. ``own_predictive`` marks posteriors whose predictive is not the network at
    θ samples (the linearised Laplace predictive): :func:`~pyro_ibdr.predictive_probs` and
    :func:`~pyro_ibdr.predict_loader` then call :meth:`predict` instead.
    """

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Posterior]]] = {}
    dropout_at_test: bool = False
    own_predictive: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Posterior.registry[cls.kind] = cls

    @abstractmethod
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"theta": (S, D)}``."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define the posterior (for checkpoints)."""

    def predict(
        self, model: BayesianLoRA, x: Inputs, num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample class probabilities (S, B, C), for a posterior with ``own_predictive``.

        ``generator`` (on the model's device) fixes the draws; called with equally seeded generators, every batch
        gets the same draws.

        :raises NotImplementedError: for posteriors that predict through θ samples.
        """
        raise NotImplementedError(f"{type(self).__name__} predicts through θ samples (use pyro_ibdr.predictive_probs)")

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
    """(1/K) Σ_i N(μ_i, σ² I); σ = 0 gives K point masses (IBDR, deep ensembles, SVGD, MAP with K = 1).

    Draw s comes from component s mod K, so S = K draws visit every particle once.
    """

    kind = "particles"

    def __init__(self, particles: torch.Tensor, sigma: torch.Tensor | float = 0.0) -> None:
        self.particles = _check_rows("particles", particles)
        self.sigma = torch.as_tensor(sigma, dtype=self.particles.dtype).detach()
        if self.sigma.numel() != 1 or not float(self.sigma) >= 0:
            raise ValueError(f"sigma must be a scalar >= 0, got {sigma}")

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        picked = self.particles[torch.arange(num_samples) % self.num_particles]
        noise = torch.randn(picked.shape, generator=generator).to(picked)
        return {THETA: picked + self.sigma.to(picked) * noise}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"particles": self.particles, "sigma": self.sigma}


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
