"""Evaluate a posterior on a data loader: predictive metrics and OOD detection.

Every batch, in-distribution or OOD, is predicted with the same S draws θ_1..θ_S from the posterior, so
the metrics describe one fixed ensemble.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .metrics import EnsembleMode, evaluate_predictions, ood_metrics, uncertainty_scores
from .model import THETA, BayesianLoRA
from .posterior import EmpiricalPosterior, Posterior
from .precision import Precision
from .predictive import predict_loader

#: The OOD scores reported by :func:`evaluate` (higher = more likely out of distribution).
OOD_SCORES = ("max_prob", "entropy", "mutual_information")


def fixed_draws(posterior: Posterior, num_samples: int | None = None, seed: int = 0) -> Posterior:
    """S = ``posterior.num_draws(num_samples)`` draws from ``posterior`` frozen as an equal-weight sample
    posterior (keeps ``dropout_at_test`` and ``prediction``).

    A posterior with ``own_predictive`` is returned unchanged: its draws are fixed by the seed that
    :func:`~pyro_ibdr.predict_loader` gives every batch.
    """
    if posterior.own_predictive:
        return posterior
    generator = torch.Generator().manual_seed(seed)
    frozen = EmpiricalPosterior(posterior.sample(posterior.num_draws(num_samples), generator=generator)[THETA])
    frozen.dropout_at_test = posterior.dropout_at_test
    frozen.prediction = posterior.prediction
    return frozen


def evaluate(
    model: BayesianLoRA,
    posterior: Posterior,
    loader: Iterable[tuple[Any, torch.Tensor]],
    *,
    num_samples: int | None = None,
    n_bins: int = 15,
    ensemble: EnsembleMode | None = None,
    ood_loader: Iterable[tuple[Any, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    precision: Precision = "fp32",
) -> dict[str, float | str]:
    """Metrics of the posterior predictive on ``loader`` (batches (x, y)).

    Keys: those of :func:`pyro_ibdr.metrics.evaluate_predictions` (``accuracy``, ``ece``, ``adaptive_ece``,
    ``nll``, ``brier`` of the ensemble; ``disagreement``, ``pairwise_kl``, ``expected_entropy``,
    ``predictive_entropy``, ``mutual_information``, ``dpp_log_volume`` of the S samples), ``ensemble``
    (the label ``"mean_probs"`` — the Bayesian model average — or ``"mean_logits"``), ``num_samples`` and,
    with an ``ood_loader`` (batches (x, y), labels ignored), ``ood_{score}_{auroc,aupr,fpr95}`` for each
    score in :data:`OOD_SCORES`, with OOD examples as the positive class. ``chunk_size`` (θ samples per
    pass) and ``precision`` (autocast of the network) as in :func:`~pyro_ibdr.predictive_probs`.

    :param num_samples: S, resolved by ``posterior.num_draws``: ``None`` evaluates point masses once each
        (K particles) and draws a default number from continuous posteriors; a mixture needs a multiple of K.
    :param ensemble: how the S predictions combine; ``None`` takes the posterior's ``prediction`` mode.
    """
    draws = fixed_draws(posterior, num_samples, seed)
    mode = ensemble or posterior.prediction
    num_draws = posterior.num_draws(num_samples)
    options = {"device": device, "seed": seed, "chunk_size": chunk_size, "precision": precision}
    probs, targets = predict_loader(model, draws, loader, num_draws, **options)
    results: dict[str, float | str] = {
        **evaluate_predictions(probs, targets, n_bins=n_bins, mode=mode),
        "ensemble": mode,
        "num_samples": num_draws,
    }
    if ood_loader is not None:
        ood_probs, _ = predict_loader(model, draws, ood_loader, num_draws, **options)
        in_scores, out_scores = uncertainty_scores(probs), uncertainty_scores(ood_probs)
        for score in OOD_SCORES:
            for name, value in ood_metrics(in_scores[score], out_scores[score]).items():
                results[f"ood_{score}_{name}"] = value
    return results
