"""Posterior predictive class probabilities through ``pyro.infer.Predictive``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from pyro.infer import Predictive

from .functional import Inputs
from .model import LOGITS, THETA, BayesianLoRA


def predictive_probs(
    model: BayesianLoRA,
    posterior: Callable | Mapping[str, torch.Tensor],
    x: Inputs,
    num_samples: int = 8,
) -> torch.Tensor:
    """Per-sample class probabilities p(y | x, θ_s), shape (S, B, C), with θ_s drawn from the posterior.

    :param posterior: a guide (drawn ``num_samples`` times in one vectorised pass; a
        :class:`~pyro_ibdr.ParticleGuide` stratifies the draws over its components) or explicit samples
        ``{"theta": (S, D)}`` (``num_samples`` is then S).
    """
    if isinstance(posterior, Mapping):
        if THETA not in posterior:
            raise KeyError(f"posterior samples must contain {THETA!r}")
        samples = {THETA: posterior[THETA]}
        num_samples = samples[THETA].shape[0]
        predictive = Predictive(model, posterior_samples=samples, return_sites=[LOGITS], parallel=True)
    else:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        predictive = Predictive(
            model, guide=posterior, num_samples=num_samples, return_sites=[LOGITS], parallel=True
        )
    with torch.no_grad():
        logits = predictive(x)[LOGITS]
    return logits.reshape(num_samples, *logits.shape[-2:]).softmax(-1)
