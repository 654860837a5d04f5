"""IBDRLoss: the IBDR objective as a Pyro ELBO (DRO ascent + dual variable + DPP diversity + KL)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from .model import DATA_PLATE, LOGITS, THETA
from .objective import (
    AscentRule,
    ClosedFormAscent,
    DataTerm,
    DiversityTerm,
    EnsembleCrossEntropy,
    ExactKL,
    KLTerm,
    LogVolume,
    MonteCarloKL,
    NoAscent,
    NoKL,
    NormalisedAscent,
    OutputCost,
    PaperKL,
    ParameterCost,
    ParticleCrossEntropy,
    ProjectedDualStep,
    TransportCost,
    Volume,
    clip_global_norm,
    tie_shared,
)

PARTICLE_PLATE = "ibdr_particles"
#: The observed label site of the model.
OBS = "obs"


@dataclass(frozen=True)
class IBDRSettings:
    """Every switch of the IBDR objective as plain values; :meth:`build` turns them into the pieces of
    :mod:`pyro_ibdr.objective` (the one place where names resolve). The defaults are the paper's objective.

    :param alpha: weight α of the diversity term (0: diversity off).
    :param diversity: ``"volume"`` (:class:`~pyro_ibdr.objective.Volume`, the paper) or ``"log_volume"``
        (:class:`~pyro_ibdr.objective.LogVolume`, the authors' code).
    :param jitter: j, added to the Gram matrix diagonal.
    :param data_loss: ``"per_particle"`` (:class:`~pyro_ibdr.objective.ParticleCrossEntropy`, the paper) or
        ``"ensemble"`` (:class:`~pyro_ibdr.objective.EnsembleCrossEntropy`, the authors' code).
    :param ascent: ``"closed_form"`` (θ' = θ + g/(2λ)), ``"sam"`` (θ' = θ + r g/||g|| per particle) or
        ``"none"`` (ascent off).
    :param sam_radius: r for ``ascent="sam"``.
    :param clip_norm: clip the joint ascent gradient of all particles to this norm first (authors: 0.12–0.3).
    :param cost: the transport cost of the dual step: ``"parameter"`` (c = mean_i ||θ'_i − θ_i||², the
        paper) or ``"output"`` (the authors' output-space d̃ with an exponential barrier above ρ).
    :param rho: ρ, the Wasserstein budget, in the units of ``cost``.
    :param lambda_init: λ₀.
    :param lambda_bounds: the projection interval of λ (keep the floor > 0 for the closed-form step).
    :param dual_lr: η, the step size of λ ← clamp(λ − η(ρ − c)). ``None`` stands for the weights' base
        learning rate (the authors' choice), which the ``ibdr`` method fills in; a bare ``IBDRLoss`` needs a
        number.
    :param dual_schedule: multiply η by the weights' schedule multiplier at every step
        (:attr:`IBDRLoss.schedule_factor`, kept up to date by the ``ibdr`` method).
    :param kl: ``"paper"``, ``"exact"``, ``"mc"`` or ``"none"`` (:mod:`pyro_ibdr.objective.kl`).
    :param kl_weight: β.
    """

    alpha: float = 0.02
    diversity: Literal["volume", "log_volume"] = "volume"
    jitter: float = 1e-7
    data_loss: Literal["per_particle", "ensemble"] = "per_particle"
    ascent: Literal["closed_form", "sam", "none"] = "closed_form"
    sam_radius: float = 0.05
    clip_norm: float | None = None
    cost: Literal["parameter", "output"] = "parameter"
    rho: float = 0.0025
    lambda_init: float = 1.0
    lambda_bounds: tuple[float, float] = (0.01, 1e4)
    dual_lr: float | None = 10.0
    dual_schedule: bool = False
    kl: Literal["paper", "exact", "mc", "none"] = "paper"
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        for field, allowed in _CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {tuple(allowed)}, got {getattr(self, field)!r}")
        low, high = self.lambda_bounds
        if not 0 <= low <= self.lambda_init <= high:
            raise ValueError(f"need 0 <= lambda_bounds[0] <= lambda_init <= lambda_bounds[1], got {low}, "
                             f"{self.lambda_init}, {high}")
        if self.ascent == "closed_form" and low <= 0:
            raise ValueError("the closed-form ascent step g/(2λ) needs a lambda floor > 0")
        for name in ("alpha", "jitter", "rho", "sam_radius", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm}")
        if self.dual_lr is not None and self.dual_lr < 0:
            raise ValueError(f"dual_lr must be >= 0 or None, got {self.dual_lr}")

    def build(self) -> IBDRPieces:
        """The pieces these settings name."""
        if self.dual_lr is None:
            raise ValueError(
                "dual_lr=None stands for the weights' learning rate, which only a training method knows; pass a "
                "number, e.g. IBDRLoss(settings, dual_lr=lr)"
            )
        return IBDRPieces(
            data=_DATA[self.data_loss](),
            diversity=_DIVERSITY[self.diversity](self.jitter),
            ascent=_ascent(self.ascent, self.sam_radius),
            cost=ParameterCost() if self.cost == "parameter" else OutputCost(self.rho),
            dual=ProjectedDualStep(self.rho, self.dual_lr, self.lambda_bounds, self.dual_schedule),
            kl=NoKL() if self.kl == "none" else _KL[self.kl](self.kl_weight),
        )


_DATA = {"per_particle": ParticleCrossEntropy, "ensemble": EnsembleCrossEntropy}
_DIVERSITY = {"volume": Volume, "log_volume": LogVolume}
_KL = {"paper": PaperKL, "exact": ExactKL, "mc": MonteCarloKL}
_CHOICES = {
    "diversity": _DIVERSITY,
    "data_loss": _DATA,
    "ascent": ("closed_form", "sam", "none"),
    "cost": ("parameter", "output"),
    "kl": (*_KL, "none"),
}


def _ascent(kind: str, radius: float) -> AscentRule:
    if kind == "closed_form":
        return ClosedFormAscent()
    return NormalisedAscent(radius) if kind == "sam" else NoAscent()


@dataclass
class IBDRPieces:
    """The named pieces of one IBDR objective (see :mod:`pyro_ibdr.objective`)."""

    data: DataTerm
    diversity: DiversityTerm
    ascent: AscentRule
    cost: TransportCost
    dual: ProjectedDualStep
    kl: KLTerm


class IBDRLoss(ELBO):
    r"""Interactive Bayesian Distributional Robustness (Pham et al., ICML 2025) for ``pyro.infer.SVI``.

    With K particles θ_i = μ_i + σ ε_i drawn from a :class:`~pyro_ibdr.ParticleGuide`, one step minimises the
    paper's practical objective

        λρ + (1/K) Σ_i [ l(θ'_i) + α l_div(θ'_i, θ_{−i}) − λ c(θ_i, θ'_i) ] + KL term,

    in four pieces (:attr:`pieces`, built from :class:`IBDRSettings`):

    1. ascent: e = θ' − θ from the gradient g of the per-example-mean ascent objective l + α l_div at θ
       (optionally tied for a shared head and clipped);
    2. descent: the data and diversity terms at θ' = θ + e with e held constant (SAM's approximation): μ
       receives ∇l(θ'), σ receives ∇l(θ')·ε; plus the KL term;
    3. dual: λ ← clamp(λ − η(ρ − c)), after the step, when the ascent uses λ;
    4. the realised terms go to :attr:`terms` (``loss``, ``data``, ``diversity``, ``kl``, ``cost``, ``lambda``,
       ``step_norm`` = mean_i ||θ'_i − θ_i||, ``theta_norm`` = mean_i ||θ_i||).

    **Units.** The data terms are the model's scaled log-likelihood: in ELBO units (Pyro's default) the
    minibatch sum scaled to the data set, (N/B) Σ_b; under ``poutine.scale(scale=1/N)`` around the step (what
    ``OptimSettings(objective_scale="per_example")`` does) the per-example mean. The KL term is multiplied by
    the θ site's scale, so it stays in the same units. The ascent always uses per-example means (the scale of
    the paper's ℓ̃) and λ has its own step size: neither depends on the objective's scale.

    **Site contract.** The guide samples θ at a site named ``"theta"`` with event shape (D,); the model
    samples ``"theta"`` from its prior, records the class logits (B, C) at a deterministic site ``"logits"``
    and observes the labels (B,) at a Categorical site ``"obs"`` inside its data plate (``"data"``, the only
    plate: ``max_plate_nesting = 1``). The loss runs model and guide inside a particle plate of size K at dim
    −2, so θ arrives as (K, 1, D) and the logits as (K, B, C). :class:`~pyro_ibdr.BayesianLoRA` follows this
    contract; a missing site is an error naming it, and so is a step without labels (``svi.step(x)``).

    **Pyro's interfaces.** ``SVI(model, guide, optim, IBDRLoss(...))`` (``loss_and_grads``),
    ``evaluate_loss``/:meth:`loss` (no gradients kept, λ unchanged, works under ``no_grad``), and the
    ``ELBOModule`` path for plain torch loops: ``loss_fn = IBDRLoss()(model, guide)`` calls
    :meth:`differentiable_loss`. Like ``loss_and_grads``, one call of :meth:`differentiable_loss` is one
    training step's objective and updates λ. ``ParticleGuide`` keeps its parameters in Pyro's param store,
    so a torch optimiser takes them from there (``pyro.get_param_store().named_parameters()``).
    """

    def __init__(self, settings: IBDRSettings | None = None, **overrides: Any) -> None:
        super().__init__(num_particles=1, max_plate_nesting=1)
        self.settings = replace(settings or IBDRSettings(), **overrides)
        self.pieces = self.settings.build()
        self.lam = self.settings.lambda_init
        #: The weights' schedule multiplier m(t) of the current step (read by a dual rule that follows it).
        self.schedule_factor = 1.0
        self.terms: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- traces
    def _vectorized(self, fn: Callable, size: int) -> Callable:
        def wrapped(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, size, dim=-(self.max_plate_nesting + 1)):
                return fn(*args, **kwargs)

        return wrapped

    def _num_particles(self, guide: Callable) -> int:
        return int(getattr(guide, "num_particles", self.num_particles))

    def _get_trace(self, model, guide, args, kwargs):
        """Guide trace (θ with its graph to μ, σ) and the model replayed at θ, all K particles at once."""
        size = self._num_particles(guide)
        guide_trace = poutine.trace(self._vectorized(guide, size)).get_trace(*args, **kwargs)
        if THETA not in guide_trace.nodes:
            raise ValueError(f"IBDRLoss needs a guide that samples a site named {THETA!r} (the flat adapter vector, "
                             f"event shape (D,)); the guide's sites are {_site_names(guide_trace)}")
        model_trace = poutine.trace(poutine.replay(self._vectorized(model, size), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        _check_model_sites(model_trace)
        return model_trace, guide_trace

    def _model_at(self, model, theta: torch.Tensor, args, kwargs) -> poutine.Trace:
        conditioned = poutine.condition(self._vectorized(model, theta.shape[0]), data={THETA: theta})
        return poutine.trace(conditioned).get_trace(*args, **kwargs)

    @staticmethod
    def _predictions(trace: poutine.Trace, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(logits (K, B, C), labels (B,), likelihood scale: N/B in ELBO units)."""
        obs = trace.nodes[OBS]
        logits = trace.nodes[LOGITS]["value"]
        return logits.reshape(size, *logits.shape[-2:]), obs["value"], float(obs["scale"])

    # ------------------------------------------------------------------------------------- objective
    def _diversity(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """α l_div per example (B,); zeros when α = 0."""
        if self.settings.alpha == 0:
            return logits.new_zeros(logits.shape[1])
        return self.settings.alpha * self.pieces.diversity(logits.softmax(-1), targets)

    def _perturbation(self, logits: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor,
                      shared: torch.Tensor | None) -> torch.Tensor:
        """e = θ' − θ: the ascent rule on the (tied, clipped) gradient of the per-example-mean ascent objective."""
        objective = self.pieces.data.ascent(logits, targets).mean() + self._diversity(logits, targets).mean()
        (grad,) = torch.autograd.grad(objective, theta)
        grad = tie_shared(grad.detach(), shared)
        if self.settings.clip_norm is not None:
            grad = clip_global_norm(grad, self.settings.clip_norm, shared)
        return self.pieces.ascent(grad, self.lam)

    def _objective(self, model, guide, args, kwargs, update_dual: bool) -> torch.Tensor:
        size = self._num_particles(guide)
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        theta_site = guide_trace.nodes[THETA]
        theta = theta_site["value"]
        if theta.shape[0] != size:
            raise ValueError(f"the guide drew theta of shape {tuple(theta.shape)}; expected {size} particles first")

        logits, targets, scale = self._predictions(model_trace, size)
        perturbation, after = torch.zeros_like(theta), logits
        if self.pieces.ascent.active:
            perturbation = self._perturbation(logits, targets, theta, getattr(guide, "shared_mask", None))
            after, targets, scale = self._predictions(self._model_at(model, theta + perturbation, args, kwargs), size)
        data_term = scale * self.pieces.data(after, targets).sum()
        diversity_term = scale * self._diversity(after, targets).sum()
        kl = theta_site["scale"] * self.pieces.kl(guide, model, model_trace, guide_trace)
        loss = data_term + diversity_term + kl
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"IBDRLoss is not finite: data {float(data_term.detach())}, diversity "
                f"{float(diversity_term.detach())}, kl {float(kl.detach())}"
            )

        cost = self.pieces.cost(perturbation, logits, after) if self.pieces.ascent.active else 0.0
        self.terms = {
            "loss": float(loss.detach()),
            "data": float(data_term.detach()),
            "diversity": float(diversity_term.detach()),
            "kl": float(kl.detach()),
            "cost": cost,
            "lambda": self.lam,
            "step_norm": _mean_row_norm(perturbation),
            "theta_norm": _mean_row_norm(theta),
        }
        if update_dual and self.pieces.ascent.uses_dual:
            self.lam = self.pieces.dual(self.lam, cost, self.schedule_factor)
        return loss

    # ------------------------------------------------------------------------------- Pyro interfaces
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The IBDR objective at θ' (no parameter gradients kept, λ unchanged); works under no_grad."""
        with torch.enable_grad():
            return float(self._objective(model, guide, args, kwargs, update_dual=False).detach())

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """One training step's objective as a tensor whose gradient is the descent gradient (e held constant);
        updates λ, as a training step does."""
        return self._objective(model, guide, args, kwargs, update_dual=True)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """One IBDR step's gradients in the params' ``.grad`` (descent part only) and a λ update."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """λ and the settings."""
        return {"lambda": self.lam, "settings": asdict(self.settings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])


def _site_names(trace: poutine.Trace) -> list[str]:
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


def _check_model_sites(trace: poutine.Trace) -> None:
    """The model's side of the site contract: θ, the logits, observed labels in the data plate."""
    expected = {
        THETA: "the latent flat adapter vector, event shape (D,)",
        LOGITS: "pyro.deterministic class logits of shape (B, C)",
        OBS: f"the Categorical labels (B,) inside the {DATA_PLATE!r} plate",
    }
    for name, meaning in expected.items():
        if name not in trace.nodes:
            raise ValueError(f"IBDRLoss needs a model site named {name!r} ({meaning}); the model's sites are "
                             f"{_site_names(trace)}")
    if not trace.nodes[OBS]["is_observed"]:
        raise ValueError(f"IBDRLoss trains on observed labels, but the model sampled its {OBS!r} site: pass the "
                         "labels, e.g. svi.step(x, y)")


def _mean_row_norm(value: torch.Tensor) -> float:
    return float(value.detach().reshape(value.shape[0], -1).norm(dim=1).mean())
