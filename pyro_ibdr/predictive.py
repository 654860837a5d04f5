"""Posterior predictive class probabilities through ``pyro.infer.Predictive``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from .dropout import dropout_mode
from .functional import Inputs
from .model import LOGITS, THETA, BayesianLoRA
from .posterior import Posterior

PosteriorLike = Callable | Mapping[str, torch.Tensor] | Posterior
PREDICTIVE_PLATE = "_predictive_samples"


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
    with torch.no_grad(), dropout_mode(model.net, dropout), plate:
        trace = poutine.trace(poutine.condition(model, data={THETA: theta})).get_trace(x)
    logits = trace.nodes[LOGITS]["value"]
    return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1)


def _as_samples(
    posterior: Mapping[str, torch.Tensor] | Posterior, num_samples: int, dim: int
) -> dict[str, torch.Tensor]:
    """``{"theta": (S, D)}`` drawn from a posterior or given, checked against the model's D."""
    samples = posterior.sample(num_samples) if isinstance(posterior, Posterior) else posterior
    if THETA not in samples:
        raise KeyError(f"posterior samples must contain {THETA!r}")
    theta = samples[THETA]
    if not isinstance(theta, torch.Tensor) or theta.dim() != 2 or theta.shape[-1] != dim:
        got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"posterior samples {THETA!r} must have shape (S, D = {dim}), got {got} "
                         "(a posterior of another model?)")
    if not torch.isfinite(theta).all():
        raise ValueError(f"posterior samples {THETA!r} contain NaN or inf")
    return {THETA: theta}


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
    if not isinstance(posterior, Posterior | Mapping) and not callable(posterior):
        raise TypeError(f"posterior must be a guide, a Posterior or samples {{'theta': (S, D)}}, got "
                        f"{type(posterior).__name__}")
    if isinstance(posterior, Posterior) and posterior.own_predictive:
        return posterior.predict(model, x, num_samples)
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    if isinstance(posterior, Posterior | Mapping):
        return _predict_samples(model, x, _as_samples(posterior, num_samples, model.dim), dropout)
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

    With ``device``, the θ samples and every batch's inputs are moved there (the model must live there already).
    A posterior with ``own_predictive`` predicts every batch with a generator seeded by ``seed``, so every batch
    gets the same draws too.
    """
    own = isinstance(posterior, Posterior) and posterior.own_predictive
    # θ samples go to the device, e.g. for a checkpoint loaded on the CPU
    samples = None if own else to_device(_as_samples(posterior, num_samples, model.dim), device)
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    probs, targets = [], []
    for batch in loader:
        x, y = split_batch(batch)
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


def split_batch(batch: object) -> tuple[Inputs, torch.Tensor]:
    """(x, y) of a loader's batch, which must be a pair whose second item is the label tensor."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        what = f"{type(batch).__name__} of {len(batch)}" if isinstance(batch, tuple | list) else type(batch).__name__
        raise ValueError(f"loader batches must be (inputs, labels) pairs, got a {what}")
    x, y = batch
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the labels of a batch must be a tensor, got {type(y).__name__}")
    return x, y
