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
from .predictive import predict_loader

#: The OOD scores reported by :func:`evaluate` (higher = more likely out of distribution).
OOD_SCORES = ("max_prob", "entropy", "mutual_information")


def fixed_draws(posterior: Posterior, num_samples: int, seed: int = 0) -> Posterior:
    """S draws from ``posterior`` frozen as an equal-weight sample posterior (keeps ``dropout_at_test``).

    A posterior with ``own_predictive`` is returned unchanged: its draws are fixed by the seed that
    :func:`~pyro_ibdr.predict_loader` gives every batch.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if posterior.own_predictive:
        return posterior
    generator = torch.Generator().manual_seed(seed)
    frozen = EmpiricalPosterior(posterior.sample(num_samples, generator=generator)[THETA])
    frozen.dropout_at_test = posterior.dropout_at_test
    return frozen


def evaluate(
    model: BayesianLoRA,
    posterior: Posterior,
    loader: Iterable[tuple[Any, torch.Tensor]],
    *,
    num_samples: int = 8,
    n_bins: int = 15,
    ensemble: EnsembleMode = "mean_probs",
    ood_loader: Iterable[tuple[Any, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, float | str]:
    """Metrics of the posterior predictive on ``loader`` (batches (x, y)).

    Keys: those of :func:`pyro_ibdr.metrics.evaluate_predictions` (``accuracy``, ``ece``, ``adaptive_ece``,
    ``nll``, ``brier`` of the ensemble; ``disagreement``, ``pairwise_kl``, ``expected_entropy``,
    ``predictive_entropy``, ``mutual_information``, ``dpp_log_volume`` of the S samples), ``ensemble``
    (the label ``"mean_probs"`` — the Bayesian model average — or ``"mean_logits"``), ``num_samples`` and,
    with an ``ood_loader`` (batches (x, y), labels ignored), ``ood_{score}_{auroc,aupr,fpr95}`` for each
    score in :data:`OOD_SCORES`, with OOD examples as the positive class.
    """
    draws = fixed_draws(posterior, num_samples, seed)
    probs, targets = predict_loader(model, draws, loader, num_samples, device=device, seed=seed)
    results: dict[str, float | str] = {
        **evaluate_predictions(probs, targets, n_bins=n_bins, mode=ensemble),
        "ensemble": ensemble,
        "num_samples": num_samples,
    }
    if ood_loader is not None:
        ood_probs, _ = predict_loader(model, draws, ood_loader, num_samples, device=device, seed=seed)
        in_scores, out_scores = uncertainty_scores(probs), uncertainty_scores(ood_probs)
        for score in OOD_SCORES:
            for name, value in ood_metrics(in_scores[score], out_scores[score]).items():
                results[f"ood_{score}_{name}"] = value
    return results
