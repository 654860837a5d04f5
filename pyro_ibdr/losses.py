"""IBDRLoss: the IBDR objective as a Pyro ELBO-like loss (DRO ascent + dual variable + DPP diversity)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from .checks import check_field_types
from .diversity import dpp_log_volume
from .model import LOGITS, THETA

PARTICLE_PLATE = "ibdr_particles"


@dataclass(frozen=True)
class IBDRSettings:
    """Every switch of the IBDR objective; ``IBDRLoss.official()`` sets the authors' code's choices.

    :param alpha: weight α of the diversity term.
    :param diversity: ``"volume"``: l_div = −det(G + jI) (the paper's squared volume);
        ``"log_volume"``: l_div = −log det(G + jI) (the authors' code).
    :param jitter: j, added to the Gram matrix diagonal.
    :param data_loss: ``"per_particle"``: (1/K) Σ_i CE(f_i); ``"ensemble"``: CE of the mean of the
        particles' logits (the authors' code).
    :param ascent: ``"closed_form"``: θ' = θ + g/(2λ), the maximiser of the first-order expansion minus
        λ||θ' − θ||²; ``"sam"``: θ' = θ + r g/||g|| per particle; ``"none"``: θ' = θ.
    :param sam_radius: r for ``ascent="sam"``.
    :param clip_norm: clip the joint ascent gradient of all particles to this norm first (authors: 0.12–0.3).
    :param cost: transport cost for the dual step: ``"parameter"``: c = mean_i ||θ'_i − θ_i||²;
        ``"output"``: the authors' d̃ = d·exp(max(0, d − ρ)/0.01), d = mean_b ||p̄(θ') − p̄(θ)||₂.
    :param rho: ρ, the Wasserstein radius, in the units of ``cost``.
    :param lambda_init: λ₀.
    :param lambda_bounds: projection interval of λ (keep the floor > 0 for the closed-form step).
    :param dual_lr: step size of λ ← clamp(λ − lr·(ρ − c)); a callable is read at every step (schedules).
    :param kl: ``"paper"``: (β/K)[Σ_i ||μ_i||²/s² + d(σ − log σ)]; ``"exact"``: (β/K) Σ_i KL(N(μ_i, σ²I) ‖
        N(0, s²I)) (an upper bound on KL(Q‖P)); ``"mc"``: β·mean_i [log q(θ_i) − log p(θ_i)] from the
        traces (any guide whose θ site carries its density, e.g. point masses or a mean-field Normal);
        ``"none"``. ``"paper"``/``"exact"`` need a guide with ``loc`` and ``scale``.
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
    dual_lr: float | Callable[[], float] = 10.0
    kl: Literal["paper", "exact", "mc", "none"] = "paper"
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        choices = {
            "diversity": ("volume", "log_volume"),
            "data_loss": ("per_particle", "ensemble"),
            "ascent": ("closed_form", "sam", "none"),
            "cost": ("parameter", "output"),
            "kl": ("paper", "exact", "mc", "none"),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        low, high = self.lambda_bounds
        if not 0 <= low <= self.lambda_init <= high:
            raise ValueError(f"need 0 <= lambda_bounds[0] <= lambda_init <= lambda_bounds[1], got {low}, "
                             f"{self.lambda_init}, {high}")
        if self.ascent == "closed_form" and low <= 0:
            raise ValueError("the closed-form ascent step g/(2λ) needs a lambda floor > 0")
        for name in ("alpha", "jitter", "rho", "sam_radius", "kl_weight", "dual_lr"):
            if not callable(getattr(self, name)) and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm}")


class IBDRLoss(ELBO):
    r"""Interactive Bayesian Distributional Robustness (Pham et al., ICML 2025) for ``pyro.infer.SVI``.

    With K particles θ_i = μ_i + σ ε_i drawn from a :class:`~pyro_ibdr.ParticleGuide`, one step minimises

        λρ + (1/K) Σ_i [ l(θ'_i) + α l_div(θ'_i, θ_{−i}) − λ c(θ_i, θ'_i) ] + KL term,

    where the inner maximiser θ' comes from one ascent step on l + α l_div. Following SAM, the perturbation
    e = θ' − θ is held constant, so μ receives ∇l(θ') and σ receives ∇l(θ')·ε. λ ≥ 0 is state of the loss,
    updated by a projected step on λρ − λc: λ ← clamp(λ − lr·(ρ − c)).

    The data terms are in ELBO units: the minibatch sum scaled to the data set (N/B Σ_b), so the KL term
    has weight β = 1 for the exact evidence bound. The ascent uses per-example means, the scale of the
    paper's ℓ̃. The last values of each term are in :attr:`terms` for logging.
    """

    def __init__(self, settings: IBDRSettings | None = None, **overrides: Any) -> None:
        super().__init__(num_particles=1, max_plate_nesting=1)
        if settings is not None and not isinstance(settings, IBDRSettings):
            raise TypeError(f"settings must be an IBDRSettings, got {type(settings).__name__}; pass fields as keywords")
        self.settings = replace(settings or IBDRSettings(), **overrides)
        self.lam = self.settings.lambda_init
        self.terms: dict[str, float] = {}
        self._warned_single = False

    @classmethod
    def official(cls, lr: float | Callable[[], float] = 0.1, **overrides: Any) -> IBDRLoss:
        """The authors' code: ensemble CE, log-volume diversity, clipped joint ascent g/(2λ), output-space
        cost with an exponential barrier, λ₀ = 3 in [0.5, 5] stepped with the weights' learning rate,
        no KL (use it with σ = 0).
        """
        settings = IBDRSettings(
            alpha=0.02, diversity="log_volume", data_loss="ensemble", ascent="closed_form", clip_norm=0.2,
            cost="output", rho=0.03, lambda_init=3.0, lambda_bounds=(0.5, 5.0), dual_lr=lr, kl="none",
        )
        return cls(settings, **overrides)

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
        model_trace = poutine.trace(poutine.replay(self._vectorized(model, size), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    def _model_at(self, model, theta: torch.Tensor, args, kwargs) -> poutine.Trace:
        conditioned = poutine.condition(self._vectorized(model, theta.shape[0]), data={THETA: theta})
        return poutine.trace(conditioned).get_trace(*args, **kwargs)

    # ------------------------------------------------------------------------------------ loss terms
    def _data_terms(self, model_trace: poutine.Trace, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(data term per example (B,), diversity term per example (B,), likelihood scale N/B)."""
        obs = model_trace.nodes["obs"]
        logits, targets, scale = model_trace.nodes[LOGITS]["value"], obs["value"], float(obs["scale"])
        logits = logits.reshape(size, *logits.shape[-2:])
        if self.settings.data_loss == "ensemble":
            data = F.cross_entropy(logits.mean(0), targets, reduction="none")
        else:
            data = F.cross_entropy(logits.transpose(1, 2), targets.expand(size, -1), reduction="none").mean(0)
        diversity = torch.zeros_like(data)
        if self.settings.alpha > 0:
            diversity = self._diversity(logits, targets)
        return data, diversity, scale

    def _diversity(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        size, _, num_classes = logits.shape
        if size > num_classes - 1:
            raise ValueError(
                f"the diversity term needs K <= C − 1, got K = {size} particles and C = {num_classes} classes; "
                "use fewer particles or alpha = 0"
            )
        if size == 1:
            if not self._warned_single:
                warnings.warn("with K = 1 particle the diversity term is constant", stacklevel=3)
                self._warned_single = True
            return torch.zeros_like(logits[0, :, 0])
        log_volume = dpp_log_volume(logits.softmax(-1), targets, self.settings.jitter)
        return -log_volume if self.settings.diversity == "log_volume" else -log_volume.exp()

    def _kl(self, guide, model, model_trace, guide_trace) -> torch.Tensor:
        kind, beta = self.settings.kl, self.settings.kl_weight
        theta_site = guide_trace.nodes[THETA]
        if kind == "none":
            return theta_site["value"].new_zeros(())
        if kind == "mc":
            auxiliary = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                         and not site["is_observed"] and not site_is_subsample(site) and name != THETA]
            if auxiliary:
                raise ValueError(f"kl='mc' needs a guide that samples θ directly; this one also samples {auxiliary} "
                                 "(e.g. AutoNormal's unconstrained site), so log q(θ) would be wrong")
            log_q = theta_site["fn"].log_prob(theta_site["value"])
            log_p = model_trace.nodes[THETA]["fn"].log_prob(theta_site["value"])
            return beta * (log_q - log_p).mean()
        if not (hasattr(guide, "loc") and hasattr(guide, "scale")):
            raise ValueError(f"kl={kind!r} needs a guide with .loc and .scale; use kl='mc' for other guides")
        loc, sigma = guide.loc, guide.scale
        s2 = getattr(model, "prior_scale", 1.0) ** 2
        dim = loc.shape[-1]
        mean_sq = loc.pow(2).sum(-1).mean() / s2
        if kind == "paper":
            spread = dim * (sigma - sigma.log()) if float(sigma.detach()) > 0 else loc.new_zeros(())
            return beta * (mean_sq + spread)
        if float(sigma.detach()) == 0:
            raise ValueError("kl='exact' is infinite for point-mass particles (sigma = 0); use 'paper' or 'none'")
        var_ratio = sigma.pow(2) / s2
        return beta * 0.5 * (mean_sq + dim * (var_ratio - 1 - var_ratio.log()))

    # ---------------------------------------------------------------------------------- ascent, dual
    def _perturbation(self, grad: torch.Tensor) -> torch.Tensor:
        """e = θ' − θ from the ascent gradient (K, 1, D)."""
        s = self.settings
        if s.clip_norm is not None:
            grad = grad * (s.clip_norm / grad.norm().clamp_min(1e-12)).clamp(max=1.0)
        if s.ascent == "sam":
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            return s.sam_radius * grad / norms.view(-1, *([1] * (grad.dim() - 1)))
        if s.ascent == "none":
            return torch.zeros_like(grad)
        return grad / (2.0 * self.lam)

    def _cost(self, perturbation: torch.Tensor, trace: poutine.Trace, perturbed: poutine.Trace) -> float:
        if self.settings.cost == "parameter":
            return float(perturbation.flatten(1).pow(2).sum(1).mean())
        before = trace.nodes[LOGITS]["value"].detach().mean(0).softmax(-1)
        after = perturbed.nodes[LOGITS]["value"].detach().mean(0).softmax(-1)
        distance = float((after - before).reshape(-1, before.shape[-1]).norm(dim=-1).mean())
        return distance * math.exp(max(0.0, distance - self.settings.rho) / 0.01)

    def _dual_step(self, cost: float) -> None:
        s = self.settings
        lr = s.dual_lr() if callable(s.dual_lr) else s.dual_lr
        self.lam = min(max(self.lam - lr * (s.rho - cost), s.lambda_bounds[0]), s.lambda_bounds[1])

    # -------------------------------------------------------------------------------------- objective
    def _objective(self, model, guide, args, kwargs, update_dual: bool) -> torch.Tensor:
        size = self._num_particles(guide)
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        theta = guide_trace.nodes[THETA]["value"]
        if theta.shape[0] != size:
            raise ValueError(f"the guide drew theta of shape {tuple(theta.shape)}; expected {size} particles first")

        # Pass 1: ascent direction at θ (per-example means), never touching any .grad.
        data, diversity, scale = self._data_terms(model_trace, size)
        perturbation, perturbed = torch.zeros_like(theta), model_trace
        if self.settings.ascent != "none":
            per_particle = size if self.settings.data_loss == "per_particle" else 1
            ascent_objective = per_particle * data.mean() + self.settings.alpha * diversity.mean()
            (grad,) = torch.autograd.grad(ascent_objective, theta)
            perturbation = self._perturbation(grad.detach())
            # Pass 2: the descent objective at θ' = θ + e, e held constant.
            perturbed = self._model_at(model, theta + perturbation, args, kwargs)
            data, diversity, scale = self._data_terms(perturbed, size)
        kl = self._kl(guide, model, model_trace, guide_trace)
        data_term = scale * data.sum()
        diversity_term = scale * self.settings.alpha * diversity.sum()
        loss = data_term + diversity_term + kl
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"IBDRLoss is not finite: data {float(data_term.detach())}, diversity "
                f"{float(diversity_term.detach())}, kl {float(kl.detach())}"
            )

        cost = self._cost(perturbation, model_trace, perturbed)
        self.terms = {
            "loss": float(loss.detach()),
            "data": float(data_term.detach()),
            "diversity": float(diversity_term.detach()),
            "kl": float(kl.detach()),
            "cost": cost,
            "lambda": self.lam,
        }
        if update_dual and self.settings.ascent == "closed_form":
            self._dual_step(cost)
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The IBDR objective at θ' (no parameter gradients kept, λ unchanged); works under no_grad."""
        with torch.enable_grad():
            return float(self._objective(model, guide, args, kwargs, update_dual=False).detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """One IBDR step's gradients in the params' ``.grad`` (descent part only) and a λ update."""
        loss = self._objective(model, guide, args, kwargs, update_dual=True)
        loss.backward()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """λ and the settings (callables replaced by their current value)."""
        settings = asdict(self.settings)
        if callable(settings["dual_lr"]):
            settings["dual_lr"] = self.settings.dual_lr()
        return {"lambda": self.lam, "settings": settings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])
