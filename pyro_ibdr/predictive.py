"""Posterior predictive class probabilities through ``pyro.infer.Predictive``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from . import distributed
from .functional import Inputs
from .metrics import EnsembleMode, ensemble_probs
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


def predictive_probs(
    model: BayesianLoRA, posterior: PosteriorLike, x: Inputs, num_samples: int | None = None
) -> torch.Tensor:
    """Per-sample class probabilities p(y | x, θ_s), shape (S, B, C), with θ_s drawn from the posterior.

    :param posterior: a :class:`~pyro_ibdr.posterior.Posterior` (S = ``posterior.num_draws(num_samples)``:
        point masses once each, mixtures exactly stratified), a guide (drawn S times by
        ``pyro.infer.Predictive`` in one vectorised pass, S = ``num_samples`` or the guide's
        ``num_particles``; a :class:`~pyro_ibdr.ParticleGuide` stratifies its draws over its components), or
        explicit samples ``{"theta": (S, D)}`` (taken as they are); samples are evaluated in one conditioned,
        vectorised pass of the model.
    :raises ValueError: for a number of draws the posterior cannot honour exactly.
    """
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    if isinstance(posterior, Posterior | Mapping):
        return _predict_samples(model, x, _as_samples(posterior, num_samples), dropout)
    return _predict_guide(model, x, posterior, _guide_draws(posterior, num_samples))


def posterior_predictive(
    model: BayesianLoRA,
    posterior: PosteriorLike,
    x: Inputs,
    num_samples: int | None = None,
    ensemble: EnsembleMode | None = None,
) -> torch.Tensor:
    """The ensemble's class probabilities (B, C): :func:`predictive_probs` combined by ``ensemble`` — by
    default the posterior's own ``prediction`` mode (``"mean_probs"`` for guides and raw samples)."""
    mode = ensemble or (posterior.prediction if isinstance(posterior, Posterior) else "mean_probs")
    return ensemble_probs(predictive_probs(model, posterior, x, num_samples), mode)


def predict_loader(
    model: BayesianLoRA,
    posterior: Posterior | Mapping[str, torch.Tensor],
    loader: Iterable,
    num_samples: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (S, N, C), targets (N,)) over a loader of (x, y) batches, with the same θ samples for every batch
    (S as in :func:`predictive_probs`). Under a distributed mode every process evaluates its block of the S
    samples (when W divides S) and the probabilities of all samples are gathered on every process."""
    samples = _as_samples(posterior, num_samples)
    total = samples[THETA].shape[0]
    samples = {THETA: samples[THETA][distributed.prediction_rows(total)]}
    dropout = isinstance(posterior, Posterior) and posterior.dropout_at_test
    probs, targets = [], []
    for x, y in loader:
        local = _predict_samples(model, to_device(x, device), samples, dropout)
        probs.append(distributed.gather_predictions(local, total).cpu())
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
