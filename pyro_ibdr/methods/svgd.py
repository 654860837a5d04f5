"""Stein variational gradient descent with Pyro's own ``pyro.infer.SVGD`` on the flat θ site."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVGD
from pyro.infer.svgd import SteinKernel

from .. import distributed
from ..functional import Inputs, batch_size
from ..initialisation import seeded_particles
from ..kernels import FlooredRBFSteinKernel, ScalarRBFKernel
from ..model import THETA, BayesianLoRA
from ..param_store import check_stored_param
from ..posterior import ParticlePosterior, Posterior
from .base import Method, MethodConfig, OptimSettings

#: The param-store name under which ``pyro.infer.SVGD`` keeps its particles (fixed by Pyro).
PARTICLES_PARAM = "svgd_particles"


def make_kernel(kind: str, bandwidth_factor: float = 1.0) -> SteinKernel:
    """``"scalar_rbf"``: :class:`~pyro_ibdr.kernels.ScalarRBFKernel`; ``"pyro_rbf"``: Pyro's per-dimension RBF
    (:class:`~pyro_ibdr.kernels.FlooredRBFSteinKernel`, whose bandwidth is floored so that LoRA starts give no NaN).
    """
    if kind == "scalar_rbf":
        return ScalarRBFKernel(bandwidth_factor)
    if kind == "pyro_rbf":
        return FlooredRBFSteinKernel(bandwidth_factor)
    raise ValueError(f"kernel must be 'scalar_rbf' or 'pyro_rbf', got {kind!r}")


class _ScaledGradients:
    """A Pyro optimiser called on gradients multiplied by ``factor`` first."""

    def __init__(self, optim: pyro.optim.PyroOptim, factor: float) -> None:
        self.optim = optim
        self.factor = factor

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(self.factor)
        self.optim(params, *args, **kwargs)


@dataclass(frozen=True)
class SVGDConfig(MethodConfig):
    """K particles, the Stein kernel (``"scalar_rbf"`` or ``"pyro_rbf"``) and its bandwidth factor."""

    size_field = "num_particles"

    num_particles: int = 4
    kernel: Literal["scalar_rbf", "pyro_rbf"] = "scalar_rbf"
    bandwidth_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_particles < 2:
            raise ValueError(f"SVGD needs at least 2 particles, got {self.num_particles}")


class SteinVGD(Method):
    r"""Liu & Wang (2016): K particles moved along

        φ(θ_n) = (1/K) Σ_m [k(θ_m, θ_n) ∇ log p(θ_m, D_b) + ∇_{θ_m} k(θ_m, θ_n)],

    the log joint estimated on the minibatch (likelihood scaled by N/B), stepped by the weights' optimiser.
    Pyro's SVGD runs in ``mode="multivariate"`` (one joint kernel over all of θ). Its initial particles are
    prior draws; here they start from K seeded LoRA initialisations
    (:func:`~pyro_ibdr.initialisation.seeded_particles`). Pyro keeps the particles under one global name
    (:data:`PARTICLES_PARAM`), so only one SVGD run fits in a param store.

    Units: φ's target is the posterior whatever ``optim.objective_scale`` says (scaling the log joint would
    temper it, since the kernel's repulsion is not scaled); with ``"per_example"`` the direction φ itself is
    divided by N before the optimiser, so ``lr`` means what it means for the other methods.

    ``step`` reports ``loss`` = −(1/K) Σ_n log p(θ_n, D_b), the mean negative minibatch log joint of the
    particles (from the same pass that computes the gradients; divided by N in per-example units), and
    ``sq_grad``, the mean squared entry of the SVGD update direction in ELBO units (Pyro's convergence monitor).

    **Several processes** (:mod:`pyro_ibdr.distributed`). Every process keeps all K particles: the kernel needs
    them all, and every process applies the same update, so they stay identical. What is split is the
    log joint's gradient, the expensive part: data-parallel processes evaluate all K particles on their shard
    of the batch and reduce the gradients to the global batch; particle-parallel processes evaluate their block
    of K/W particles on the whole batch and all-gather the blocks' gradients (K/W·D floats each). Pyro's
    ``SVGD.step`` then forms the kernel and φ from the K particles and the K gradients, unchanged.
    """

    name = "svgd"
    config_class = SVGDConfig
    distributed_modes = frozenset({"data", "particle"})

    def __init__(
        self, model: BayesianLoRA, config: SVGDConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        c = self.config
        self.num_particles = int(c.num_particles)
        self.kernel_name = c.kernel
        self.kernel = make_kernel(c.kernel, c.bandwidth_factor)
        self.optim = self.optim_settings.pyro_optimizer()
        self.svgd = self._make_svgd()
        self.factor = self.optim_settings.scale_factor(model.num_data)
        if self.factor != 1.0:  # Pyro's SVGD calls self.optim(params) once φ is in the .grad fields
            self.svgd.optim = _ScaledGradients(self.optim, self.factor)
        self.initial_particles = seeded_particles(model, self.num_particles, seed)
        self.num_steps = 0
        self.rows = distributed.particle_rows(self.num_particles)
        self.svgd.loss = self._recording(self._process_loss if distributed.mode() is not None else self.svgd.loss)
        self._last_loss = float("nan")
        self._autocast: tuple[bool, torch.dtype] = (False, torch.float32)

    def _make_svgd(self) -> SVGD:
        """Pyro's SVGD over the model's θ site, one joint kernel over all of θ."""
        return SVGD(self.model, self.kernel, self.optim, num_particles=self.num_particles,
                    max_plate_nesting=self.model.max_plate_nesting, mode="multivariate")

    def _recording(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
            enabled, dtype = self._autocast  # the caller's autocast applies to the model, not to the kernel algebra
            with torch.autocast(self.initial_particles.device.type, dtype=dtype, enabled=enabled):
                loss = loss_fn(*args, **kwargs)
            self._last_loss = float(loss.detach())
            return loss

        return recorded

    def _offset(self, particles: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """e (K, D), constant: the log joint's gradient of particle j is taken at θ_j + e_j (SVGD: None, e = 0)."""
        return None

    def _process_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """−Σ_n log p(θ_n, D_b) over all K particles and the global batch, as a surrogate whose gradient with
        respect to Pyro's particle parameter is the reduced gradient; this process evaluates its block of
        particles (:func:`~pyro_ibdr.distributed.particle_rows`) on its shard of the batch."""
        rows = pyro.param(PARTICLES_PARAM).unconstrained().reshape(self.num_particles, -1)
        own = rows[self.rows]
        offset = self._offset(rows.detach(), *args, **kwargs)
        at = own if offset is None else own + offset[self.rows]  # where the gradient is taken
        plate = pyro.plate("svgd_process_particles", own.shape[0], dim=-(self.model.max_plate_nesting + 1))
        with plate:
            trace = poutine.trace(poutine.condition(self.model, data={THETA: at.unsqueeze(-2)})).get_trace(
                *args, **kwargs
            )
        loss = -trace.log_prob_sum()
        (grad,) = torch.autograd.grad(loss, own)
        grad, total = distributed.batch_mean(
            [distributed.gather_particles(grad), distributed.particle_sum(loss.detach())], count=batch_size(args[0])
        )
        surrogate = (rows * grad).sum()
        return surrogate - surrogate.detach() + total

    @property
    def passes_per_step(self) -> int:
        return self.num_particles

    def prepare(self, x: Inputs, y: torch.Tensor) -> None:
        """Set up Pyro's SVGD guide, whose prototype trace draws θ from the prior (``init_to_sample``)."""
        if self.svgd.guide.prototype_trace is None:
            self.svgd.guide(x, y)

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        if self.num_steps == 0:
            # Pyro's guide would start from prior draws. Its parameter is the flat (K·1·D) vector of unconstrained
            # θ's, equal to the constrained ones on the real line; a parameter left by an earlier run is replaced.
            pyro.get_param_store()[PARTICLES_PARAM] = self.initial_particles.reshape(-1).clone()
            if distributed.mode() is not None:  # Pyro's guide reads the site shapes off one model run: one example
                self.svgd.guide(*_first_example(x, y))
        check_stored_param(PARTICLES_PARAM, (self.initial_particles.numel(),))
        device = self.initial_particles.device.type
        self._autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):  # Pyro's kernel products write the float32 particles' .grad
            squared = self.svgd.step(x, y)
        self.num_steps += 1
        return {"loss": self.factor * self._last_loss / self.num_particles, "sq_grad": float(squared[THETA])}

    def particles(self) -> torch.Tensor:
        """The current particles (K, D); the initial ones before the first step."""
        if self.num_steps == 0:
            return self.initial_particles.clone()
        return self.svgd.get_named_particles()[THETA].detach().reshape(self.num_particles, -1).clone()

    def posterior(self) -> Posterior:
        return ParticlePosterior(self.particles())

    def state_dict(self) -> dict[str, Any]:
        """The default (the particles in the param store, optimiser, rate) and the step count, which says
        whether the particles were already placed at their LoRA initialisations."""
        return {**super().state_dict(), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.num_steps = int(state["num_steps"])

    def state(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "kernel": self.kernel_name,
            "mode": self.svgd.mode,
            "bandwidth_factor": self.kernel.bandwidth_factor,
        }


def _first_example(x: Inputs, y: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """The batch's first row (every tensor of a mapping x)."""
    if isinstance(x, Mapping):
        return {k: v[:1] for k, v in x.items()}, y[:1]
    return x[:1], y[:1]
