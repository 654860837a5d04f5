"""LAP: a post-hoc Laplace approximation over θ at the MAP estimate (Laplace-LoRA), computed by laplace-torch.

laplace-torch (``laplace`` package) is imported only when a Laplace approximation is built, so that
``import pyro_ibdr`` stays light.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..functional import Inputs, as_logits, batch_size
from ..model import LOW_PRECISION, THETA, BayesianLoRA
from ..params import assigned
from ..posterior import Posterior
from ..predictive import predictive_probs
from .base import MethodConfig, OptimSettings
from .map import MAP

if TYPE_CHECKING:
    from laplace.baselaplace import ParametricLaplace

HessianStructure = Literal["kron", "diag"]
PredType = Literal["glm", "nn"]

#: The key under which mapping batches carry their labels to laplace-torch (which reads them from the batch).
LABELS_KEY = "_pyro_ibdr_labels"


class ThetaNetwork(nn.Module):
    """The network as laplace-torch calls it: ``forward(x)`` → logits (B, C) for x a tensor, or a mapping of
    tensors passed as keyword arguments (its :data:`LABELS_KEY` entry dropped)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Inputs) -> torch.Tensor:
        if isinstance(x, Mapping):
            return as_logits(self.net(**{k: v for k, v in x.items() if k != LABELS_KEY}))
        return as_logits(self.net(x))


@contextmanager
def held_in_float32(net: nn.Module) -> Iterator[None]:
    """Inside the block every float16/bfloat16 parameter and buffer of ``net`` holds its values in float32 (the
    same tensor objects, ``.data`` replaced); afterwards each gets its own dtype back, exactly (both round trips
    are lossless). laplace-torch feeds float32 batches and needs float32 curvature (its eigendecompositions have
    no half-precision kernels), so the fit and the predictive of a network held in low precision run in float32
    at the cost of a float32 copy of the network while they run."""
    low = [t for t in (*net.parameters(), *net.buffers()) if t.dtype in LOW_PRECISION]
    dtypes = [t.dtype for t in low]
    for tensor in low:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(low, dtypes, strict=True):
            tensor.data = tensor.data.to(dtype)


@contextmanager
def at_theta(model: BayesianLoRA, theta: torch.Tensor) -> Iterator[None]:
    """Inside the block the network holds θ (in float32, :func:`held_in_float32`), exactly θ's tensors require
    grad (laplace-torch's definition of the parameters it approximates) and it is in eval mode; all are restored
    afterwards."""
    params = dict(model.net.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    was_training = model.net.training
    chosen = set(model.spec.names)
    try:
        for name, p in params.items():
            p.requires_grad_(name in chosen)
        model.net.eval()
        with held_in_float32(model.net), assigned(model.net, model.spec, theta):
            yield
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.net.train(was_training)


def split_inputs(x: Inputs, size: int) -> list[Inputs]:
    """Consecutive chunks of at most ``size`` examples of a tensor or of every tensor of a mapping."""
    n = batch_size(x)
    if isinstance(x, Mapping):
        return [{k: v[i : i + size] for k, v in x.items()} for i in range(0, n, size)]
    return [x[i : i + size] for i in range(0, n, size)]


class _Batches:
    """Training batches as laplace-torch's ``fit`` reads them: (x, y) for tensor inputs, the input mapping plus
    the labels under :data:`LABELS_KEY` otherwise, each batch split into chunks of at most ``chunk`` examples
    (whole batches for None); ``len(dataset)`` is N, the model's number of examples."""

    def __init__(self, loader: Iterable[tuple[Inputs, torch.Tensor]], num_data: int, chunk: int | None) -> None:
        self.loader = loader
        self.dataset = range(num_data)
        self.chunk = chunk

    def __iter__(self) -> Iterator[Any]:
        for x, y in self.loader:
            size = self.chunk or len(y)
            for xc, yc in zip(split_inputs(x, size), y.split(size), strict=True):
                yield {**xc, LABELS_KEY: yc} if isinstance(xc, Mapping) else (xc, yc)


def _first_key(loader: Iterable[tuple[Inputs, torch.Tensor]]) -> str:
    """The key laplace-torch reads the batch size from: ``input_ids`` when the inputs are a mapping with it, else
    the first key of the mapping (unused for tensor inputs)."""
    x, _ = next(iter(loader))
    if not isinstance(x, Mapping) or "input_ids" in x:
        return "input_ids"
    return next(iter(x))


def build_laplace(model: BayesianLoRA, structure: HessianStructure, prior_precision: float,
                  dict_key_x: str = "input_ids", stochastic: bool = False) -> ParametricLaplace:
    """An unfitted laplace-torch approximation over θ (curvlinops backend: the GGN, or with ``stochastic`` a
    one-sample Monte-Carlo Fisher); call it inside :func:`at_theta`, which sets what laplace-torch treats as the
    parameters (the tensors that require grad)."""
    from laplace import Laplace

    if structure not in ("kron", "diag"):
        raise ValueError(f"hessian_structure must be 'kron' or 'diag', got {structure!r}")
    return Laplace(ThetaNetwork(model.net), "classification", subset_of_weights="all", hessian_structure=structure,
                   prior_precision=prior_precision, dict_key_x=dict_key_x, dict_key_y=LABELS_KEY,
                   backend_kwargs={"stochastic": stochastic})


class LaplacePosterior(Posterior):
    r"""q(θ) = N(θ_MAP, P⁻¹), P = Σ_n GGN_n(θ_MAP) + P0 (KFAC or diagonal), from a fitted laplace-torch approximation.

    Its predictive (``own_predictive``) is laplace-torch's: for ``pred_type="glm"`` samples of the linearised
    predictive softmax(f(x; θ_MAP) + L(x) z_s), L(x) L(x)ᵀ = J(x) P⁻¹ J(x)ᵀ with J(x) = ∂f/∂θ at θ_MAP and
    z_s ~ N(0, I_C) one draw per sample shared by every example (as laplace-torch draws it within a batch); for
    ``"nn"`` the network at θ_s ~ q. :meth:`predict` returns these per-sample probabilities (S, B, C).
    laplace-torch's Jacobian (``torch.func.jacrev`` of the batch output) costs b·C backward passes over b examples,
    so the GLM predictive is asked for chunks of ``jacobian_batch_size`` examples, each with the same z_s: the
    result equals one call on the whole batch.

    A checkpoint stores θ_MAP and laplace-torch's ``state_dict`` (the curvature factors, the prior precision); a
    loaded posterior is bound to its model (:meth:`bind`) on the first :meth:`predict`, and must be bound before
    :meth:`sample`.
    """

    kind = "laplace"
    own_predictive = True

    def __init__(self, mean: torch.Tensor, laplace_state: dict[str, Any], hessian_structure: HessianStructure,
                 pred_type: PredType, jacobian_batch_size: int = 1) -> None:
        if pred_type not in ("glm", "nn"):
            raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
        if jacobian_batch_size < 1:
            raise ValueError(f"jacobian_batch_size must be >= 1, got {jacobian_batch_size}")
        if mean.dim() != 1 or not torch.isfinite(mean).all():
            raise ValueError(f"mean must be a finite vector (D,), got shape {tuple(mean.shape)}")
        self.mean = mean.detach()
        self.laplace_state = laplace_state
        self.hessian_structure = hessian_structure
        self.pred_type = pred_type
        self.jacobian_batch_size = int(jacobian_batch_size)
        self._bound: tuple[BayesianLoRA, ParametricLaplace] | None = None

    @classmethod
    def fitted(cls, model: BayesianLoRA, laplace: ParametricLaplace, hessian_structure: HessianStructure,
               pred_type: PredType, jacobian_batch_size: int = 1) -> LaplacePosterior:
        """The posterior of an approximation fitted on ``model``, bound to it."""
        posterior = cls(laplace.mean.detach().clone(), laplace.state_dict(), hessian_structure, pred_type,
                        jacobian_batch_size)
        posterior._bound = (model, laplace)
        return posterior

    @property
    def prior_precision(self) -> torch.Tensor:
        """P0's precision: one value (scalar prior) or one per tensor of θ (layer-wise prior)."""
        return self.laplace_state["prior_precision"]

    def bind(self, model: BayesianLoRA) -> ParametricLaplace:
        """The laplace-torch approximation on ``model`` (rebuilt from the stored state for a new model).

        :raises ValueError: when the model's θ does not have the posterior's dimension D.
        """
        if self._bound is not None and self._bound[0] is model:
            return self._bound[1]
        if model.dim != self.mean.numel():
            raise ValueError(f"the Laplace posterior has D = {self.mean.numel()} but the model has D = {model.dim}")
        with at_theta(model, self.mean):
            laplace = build_laplace(model, self.hessian_structure, 1.0)
            laplace.load_state_dict(self.laplace_state)
        self._bound = (model, laplace)
        return laplace

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """θ_s ~ N(θ_MAP, P⁻¹) (laplace-torch's ``sample``); ``generator`` on the model's device.

        :raises RuntimeError: for a loaded posterior not yet bound to its model.
        """
        if self._bound is None:
            raise RuntimeError("a Laplace posterior loaded from a checkpoint needs posterior.bind(model) first")
        return {THETA: self._bound[1].sample(num_samples, generator=generator).detach()}

    def predict(self, model: BayesianLoRA, x: Inputs, num_samples: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample probabilities (S, B, C); without a ``generator`` the draws come from torch's global RNG."""
        laplace = self.bind(model)
        if self.pred_type == "nn":
            return predictive_probs(model, self.sample(num_samples, generator), x)
        if generator is None:
            seed = int(torch.randint(2**62, ()))
            generator = torch.Generator(device=model.theta0.device).manual_seed(seed)
        start = generator.get_state()
        chunks = []
        with at_theta(model, self.mean):
            for chunk in split_inputs(x, self.jacobian_batch_size):
                generator.set_state(start)  # the same z_s for every chunk
                chunks.append(laplace.predictive_samples(chunk, pred_type="glm", n_samples=num_samples,
                                                         generator=generator).detach())
        return torch.cat(chunks, dim=1)

    def tensors(self) -> dict[str, Any]:
        return {"mean": self.mean, "laplace_state": self.laplace_state, "hessian_structure": self.hessian_structure,
                "pred_type": self.pred_type, "jacobian_batch_size": self.jacobian_batch_size}


@dataclass(frozen=True)
class LaplaceConfig(MethodConfig):
    """The curvature structure and whether it is a one-sample Monte-Carlo Fisher (``stochastic``: 1 backward pass
    per batch for KFAC instead of C), the predictive, the prior precision's structure and its marginal-likelihood
    fit, and the examples per laplace-torch Jacobian call (diagonal fit, GLM predictive; 1 is the cheapest per
    example on large networks, larger values save per-call overhead on tiny ones).

    Test-time draws default to laplace-torch's own ``n_samples = 100`` for its Monte-Carlo predictive: the GLM
    draws are logit-space samples around one Jacobian pass per batch, so they cost little, while the harness's
    usual S = K (2 on the offline default) left the Monte-Carlo average so noisy that accuracy fell from the
    MAP's 76.6 % to 45.7 % there. With ``pred_type="nn"`` each draw is a network pass: pass ``num_samples``.
    """

    test_samples = 100

    hessian_structure: HessianStructure = "kron"
    stochastic: bool = False
    pred_type: PredType = "glm"
    prior_structure: Literal["scalar", "layerwise"] = "scalar"
    marglik_steps: int = 100
    marglik_lr: float = 0.1
    jacobian_batch_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hessian_structure not in ("kron", "diag"):
            raise ValueError(f"hessian_structure must be 'kron' or 'diag', got {self.hessian_structure!r}")
        if self.pred_type not in ("glm", "nn"):
            raise ValueError(f"pred_type must be 'glm' or 'nn', got {self.pred_type!r}")
        if self.prior_structure not in ("scalar", "layerwise"):
            raise ValueError(f"prior_structure must be 'scalar' or 'layerwise', got {self.prior_structure!r}")
        if self.marglik_steps < 0:
            raise ValueError(f"marglik_steps must be >= 0, got {self.marglik_steps}")
        if self.jacobian_batch_size < 1:
            raise ValueError(f"jacobian_batch_size must be >= 1, got {self.jacobian_batch_size}")


class LaplaceLoRA(MAP):
    r"""Laplace-LoRA (Yang et al., ICLR 2024): MAP training, then a Laplace approximation of the posterior over θ.

    Training is :class:`~pyro_ibdr.methods.MAP` (prior N(0, s²I)). :meth:`finalize` (called by
    :func:`~pyro_ibdr.fit` after the last step) fits laplace-torch on one pass over the training loader at θ_MAP:

        q(θ) = N(θ_MAP, P⁻¹),    P = Σ_{n=1}^N J_nᵀ Λ_n J_n + P0,

    with the generalised Gauss–Newton (J_n = ∂f(x_n)/∂θ, Λ_n the softmax Hessian) Kronecker-factored per layer
    (``"kron"``, KFAC, laplace-torch's curvlinops backend; LoRA A and B are Linear layers) or diagonal (``"diag"``);
    ``stochastic=True`` replaces Λ_n by a one-sample Monte-Carlo estimate (the MC Fisher).
    P0 = p0·I starts at the training prior's 1/s² and p0 (one value, or one per tensor of θ with
    ``prior_structure="layerwise"``) is then set by maximising the Laplace log marginal likelihood

        log p(D) ≈ log p(D | θ_MAP) − ½ (θ_MAPᵀ P0 θ_MAP + log det P − log det P0)

    (Adam on log p0, ``marglik_steps`` steps of rate ``marglik_lr``; θ_MAP is unchanged). The predictive is the
    linearised (GLM) one, sampled in logit space as in the paper, or the network at θ samples (``pred_type="nn"``).
    laplace-torch computes all curvature, marginal-likelihood and predictive terms. The post-hoc fit costs one
    pass over the training data with C backward passes per batch (KFAC of the exact GGN; 1 with ``stochastic``)
    or per chunk of ``jacobian_batch_size`` examples (diagonal, from Jacobians); the GLM predictive costs C
    backward passes per chunk of test examples, whatever S; the "nn" predictive S forward passes.

    Data-parallel (:mod:`pyro_ibdr.distributed`, ``"data"``): the MAP steps reduce their gradients like
    :class:`~pyro_ibdr.methods.MAP`; laplace-torch's curvature pass and marginal-likelihood fit have no reduction
    across processes, so every process runs them on the whole training loader (the same batches everywhere, as
    ``fit`` requires) and holds the identical approximation: correct, but the post-hoc fit is not sped up.
    """

    name = "laplace"
    config_class = LaplaceConfig
    distributed_modes = frozenset({"data"})

    def __init__(
        self, model: BayesianLoRA, config: LaplaceConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        super().__init__(model, config, optim, seed=seed)
        self.fitted: LaplacePosterior | None = None
        self.fit_state: dict[str, Any] = {}

    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        self.fitted = None  # a step moves θ_MAP: an earlier approximation no longer applies
        return super().step(x, y)

    def finalize(self, train_loader: Iterable[tuple[Inputs, torch.Tensor]]) -> None:
        """Fit the Laplace approximation at the current θ_MAP on one pass over ``train_loader``, then p0."""
        c = self.config
        start = time.perf_counter()
        theta, init_precision = self.theta(), 1.0 / self.model.prior_scale**2
        with at_theta(self.model, theta):
            laplace = build_laplace(self.model, c.hessian_structure, init_precision, _first_key(train_loader),
                                    c.stochastic)
            chunk = c.jacobian_batch_size if c.hessian_structure == "diag" else None  # KFAC needs no Jacobian
            laplace.fit(_Batches(train_loader, self.model.num_data, chunk))
            initial = float(laplace.log_marginal_likelihood())
            if c.marglik_steps:
                with warnings.catch_warnings():  # it warns about link_approx="probit", which is not used here
                    warnings.filterwarnings("ignore", message="By default `link_approx`")
                    laplace.optimize_prior_precision(
                        pred_type=c.pred_type, method="marglik", n_steps=c.marglik_steps, lr=c.marglik_lr,
                        init_prior_prec=init_precision, prior_structure=c.prior_structure, link_approx="mc",
                    )
            final = float(laplace.log_marginal_likelihood())
        self.fitted = LaplacePosterior.fitted(self.model, laplace, c.hessian_structure, c.pred_type,
                                              c.jacobian_batch_size)
        self.fit_state = {
            "prior_precision_init": init_precision,
            "prior_precision": laplace.prior_precision.detach().cpu().tolist(),
            "log_marglik_init": initial,
            "log_marglik": final,
            "laplace_fit_s": time.perf_counter() - start,
        }

    def posterior(self) -> Posterior:
        """The Laplace posterior once :meth:`finalize` ran; before, the MAP point mass."""
        return self.fitted if self.fitted is not None else super().posterior()

    def state(self) -> dict[str, Any]:
        c = self.config
        return {"hessian_structure": c.hessian_structure, "stochastic": c.stochastic, "pred_type": c.pred_type,
                **self.fit_state}
