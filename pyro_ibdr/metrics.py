"""Metrics of posterior predictive class probabilities: accuracy, calibration, diversity, OOD detection.

Convention: a method's posterior predictive gives per-sample class probabilities ``sample_probs`` of
shape (S, B, C) (S posterior samples or particles, B examples, C classes) and integer targets (B,).
The ensemble (Bayesian model average) is p̄ = (1/S) Σ_s p_s unless stated otherwise. Inputs are checked
(rows must sum to 1 within ``SUM_TOLERANCE``) and then handled in float64 with rows renormalised; every
scalar metric comes back as a Python float. Calibration and OOD metrics come from torchmetrics, which
computes them in float32; NLL, Brier, adaptive ECE and the diversity terms are computed here. torchmetrics is
imported on first use (it pulls in scipy and transformers), so that ``import pyro_ibdr`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pyro_ibdr.diversity import dpp_log_volume

EnsembleMode = Literal["mean_probs", "mean_logits"]

#: Largest allowed |Σ_c p_c − 1| per row; rows within it are renormalised in float64.
SUM_TOLERANCE = 1e-3
#: Floor on probabilities inside logarithms whose value would otherwise be infinite (NLL, pairwise KL).
LOG_EPS = 1e-12
#: The fraction of OOD examples that must be detected for the FPR at 95 % TPR.
TPR_LEVEL = 0.95

_TINY = torch.finfo(torch.float64).tiny


# ---------------------------------------------------------------------------------------------- checks
def _check_probs(probs: Tensor, name: str, ndim: int) -> Tensor:
    """Validate probabilities with ``ndim`` dims and return them in float64, rows renormalised to sum 1."""
    layout = "(S, B, C)" if ndim == 3 else "(B, C)"
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(probs).__name__}")
    if probs.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating-point probabilities, got dtype {probs.dtype}")
    if probs.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(probs.shape)}")
    if probs.shape[-1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got C = {probs.shape[-1]}")
    p = probs.detach().to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if bool((p < 0).any()):
        raise ValueError(f"{name} contains negative values; pass probabilities, not logits")
    row_sums = p.sum(-1, keepdim=True)
    deviation = float((row_sums - 1.0).abs().max())
    if deviation > SUM_TOLERANCE:
        raise ValueError(
            f"rows of {name} must sum to 1 over the class dim (largest deviation {deviation:.3g}); "
            "pass probabilities (softmax outputs), not logits"
        )
    return p / row_sums


def _check_targets(targets: Tensor, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """Validate integer class indices (B,) in [0, C) and return them as int64 on ``device``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of shape (B,), got {type(targets).__name__}")
    if targets.dim() != 1:
        raise ValueError(f"targets must have shape (B,), got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape[0] != batch:
        raise ValueError(f"targets has {targets.shape[0]} entries but probabilities have {batch} examples")
    t = targets.to(device=device, dtype=torch.long)
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got values from {low} to {high}")
    return t


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _check_scores(scores: Tensor, name: str) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    s = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


# -------------------------------------------------------------------------------------------- ensemble
def ensemble_probs(sample_probs: Tensor, mode: EnsembleMode = "mean_probs") -> Tensor:
    """Combine S per-sample predictions (S, B, C) into one predictive distribution (B, C), float64.

    - ``"mean_probs"`` (default, the Bayesian model average): p̄ = (1/S) Σ_s p_s.
    - ``"mean_logits"``: softmax((1/S) Σ_s log p_s). Since log p_s = z_s − logsumexp(z_s) for logits z_s,
      the mean of log-probabilities differs from the mean of logits only by a per-example constant that
      the softmax removes, so this equals the IBDR authors' softmax-of-mean-logits. Log-probabilities are
      floored at the smallest normal float64 (2.2e-308) so that a probability that underflowed to 0
      cannot make the whole row −∞; exact agreement therefore needs probabilities without underflow.
    """
    if mode not in ("mean_probs", "mean_logits"):
        raise ValueError(f"mode must be 'mean_probs' or 'mean_logits', got {mode!r}")
    p = _check_probs(sample_probs, "sample_probs", 3)
    if mode == "mean_probs":
        return p.mean(0)
    return torch.softmax(p.clamp_min(_TINY).log().mean(0), dim=-1)


# ----------------------------------------------------------------------------------------- calibration
def _top_label(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence max_c p_c and correctness 1[argmax_c p_c = y] per example, both float64 (B,)."""
    confidence, prediction = probs.max(dim=-1)
    return confidence, prediction.eq(targets).to(torch.float64)


def _bin_statistics(
    confidence: Tensor, correct: Tensor, index: Tensor, n_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean correctness and mean confidence of each of ``n_groups`` bins (0 for empty bins)."""
    count = torch.zeros(n_groups, dtype=torch.float64, device=confidence.device)
    count.index_add_(0, index, torch.ones_like(confidence))
    safe = count.clamp_min(1.0)
    accuracy = torch.zeros_like(count).index_add_(0, index, correct) / safe
    mean_confidence = torch.zeros_like(count).index_add_(0, index, confidence) / safe
    return count, accuracy, mean_confidence


def _calibration_gap(count: Tensor, accuracy: Tensor, confidence: Tensor) -> float:
    """Σ_b (n_b / N) |acc_b − conf_b|."""
    return float((count / count.sum() * (accuracy - confidence).abs()).sum())


@dataclass(frozen=True)
class CalibrationBins:
    """Top-label statistics per equal-width confidence bin, in torchmetrics' binning convention.

    With M bins and edges e_k = k/M, bin k < M holds the confidences in [e_k, e_{k+1}). A confidence of
    exactly 1.0 lies on no such interval: torchmetrics (``bucketize(..., right=True)``) gives it an extra
    group k = M of its own, and so does this class, so the last entry of every tensor below is that
    group. Binning is done on float32 confidences, as in torchmetrics, so a float64 confidence that rounds
    to 1.0 in float32 joins the extra group too. Empty bins have count, accuracy and confidence 0.

    :ivar edges: (M + 1,) bin edges 0, 1/M, ..., 1.
    :ivar count: (M + 1,) examples per bin.
    :ivar accuracy: (M + 1,) mean correctness per bin.
    :ivar confidence: (M + 1,) mean confidence per bin.
    """

    edges: Tensor
    count: Tensor
    accuracy: Tensor
    confidence: Tensor

    @property
    def n_bins(self) -> int:
        """M, the number of equal-width bins (without the extra confidence = 1 group)."""
        return self.edges.numel() - 1

    @property
    def ece(self) -> float:
        """ECE = Σ_k (n_k / N) |acc_k − conf_k|; equals torchmetrics' L1 ``MulticlassCalibrationError``."""
        return _calibration_gap(self.count, self.accuracy, self.confidence)


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Bin the top-label confidences of ``probs`` (B, C) into ``n_bins`` equal-width bins (see
    :class:`CalibrationBins` for the convention)."""
    _check_n_bins(n_bins)
    p = _check_probs(probs, "probs", 2)
    t = _check_targets(targets, p.shape[0], p.shape[1], p.device)
    confidence, correct = _top_label(p, t)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float32, device=p.device)
    index = torch.bucketize(confidence.float(), edges, right=True) - 1
    count, accuracy, mean_confidence = _bin_statistics(confidence, correct, index, n_bins + 1)
    return CalibrationBins(edges.double(), count, accuracy, mean_confidence)


def adaptive_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Adaptive (equal-mass) ECE of ``probs`` (B, C): Σ_b (n_b / N) |acc_b − conf_b| over top-label bins
    that each hold N/M examples.

    Examples are sorted by confidence (stable sort, so ties keep their input order) and the example of
    rank r ∈ {0..N−1} goes to bin ⌊r·M/N⌋: bin sizes differ by at most one, and with N < M some bins are
    empty (weight 0). Ties that straddle a bin boundary are split between the two bins.
    """
    _check_n_bins(n_bins)
    p = _check_probs(probs, "probs", 2)
    t = _check_targets(targets, p.shape[0], p.shape[1], p.device)
    confidence, correct = _top_label(p, t)
    num = confidence.numel()
    order = torch.sort(confidence, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num, device=p.device)
    index = torch.div(rank * n_bins, num, rounding_mode="floor")
    return _calibration_gap(*_bin_statistics(confidence, correct, index, n_bins))


def classification_metrics(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy and calibration of one predictive distribution ``probs`` (B, C) (e.g. the ensemble).

    Keys:
    - ``accuracy``: (1/N) Σ_n 1[argmax p_n = y_n] (torchmetrics, micro average).
    - ``ece``: top-label L1 ECE over ``n_bins`` equal-width bins (torchmetrics
      ``MulticlassCalibrationError``; a confidence of exactly 1.0 forms a bin of its own, see
      :class:`CalibrationBins`).
    - ``adaptive_ece``: the same over equal-mass bins (:func:`adaptive_calibration_error`).
    - ``nll``: −(1/N) Σ_n log max(p_{n,y_n}, 1e-12), the NLL of the given probabilities.
    - ``brier``: (1/N) Σ_n Σ_c (p_{n,c} − 1[c = y_n])², the multiclass Brier score summed over classes
      (range [0, 2]; some papers divide it by C).
    """
    _check_n_bins(n_bins)
    p = _check_probs(probs, "probs", 2)
    num_classes = p.shape[1]
    t = _check_targets(targets, p.shape[0], num_classes, p.device)
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    accuracy = multiclass_accuracy(p, t, num_classes=num_classes, average="micro")
    ece = multiclass_calibration_error(p, t, num_classes=num_classes, n_bins=n_bins, norm="l1")
    true_prob = p.gather(1, t.unsqueeze(1)).squeeze(1)
    one_hot = torch.nn.functional.one_hot(t, num_classes).to(p.dtype)
    return {
        "accuracy": float(accuracy),
        "ece": float(ece),
        "adaptive_ece": adaptive_calibration_error(p, t, n_bins),
        "nll": float(-true_prob.clamp_min(LOG_EPS).log().mean()),
        "brier": float((p - one_hot).pow(2).sum(-1).mean()),
    }


# ------------------------------------------------------------------------------------------- diversity
def _entropy(p: Tensor) -> Tensor:
    """H(p) = −Σ_c p_c log p_c over the last dim, with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def _entropy_decomposition(p: Tensor) -> tuple[Tensor, Tensor]:
    """Per example (B,): total entropy H(p̄) and expected entropy (1/S) Σ_s H(p_s) of checked (S, B, C)."""
    return _entropy(p.mean(0)), _entropy(p).mean(0)


def diversity_metrics(sample_probs: Tensor, targets: Tensor) -> dict[str, float]:
    """Diversity and uncertainty decomposition of S per-sample predictions (S, B, C); means over examples.

    Keys:
    - ``disagreement``: fraction of examples on which two samples' argmax differ, averaged over the
      S(S−1)/2 pairs; with n_c samples voting for class c it is (S² − Σ_c n_c²) / (S(S−1)).
    - ``pairwise_kl``: (1/(S(S−1))) Σ_{i≠j} KL(p_i ‖ p_j), with log p floored at 1e-12.
    - ``expected_entropy``: (1/S) Σ_s H(p_s), the aleatoric part.
    - ``predictive_entropy``: H(p̄), the total uncertainty of the model average p̄ = (1/S) Σ_s p_s.
    - ``mutual_information``: H(p̄) − (1/S) Σ_s H(p_s) ≥ 0, the epistemic part (the decomposition holds
      for the mean of probabilities, whatever ensemble mode is used for accuracy).
    - ``dpp_log_volume``: mean over examples of log det(G + 1e-7·I) of the samples' wrong-class Gram
      matrix (:func:`pyro_ibdr.diversity.dpp_log_volume`; it warns when S > C − 1).

    With S = 1 the pairwise terms are 0 and the DPP term is not computed: it is log det([1]) = 0.
    """
    p = _check_probs(sample_probs, "sample_probs", 3)
    num_samples, batch, num_classes = p.shape
    t = _check_targets(targets, batch, num_classes, p.device)
    total, expected = _entropy_decomposition(p)
    metrics = {
        "disagreement": 0.0,
        "pairwise_kl": 0.0,
        "expected_entropy": float(expected.mean()),
        "predictive_entropy": float(total.mean()),
        "mutual_information": float((total - expected).clamp_min(0.0).mean()),
        "dpp_log_volume": 0.0,
    }
    if num_samples == 1:
        return metrics
    pairs = num_samples * (num_samples - 1)
    votes = torch.nn.functional.one_hot(p.argmax(-1), num_classes).sum(0).to(torch.float64)
    disagreement = (num_samples**2 - votes.pow(2).sum(-1)) / pairs
    # Σ_{i,j} KL(p_i‖p_j) = S Σ_i Σ_c p_ic log p_ic − Σ_c (Σ_i p_ic)(Σ_j log p_jc); the i = j terms are 0.
    log_p = p.clamp_min(LOG_EPS).log()
    kl_sum = num_samples * (p * log_p).sum((0, 2)) - (p.sum(0) * log_p.sum(0)).sum(-1)
    metrics["disagreement"] = float(disagreement.mean())
    metrics["pairwise_kl"] = float((kl_sum / pairs).clamp_min(0.0).mean())
    metrics["dpp_log_volume"] = float(dpp_log_volume(p, t, members="draws").mean())
    return metrics


# ------------------------------------------------------------------------------------------------- OOD
def uncertainty_scores(sample_probs: Tensor) -> dict[str, Tensor]:
    """Per-example OOD scores (B,), float64, where higher means more likely out of distribution.

    With p̄ = (1/S) Σ_s p_s: ``max_prob`` = 1 − max_c p̄_c, ``entropy`` = H(p̄) and
    ``mutual_information`` = H(p̄) − (1/S) Σ_s H(p_s).
    """
    p = _check_probs(sample_probs, "sample_probs", 3)
    total, expected = _entropy_decomposition(p)
    return {
        "max_prob": 1.0 - p.mean(0).max(-1).values,
        "entropy": total,
        "mutual_information": (total - expected).clamp_min(0.0),
    }


def _ranks_in_unit_interval(scores: Tensor) -> Tensor:
    """An order- and tie-preserving map of scores into [0, 1] (torchmetrics would squash others with a
    sigmoid, which can create ties in float32)."""
    distinct, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    return inverse.to(torch.float64) / max(distinct.numel() - 1, 1)


def ood_metrics(in_scores: Tensor, out_scores: Tensor) -> dict[str, float]:
    """Separation of in-distribution and OOD examples by a score (higher = more likely OOD), with OOD as the
    positive class.

    Keys: ``auroc`` (area under the ROC curve; 0.5 = chance), ``aupr`` (average precision
    Σ_k (R_k − R_{k−1}) P_k, torchmetrics' step-wise area under the precision-recall curve) and ``fpr95``
    (the smallest fraction of in-distribution examples flagged at any threshold that flags at least 95 %
    of the OOD examples).
    """
    s_in = _check_scores(in_scores, "in_scores")
    s_out = _check_scores(out_scores, "out_scores")
    preds = _ranks_in_unit_interval(torch.cat([s_in, s_out]))
    labels = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

    fpr, tpr, _ = binary_roc(preds, labels)
    return {
        "auroc": float(binary_auroc(preds, labels)),
        "aupr": float(binary_average_precision(preds, labels)),
        "fpr95": float(fpr[tpr >= TPR_LEVEL].min()),
    }


# ------------------------------------------------------------------------------------------- combined
def evaluate_predictions(
    sample_probs: Tensor, targets: Tensor, *, n_bins: int = 15, mode: EnsembleMode = "mean_probs"
) -> dict[str, float]:
    """All in-distribution metrics of per-sample predictions (S, B, C).

    Keys: those of :func:`classification_metrics` for the ensemble ``ensemble_probs(sample_probs, mode)``
    (``accuracy``, ``ece``, ``adaptive_ece``, ``nll``, ``brier``) and those of :func:`diversity_metrics`
    (``disagreement``, ``pairwise_kl``, ``expected_entropy``, ``predictive_entropy``,
    ``mutual_information``, ``dpp_log_volume``).
    """
    ensemble = ensemble_probs(sample_probs, mode)
    return {**classification_metrics(ensemble, targets, n_bins), **diversity_metrics(sample_probs, targets)}
