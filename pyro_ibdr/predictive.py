"""Posterior predictive class probabilities through ``pyro.infer.Predictive``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from .functional import Inputs
from .metrics import EnsembleMode, ensemble_probs
from .model import LOGITS, THETA, BayesianLoRA
from .posterior import Posterior
from .precision import Precision, autocast, check_precision

PosteriorLike = Callable | Mapping[str, torch.Tensor] | Posterior
PREDICTIVE_PLATE = "_predictive_samples"


@contextmanager
def training_mode(net: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run ``net`` in training mode (dropout on) inside the block when ``enabled``; restore its mode afterwards."""
    was_training = net.training
    net.train(enabled or was_training)
    try:
        yield
    finally:
        net.train(was_training)


def _predict_guide(model: BayesianLoRA, x: Inputs, guide: Callable, num_samples: int,
                   precision: Precision) -> torch.Tensor:
    """Probabilities (S, B, C) through ``Predictive(guide=..., parallel=True)``."""
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=[LOGITS], parallel=True)
    with torch.no_grad(), autocast(precision, model.theta0.device):
        logits = predictive(x)[LOGITS]
    return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1)


def _conditioned_logits(model: BayesianLoRA, x: Inputs, theta: torch.Tensor) -> torch.Tensor:
    """Logits (S, B, C) of the model conditioned on θ (S, D) in one vectorised pass.

    This is the last step of ``Predictive(posterior_samples=..., parallel=True)``; Predictive itself would
    first run the model twice more to infer plate nesting and site shapes, which ``BayesianLoRA`` states.
    """
    num_samples = theta.shape[0]
    theta = theta.reshape(num_samples, *([1] * model.max_plate_nesting), theta.shape[-1])
    with pyro.plate(PREDICTIVE_PLATE, num_samples, dim=-(model.max_plate_nesting + 1)):
        trace = poutine.trace(poutine.condition(model, data={THETA: theta})).get_trace(x)
    logits = trace.nodes[LOGITS]["value"]
    return logits.reshape(num_samples, *logits.shape[-2:])


class SampleChunks:
    """How many θ samples go through the network per pass (each pass sees chunk·B rows).

    ``size=None`` starts with all S samples in one pass and halves the chunk after a CUDA out-of-memory error
    until a pass fits; the size that fitted is kept for later batches. A given ``size`` is used as is.
    """

    def __init__(self, size: int | None = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"chunk_size must be a positive number of samples or None, got {size}")
        self.size = size
        self.adaptive = size is None

    def logits(self, model: BayesianLoRA, x: Inputs, theta: torch.Tensor) -> torch.Tensor:
        """Logits (S, B, C) for θ (S, D), ``self.size`` samples per pass."""
        while True:
            chunk = min(self.size or theta.shape[0], theta.shape[0])
            try:
                return torch.cat([_conditioned_logits(model, x, part) for part in theta.split(chunk)])
            except torch.OutOfMemoryError:
                if not self.adaptive or chunk == 1:
                    raise
                self.size = (chunk + 1) // 2


def _predict_samples(model: BayesianLoRA, x: Inputs, samples: Mapping[str, torch.Tensor], dropout: bool,
                     chunks: SampleChunks, precision: Precision) -> torch.Tensor:
    """Probabilities (S, B, C) of the model conditioned on stored θ samples, in float32 (or θ's wider dtype)."""
    theta = samples[THETA]
    with torch.no_grad(), training_mode(model.net, dropout), autocast(precision, theta.device):
        logits = chunks.logits(model, x, theta)
    return logits.softmax(-1)


def _as_samples(posterior: Mapping[str, torch.Tensor] | Posterior, num_samples: int | None) -> dict[str, torch.Tensor]:
    """θ draws: S = ``posterior.num_draws(num_samples)`` from a posterior, or the given samples as they are."""
    samples = posterior.sample(posterior.num_draws(num_samples)) if isinstance(posterior, Posterior) else posterior
    if THETA not in samples:
        raise KeyError(f"posterior samples must contain {THETA!r}")
    return {THETA: samples[THETA]}


def _guide_draws(guide: Callable, num_samples: int | None) -> int:
    if num_samples is None:
        num_samples = getattr(guide, "num_particles", None)
        if not isinstance(num_samples, int):
            raise ValueError("pass num_samples: the guide has no num_particles to draw once each")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def predictive_probs(model: BayesianLoRA, posterior: PosteriorLike, x: Inputs, num_samples: int | None = None, *,
                     chunk_size: int | None = None, precision: Precision = "fp32") -> torch.Tensor:
    """Per-sample class probabilities p(y | x, θ_s), shape (S, B, C), with θ_s drawn from the posterior.

    :param posterior: a :class:`~pyro_ibdr.posterior.Posterior` (S = ``posterior.num_draws(num_samples)``:
        point masses once each, mixtures exactly stratified), a guide (drawn S times by
        ``pyro.infer.Predictive`` in one vectorised pass, S = ``num_samples`` or the guide's
        ``num_particles``; a :class:`~pyro_ibdr.ParticleGuide` stratifies its draws over its components), or
        explicit samples ``{"theta": (S, D)}`` (taken as they are). Samples go through the model's batched
        forward (the fused particle pass by default), ``chunk_size`` samples per pass (:class:`SampleChunks`;
        None: all, halved on CUDA out-of-memory). A posterior with ``own_predictive`` (the linearised Laplace
        predictive) gives its own samples (``posterior.predict``).
    :param precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the network (:mod:`pyro_ibdr.precision`);
        the softmax runs in float32 either way.
    :raises ValueError: for a number of draws the posterior cannot honour exactly, or an unknown precision.
    """
    check_precision(precision)
    if isinstance(posterior, Posterior) and posterior.own_predictive:
        return posterior.predict(model, x, posterior.num_draws(num_samples))
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    if isinstance(posterior, Posterior | Mapping):
        samples = _as_samples(posterior, num_samples)
        return _predict_samples(model, x, samples, dropout, SampleChunks(chunk_size), precision)
    return _predict_guide(model, x, posterior, _guide_draws(posterior, num_samples), precision)


def posterior_predictive(
    model: BayesianLoRA,
    posterior: PosteriorLike,
    x: Inputs,
    num_samples: int | None = None,
    ensemble: EnsembleMode | None = None,
    **options: Any,
) -> torch.Tensor:
    """The ensemble's class probabilities (B, C): :func:`predictive_probs` (``options``: ``chunk_size``,
    ``precision``) combined by ``ensemble`` — by default the posterior's own ``prediction`` mode
    (``"mean_probs"`` for guides and raw samples)."""
    mode = ensemble or (posterior.prediction if isinstance(posterior, Posterior) else "mean_probs")
    return ensemble_probs(predictive_probs(model, posterior, x, num_samples, **options), mode)


def predict_loader(
    model: BayesianLoRA,
    posterior: Posterior | Mapping[str, torch.Tensor],
    loader: Iterable,
    num_samples: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    *,
    chunk_size: int | None = None,
    precision: Precision = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (S, N, C), targets (N,)) over a loader of (x, y) batches, with the same θ samples for every batch
    (S as in :func:`predictive_probs`).

    A posterior with ``own_predictive`` predicts every batch with a generator seeded by ``seed``, so every batch
    gets the same draws too. ``chunk_size`` and ``precision`` as in :func:`predictive_probs`; an adapted chunk
    size carries over batches.
    """
    check_precision(precision)
    own = isinstance(posterior, Posterior) and posterior.own_predictive
    samples = None if own else _as_samples(posterior, num_samples)
    if own:
        num_samples = posterior.num_draws(num_samples)
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    chunks = SampleChunks(chunk_size)
    probs, targets = [], []
    for x, y in loader:
        x = to_device(x, device)
        if own:
            generator = torch.Generator(device=model.theta0.device).manual_seed(seed)
            batch_probs = posterior.predict(model, x, num_samples, generator)
        else:
            batch_probs = _predict_samples(model, x, samples, dropout, chunks, precision)
        probs.append(batch_probs.cpu())
        targets.append(y.cpu())
    if not probs:
        raise ValueError("the loader yielded no batches")
    return torch.cat(probs, dim=1), torch.cat(targets)


def to_device(x: Inputs, device: torch.device | str | None) -> Inputs:
    """Move a tensor, or every tensor of a mapping, to ``device`` (None: leave in place)."""
    if device is None:
        return x
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)
