"""The Bayesian model over LoRA parameters: θ ~ N(0, s²I), y | x, θ ~ Categorical(softmax f_θ(x))."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .functional import BatchedForward, Inputs, Mode, batch_size
from .params import ParamFilter, ParamSpec, trainable

#: Name of the single latent site that holds the flat adapter vector θ.
THETA = "theta"
#: Deterministic site recording the class logits (*lead, B, C).
LOGITS = "logits"
#: Name of the data plate; it is the only plate of the model (``max_plate_nesting == 1``).
DATA_PLATE = "data"
#: Floating dtypes held in float32 for θ and the logits.
LOW_PRECISION = (torch.float16, torch.bfloat16)


class BayesianLoRA:
    """Pyro model whose one latent site is the flat vector θ of a peft model's trainable tensors.

    The frozen backbone never enters Pyro: the batched forward (:class:`~pyro_ibdr.functional.BatchedForward`)
    runs it with θ in place of the adapter tensors and leaves its weights alone. The model is

        θ ~ N(0, s² I_D),    y_n | x_n, θ ~ Categorical(logits = f(x_n; θ)),  n in a subsampled plate of size N.

    θ may carry leading particle/sample dimensions (*lead, 1, D) or (*lead, D); the data-plate singleton
    is removed before the forward so that logits are (*lead, B, C).

    :param net: a module wrapped by peft (any ``nn.Module`` whose forward returns logits (B, C) or an
        object with ``.logits``). Called as ``net(x)`` or ``net(**x)`` when x is a mapping.
    :param num_data: N, the training-set size used to scale the minibatch likelihood.
    :param prior_scale: s, the prior standard deviation.
    :param select: which of ``net``'s parameters form θ (default: all that require grad).
    :param vectorize: how the rows of θ are evaluated (:class:`~pyro_ibdr.functional.BatchedForward`):
        ``"fused"`` (all particles in one pass over one copy of the frozen network), ``"vmap"`` (or True),
        ``"loop"`` (or False), or None: fused where it applies, else the loop (with a one-time warning).

    θ is kept in float32 when the adapter tensors are float16/bfloat16 (master weights: small updates are not
    rounded away); the forward casts each tensor to its layer's dtype. Logits in float16/bfloat16 are returned
    in float32, so softmax, likelihood and metrics run in float32.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        *,
        prior_scale: float = 1.0,
        select: ParamFilter = trainable,
        vectorize: Mode | bool | None = None,
    ) -> None:
        if num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.net = net
        self.num_data = int(num_data)
        self.prior_scale = float(prior_scale)
        self.spec = ParamSpec.from_module(net, select)
        params = dict(net.named_parameters())
        theta0 = self.spec.flatten(params)
        self.theta0 = (theta0.float() if theta0.dtype in LOW_PRECISION else theta0).clone()
        self.forward = BatchedForward(net, self.spec, vectorize=vectorize)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def prior(self, device: torch.device | None = None) -> dist.Distribution:
        """N(0, s² I_D) as one event of size D."""
        loc = torch.zeros(self.dim, device=device if device is not None else self.theta0.device)
        return dist.Normal(loc, self.prior_scale).to_event(1)

    def init_particles(self, num_particles: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """K independent LoRA initialisations (K, D): fresh A ~ U(−1/√fan_in, 1/√fan_in), all else as in ``net``.

        This is peft's default initialisation (B = 0, so every particle starts at the pretrained function).
        """
        if num_particles < 1:
            raise ValueError(f"the number of particles must be >= 1, got {num_particles}")
        bounds = self.spec.lora_a_bounds().to(self.theta0)
        noise = torch.rand(num_particles, self.dim, generator=generator).to(self.theta0) * 2 - 1
        redraw = bounds > 0
        return torch.where(redraw, noise * bounds, self.theta0.expand(num_particles, -1)).clone()

    def logits(self, theta: torch.Tensor, x: Inputs) -> torch.Tensor:
        """f(x; θ) for θ of shape (D,), (*lead, D) or (*lead, 1, D) → (B, C) or (*lead, B, C)."""
        if theta.dim() >= 3 and theta.shape[-2] == 1:
            theta = theta.squeeze(-2)
        logits = self.forward(theta, x)
        return logits.float() if logits.dtype in LOW_PRECISION else logits

    def __call__(self, x: Inputs, y: torch.Tensor | None = None) -> torch.Tensor:
        n_batch = batch_size(x)
        if y is not None and y.shape != (n_batch,):
            raise ValueError(f"labels have shape {tuple(y.shape)} but the inputs hold {n_batch} examples")
        theta = pyro.sample(THETA, self.prior())
        logits = self.logits(theta, x)
        if not torch.isfinite(logits).all():
            raise FloatingPointError("the network produced non-finite logits (NaN or inf); check inputs and step size")
        num_classes = logits.shape[-1]
        if y is not None and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); got min {int(y.min())}, max {int(y.max())}"
            )
        # A prediction batch may exceed N: the plate then covers just this batch.
        with pyro.plate(DATA_PLATE, size=max(self.num_data, n_batch), subsample_size=n_batch, dim=-1):
            logits = pyro.deterministic(LOGITS, logits, event_dim=1)
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
