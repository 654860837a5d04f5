"""Posterior predictive class probabilities through ``pyro.infer.Predictive``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from .functional import Inputs
from .model import LOGITS, THETA, BayesianLoRA
from .posterior import Posterior

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


def _predict_guide(model: BayesianLoRA, x: Inputs, guide: Callable, num_samples: int) -> torch.Tensor:
    """Probabilities (S, B, C) through ``Predictive(guide=..., parallel=True)``."""
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=[LOGITS], parallel=True)
    with torch.no_grad():
        logits = predictive(x)[LOGITS]
    return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1)


def _predict_samples(model: BayesianLoRA, x: Inputs, samples: Mapping[str, torch.Tensor],
                     dropout: bool) -> torch.Tensor:
    """Probabilities (S, B, C) of the model conditioned on stored θ samples in one vectorised pass.

    This is the last step of ``Predictive(posterior_samples=..., parallel=True)``; Predictive itself would
    first run the model twice more to infer plate nesting and site shapes, which ``BayesianLoRA`` states.
    """
    theta = samples[THETA]
    num_samples = theta.shape[0]
    theta = theta.reshape(num_samples, *([1] * model.max_plate_nesting), theta.shape[-1])
    plate = pyro.plate(PREDICTIVE_PLATE, num_samples, dim=-(model.max_plate_nesting + 1))
    with torch.no_grad(), training_mode(model.net, dropout), plate:
        trace = poutine.trace(poutine.condition(model, data={THETA: theta})).get_trace(x)
    logits = trace.nodes[LOGITS]["value"]
    return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1)


def _as_samples(posterior: Mapping[str, torch.Tensor] | Posterior, num_samples: int) -> dict[str, torch.Tensor]:
    samples = posterior.sample(num_samples) if isinstance(posterior, Posterior) else posterior
    if THETA not in samples:
        raise KeyError(f"posterior samples must contain {THETA!r}")
    return {THETA: samples[THETA]}


def predictive_probs(model: BayesianLoRA, posterior: PosteriorLike, x: Inputs, num_samples: int = 8) -> torch.Tensor:
    """Per-sample class probabilities p(y | x, θ_s), shape (S, B, C), with θ_s drawn from the posterior.

    :param posterior: a guide (drawn ``num_samples`` times by ``pyro.infer.Predictive`` in one vectorised
        pass; a :class:`~pyro_ibdr.ParticleGuide` stratifies the draws over its components), a
        :class:`~pyro_ibdr.posterior.Posterior`, or explicit samples ``{"theta": (S, D)}`` (S overrides
        ``num_samples``); samples are evaluated in one conditioned, vectorised pass of the model. A posterior with
        ``own_predictive`` (the linearised Laplace predictive) gives its own samples (``posterior.predict``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(posterior, Posterior) and posterior.own_predictive:
        return posterior.predict(model, x, num_samples)
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    if isinstance(posterior, Posterior | Mapping):
        return _predict_samples(model, x, _as_samples(posterior, num_samples), dropout)
    return _predict_guide(model, x, posterior, num_samples)


def predict_loader(
    model: BayesianLoRA,
    posterior: Posterior | Mapping[str, torch.Tensor],
    loader: Iterable,
    num_samples: int = 8,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (S, N, C), targets (N,)) over a loader of (x, y) batches, with the same θ samples for every batch.

    A posterior with ``own_predictive`` predicts every batch with a generator seeded by ``seed``, so every batch
    gets the same draws too.
    """
    own = isinstance(posterior, Posterior) and posterior.own_predictive
    samples = None if own else _as_samples(posterior, num_samples)
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    probs, targets = [], []
    for x, y in loader:
        x = to_device(x, device)
        if own:
            generator = torch.Generator(device=model.theta0.device).manual_seed(seed)
            batch_probs = posterior.predict(model, x, num_samples, generator)
        else:
            batch_probs = _predict_samples(model, x, samples, dropout)
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
