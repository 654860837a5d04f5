"""The DPP diversity of K particles' wrong-class predictions (IBDR's l_div)."""

from __future__ import annotations

import warnings
from typing import Literal

import torch

#: Floor on ||f_{−y}|| so that an all-underflowed wrong-class vector normalises to 0, not NaN.
NORM_EPS = 1e-12


def _check(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (K, B, C), got {tuple(probs.shape)}")
    if targets.shape != probs.shape[1:2]:
        raise ValueError(f"targets must have shape (B,) = ({probs.shape[1]},), got {tuple(targets.shape)}")
    num_classes = probs.shape[-1]
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes})")


def wrong_class_gram(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """G (B, K, K): cosines between particles' non-true-class probability vectors.

    v_i = f^i_{−y} / ||f^i_{−y}|| (the true class dropped, not renormalised), G_ij = ⟨v_i, v_j⟩.
    Dropping entry y equals zeroing it, which keeps the computation one batched einsum.
    """
    _check(probs, targets)
    true_class = torch.nn.functional.one_hot(targets, probs.shape[-1]).bool()
    wrong = probs.masked_fill(true_class, 0.0)
    unit = wrong / wrong.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return torch.einsum("kbc,lbc->bkl", unit, unit)


def dpp_log_volume(probs: torch.Tensor, targets: torch.Tensor, jitter: float = 1e-7, *,
                   members: Literal["particles", "draws"] = "particles") -> torch.Tensor:
    """Per-example log det(G + jitter·I) (B,), the log squared volume spanned by the K particles.

    0 when the particles' wrong-class distributions are orthogonal, ≈ (K−1)·log(jitter) when they
    coincide. Computed in float64 through a Cholesky factor (float32 fails for near-identical particles)
    and returned in the dtype of ``probs``. For K > C − 1 the Gram matrix is rank deficient for every
    example and the value carries no signal: a warning says so.

    :param probs: (K, B, C) class probabilities of K particles (or of S posterior draws).
    :param targets: (B,) true classes.
    :param members: what the leading dimension holds, for the warning ("K = 4 particles", "S = 8 draws").
    """
    _check(probs, targets)
    num_particles, _, num_classes = probs.shape
    if num_particles > num_classes - 1:
        symbol = "S" if members == "draws" else "K"
        warnings.warn(
            f"{symbol} = {num_particles} {members} exceed C − 1 = {num_classes - 1} wrong classes: the DPP Gram "
            "matrix is singular for every example and the diversity term carries no signal",
            stacklevel=2,
        )
    gram = wrong_class_gram(probs.double(), targets)
    eye = torch.eye(num_particles, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
    if bool((info > 0).any()):
        raise FloatingPointError("Cholesky factorisation of the DPP Gram matrix failed; increase the jitter")
    log_det = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return log_det.to(probs.dtype)
