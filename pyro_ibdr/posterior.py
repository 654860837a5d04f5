"""What every inference method returns: a posterior over θ that can be sampled and saved."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .metrics import EnsembleMode
from .model import THETA
from .registry import register_subclass

if TYPE_CHECKING:
    from .functional import Inputs
    from .model import BayesianLoRA
#: Draws used for prediction from a continuous posterior when no number is given.
DEFAULT_NUM_SAMPLES = 8


class Posterior(ABC):
    """A distribution over the flat adapter vector θ ∈ R^D.

    ``sample(S)`` gives ``{"theta": (S, D)}`` for :func:`~pyro_ibdr.predictive_probs`. ``dropout_at_test``
    marks posteriors whose predictive also samples dropout masks (MC dropout): the network's dropout modules are
    then switched on while predicting (:func:`~pyro_ibdr.dropout.dropout_mode`). Subclasses that set their own
    ``kind`` are registered under it for checkpoints (a subclass without one does not replace its parent; a
    taken kind is an error).
    ``prediction`` is how the S per-sample predictions combine into the
    ensemble: ``"mean_probs"`` (the Bayesian model average) or ``"mean_logits"`` (for particles trained
    jointly through the mean of their logits, as by the IBDR authors' code); :func:`~pyro_ibdr.evaluate` and
    checkpoints honour it.

    How many draws prediction uses is settled in one place, :meth:`num_draws`: a posterior that is a finite
    set of equally weighted point masses (:attr:`natural_num_samples`) is evaluated on each point exactly
    once, because repeated draws of one point would bias the diversity metrics (disagreement, DPP volume).

    ``own_predictive`` marks posteriors whose predictive is not the network at θ samples (the linearised Laplace
    predictive): :func:`~pyro_ibdr.predictive_probs` and :func:`~pyro_ibdr.predict_loader` then call
    :meth:`predict` instead.
    """

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Posterior]]] = {}
    dropout_at_test: bool = False
    own_predictive: ClassVar[bool] = False
    prediction: EnsembleMode = "mean_probs"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_subclass(Posterior.registry, cls, "kind")

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

    @property
    def natural_num_samples(self) -> int | None:
        """The number of distinct equally weighted points when the posterior is a finite set of them, else None."""
        return None

    @property
    def default_num_samples(self) -> int:
        """S when none is given: the natural number, else :data:`DEFAULT_NUM_SAMPLES`."""
        return self.natural_num_samples or DEFAULT_NUM_SAMPLES

    def num_draws(self, num_samples: int | None = None) -> int:
        """The number of draws S for prediction: ``None`` gives :attr:`default_num_samples`.

        :raises ValueError: for S < 1, or an S that the posterior's draws cannot honour exactly (subclasses).
        """
        if num_samples is None:
            return self.default_num_samples
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (an integer, or None), got {num_samples!r}")
        return num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tensors": self.tensors(), "dropout_at_test": self.dropout_at_test,
                "prediction": self.prediction}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> Posterior:
        kind = state.get("kind")
        if kind not in Posterior.registry:
            raise ValueError(f"unknown posterior kind {kind!r}; known: {sorted(Posterior.registry)}")
        posterior = Posterior.registry[kind](**state["tensors"])
        posterior.dropout_at_test = bool(state.get("dropout_at_test", False))
        posterior.prediction = state.get("prediction", "mean_probs")
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
    the LoRA A factors only (:func:`pyro_ibdr.tfb.bayesianize`).

    Draws are exactly stratified: draw s comes from component s mod K and S must be a multiple of K, so each
    component gets S/K draws. Point masses (every σ_i w_i = 0, no dropout at test) are predicted with S = K,
    each particle once; a mixture with noise (or dropout) with any multiple of K, by default the smallest one ≥ 8.

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

    @property
    def natural_num_samples(self) -> int | None:
        return self.num_particles if self.is_point_mass and not self.dropout_at_test else None

    @property
    def default_num_samples(self) -> int:
        k = self.num_particles
        return self.natural_num_samples or k * -(-DEFAULT_NUM_SAMPLES // k)

    def num_draws(self, num_samples: int | None = None) -> int:
        """S for prediction (see the class docstring).

        :raises ValueError: when S is not a multiple of K, or differs from K for point masses.
        """
        draws = super().num_draws(num_samples)
        if self.natural_num_samples is not None and draws != self.num_particles:
            masses = f"{self.num_particles} point mass{'es' if self.num_particles > 1 else ''}"
            raise ValueError(
                f"the posterior is {masses}: predict with num_samples={self.num_particles} "
                f"(or None), each particle once; {draws} draws would repeat particles and bias the diversity metrics"
            )
        self._check_stratified(draws)
        return draws

    def _check_stratified(self, num_samples: int) -> None:
        if num_samples % self.num_particles:
            raise ValueError(
                f"{num_samples} draws cannot be stratified exactly over K = {self.num_particles} mixture components: "
                f"use a multiple of {self.num_particles}"
            )

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """S draws, S/K from each component (S must be a multiple of K)."""
        self._check_stratified(num_samples)
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
    """N equal-weight stored samples (SGLD's thinned chain, frozen draws); ``sample(S)`` gives the first S ≤ N,
    each once. Prediction uses all N by default."""

    kind = "samples"

    def __init__(self, samples: torch.Tensor) -> None:
        self.samples = _check_rows("samples", samples)

    @property
    def natural_num_samples(self) -> int:
        return self.samples.shape[0]

    def num_draws(self, num_samples: int | None = None) -> int:
        """S ≤ N (None: N).

        :raises ValueError: for S > N, which would repeat stored samples.
        """
        draws = super().num_draws(num_samples)
        if draws > self.natural_num_samples:
            raise ValueError(f"the posterior holds {self.natural_num_samples} samples; {draws} draws would repeat "
                             f"some of them: use num_samples <= {self.natural_num_samples} (or None)")
        return draws

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The first S stored samples (S ≤ N)."""
        return {THETA: self.samples[: self.num_draws(num_samples)]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples}
