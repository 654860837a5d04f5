"""The minibatch log-likelihood of given θ's, read from the Pyro model's own trace."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

from .functional import Inputs
from .model import THETA, BayesianLoRA

SAMPLES_PLATE = "_likelihood_samples"


def log_likelihood(model: BayesianLoRA, theta: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """(N/B) Σ_b log p(y_b | x_b, θ_s) for every row θ_s: the data term of the log joint, without the prior.

    The model runs once, conditioned on all rows at once (its ``obs`` site carries the N/B subsampling scale).

    :param theta: (D,) or (S, D); gradients flow back to it.
    :returns: () for θ of shape (D,), else (S,).
    """
    rows = theta.reshape(-1, theta.shape[-1])
    conditioned = poutine.condition(model, data={THETA: rows.unsqueeze(-2)})
    with pyro.plate(SAMPLES_PLATE, rows.shape[0], dim=-(model.max_plate_nesting + 1)):
        trace = poutine.trace(conditioned).get_trace(x, y)
    obs = trace.nodes["obs"]
    values = (obs["fn"].log_prob(obs["value"]) * obs["scale"]).sum(-1)
    return values.reshape(theta.shape[:-1])
