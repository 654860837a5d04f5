"""BLoB: Bayesian low-rank adaptation by backpropagation, a Gaussian variational posterior on the LoRA A factors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from .. import distributed
from ..functional import Inputs
from ..likelihood import log_likelihood
from ..model import THETA, BayesianLoRA
from ..params import is_lora_a
from ..posterior import GaussianPosterior, Posterior
from .base import Method, MethodConfig, OptimSettings, distributed_svi

#: The plate that vectorises the S training draws of one step.
SAMPLES_PLATE = "blob_samples"


class AsymmetricGuide:
    """q(θ): each LoRA ``A`` entry ~ N(m, σ²) with σ = g², every other entry of θ (``B``, heads) a point mass.

    Parameters: the mean μ of all of θ (starting at the LoRA initialisation θ0) and g over the A entries
    (starting at g ~ U(ε/√2, ε)). A draw is μ + scatter_A(g² ⊙ ε) with ε ~ N(0, I) sampled at an auxiliary
    site, the way Pyro's ``AutoContinuous`` guides draw, then recorded at θ through a ``Delta``.
    """

    def __init__(self, model: BayesianLoRA, init_scale: float, name: str, generator: torch.Generator) -> None:
        mask = model.spec.entry_mask(is_lora_a)
        if not mask.any():
            raise ValueError("BLoB needs LoRA A factors in θ (tensors named '...lora_A...'); this model has none")
        self.index = mask.nonzero().squeeze(-1).to(model.theta0.device)
        self.init_loc = model.theta0.detach().clone()
        low = init_scale / math.sqrt(2)
        self.init_g = (low + (init_scale - low) * torch.rand(len(self.index), generator=generator)).to(self.init_loc)
        self.name = name

    @property
    def loc(self) -> torch.Tensor:
        """μ (D,)."""
        return pyro.param(f"{self.name}.loc", lambda: self.init_loc.clone())

    @property
    def g(self) -> torch.Tensor:
        """g over the A entries (number of A entries,); σ_A = g²."""
        return pyro.param(f"{self.name}.g", lambda: self.init_g.clone())

    def scale(self) -> torch.Tensor:
        """Per-entry standard deviations of q over all of θ (D,): g² on the A entries, 0 elsewhere."""
        loc = self.loc
        return loc.new_zeros(loc.shape).scatter(0, self.index, self.g.pow(2))

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loc = self.loc
        noise = pyro.sample(f"{self.name}.noise", dist.Normal(loc.new_zeros(len(self.index)), 1.0).to_event(1),
                            infer={"is_auxiliary": True})
        scaled = noise * self.g.pow(2)
        shift = scaled.new_zeros((*scaled.shape[:-1], loc.shape[-1])).scatter(-1, self.index.expand_as(scaled), scaled)
        return pyro.sample(THETA, dist.Delta(loc + shift, event_dim=1))


@dataclass(frozen=True)
class BLoBConfig(MethodConfig):
    """S training draws per step, ε (g starts in U(ε/√2, ε), so σ in [ε²/2, ε²]), the prior scale β of A, the
    KL re-weighting switch, and M, the minibatches per epoch it cycles over (None: ⌈N/B⌉ from the first batch).
    """

    test_samples = 10

    num_samples: int = 1
    init_scale: float = 0.05
    prior_scale: float = 0.2
    kl_reweighting: bool = True
    batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        for name in ("init_scale", "prior_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {self.batches_per_epoch}")


class BLoB(Method):
    r"""Wang et al. (NeurIPS 2024), BLoB, "asymmetric Bayesianisation" of LoRA: per layer W = W0 + B A with

        q(A) = N(M, Ω²) entry-wise,  Ω = G ∘ G  (the paper's parameterisation, Sec. 3.4),   B deterministic,
        p(A) = N(0, β² I),   KL(q ‖ p) = Σ_ij [log(β/Ω_ij) + (Ω_ij² + M_ij²)/(2β²) − 1/2]   (closed form),

    which the paper shows equals the KL of the induced full-weight posterior against its low-rank prior
    (Theorem 3.2). This prior replaces the model's N(0, s² I) on θ: B and any head in θ are point estimates
    (variational parameters with no prior). Minibatch
    i of the M in an epoch minimises Blundell et al.'s (2015) re-weighted objective, in this library's units
    (the likelihood scaled to the data set, so that π_i = 1/M gives the ELBO):

        −(1/S) Σ_s (N/B) Σ_b log p(y_b | x_b, θ_s) + M π_i KL(q ‖ p),   π_i = 2^i / (2^{M+1} − 1)

    (the increasing weights of the authors' code; Σ_i π_i ≈ 1, so an epoch sums to the ELBO), times 1/N with
    ``optim.objective_scale="per_example"`` (``step`` logs ``loss`` in those units, ``data`` and ``kl`` as they
    are). The posterior
    is :class:`~pyro_ibdr.GaussianPosterior` with zero scale outside A; the paper predicts with N = 10 draws
    (``BLoBConfig.test_samples``). Defaults are the paper's: ε = 0.05, β = 0.2, S = 1.

    Simplifications: one draw of A per sample and minibatch instead of Flipout's per-example sign flips
    (same expected gradient, more variance); one optimiser for the whole objective, where the authors' code
    steps the KL with a separate SGD and weighs it against the per-example mean NLL.

    Data-parallel (:mod:`pyro_ibdr.distributed`, ``"data"``): the draws of A come from the guide's own seeded
    generator, the same on every process; the gradients are reduced to the global batch's (the KL's share is the
    same everywhere) and M counts global batches.
    """

    name = "blob"
    config_class = BLoBConfig
    distributed_modes = frozenset({"data"})

    def __init__(
        self, model: BayesianLoRA, config: BLoBConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        c = self.config
        self.num_samples = int(c.num_samples)
        self.prior_scale = float(c.prior_scale)
        self.batches_per_epoch = c.batches_per_epoch
        self.guide = AsymmetricGuide(model, c.init_scale, self.name, torch.Generator().manual_seed(seed))
        self.num_steps = 0
        self.terms: dict[str, float] = {}
        self.optim = self.optim_settings.pyro_optimizer()
        self.svi = distributed_svi(model, self.guide, self.optim, self._negative_objective)

    @property
    def passes_per_step(self) -> int:
        return self.num_samples

    def kl(self) -> torch.Tensor:
        """KL(q(A) ‖ N(0, β² I)), summed over every A entry (differentiable in the guide's parameters)."""
        mean = self.guide.loc[self.guide.index]
        prior = dist.Normal(torch.zeros_like(mean), self.prior_scale)
        return kl_divergence(dist.Normal(mean, self.guide.g.pow(2)), prior).sum()

    def kl_weight(self, step: int) -> float:
        """M π_i for the i-th minibatch of its epoch, i = step mod M + 1 (1 without re-weighting)."""
        if not self.config.kl_reweighting:
            return 1.0
        size = self.batches_per_epoch
        i = step % size + 1
        return size * 2.0 ** (i - size - 1) / (1.0 - 2.0 ** (-size - 1))

    def _negative_objective(self, model: BayesianLoRA, guide: AsymmetricGuide, x: Inputs, y: torch.Tensor
                            ) -> torch.Tensor:
        with pyro.plate(SAMPLES_PLATE, self.num_samples, dim=-(model.max_plate_nesting + 1)):
            theta = guide(x, y)
        data = log_likelihood(model, theta.squeeze(-2), x, y).mean()
        kl = self.kl()
        weight = self.kl_weight(self.num_steps)
        loss = self.optim_settings.scale_factor(model.num_data) * (-data + weight * kl)
        self.terms = {"loss": float(loss.detach()), "data": float(-data.detach()), "kl": float(kl.detach()),
                      "kl_weight": weight}
        return loss

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        if self.batches_per_epoch is None:
            self.batches_per_epoch = math.ceil(self.model.num_data / distributed.global_rows(len(y)))
        self.svi.step(x, y)
        self.num_steps += 1
        return dict(self.terms)

    def posterior(self) -> Posterior:
        return GaussianPosterior(self.guide.loc.detach().clone(), self.guide.scale().detach().clone())

    def state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "batches_per_epoch": self.batches_per_epoch}

    def state_dict(self) -> dict[str, Any]:
        """The default (param store, optimiser, rate) and the step count and epoch length that set the KL weight."""
        return {**super().state_dict(), **self.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.num_steps, self.batches_per_epoch = int(state["num_steps"]), state["batches_per_epoch"]
