"""The diversity term l_div of IBDR: the DPP volume of the particles' wrong-class predictions."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch

from ..diversity import dpp_log_volume


class _DPPDiversity(ABC):
    """Shared handling of the cases where the term carries no signal.

    The Gram matrix G (K × K) of the particles' normalised wrong-class vectors (C − 1 entries each) has rank
    at most C − 1. With K = 1 it is [1]; with K > C − 1 (e.g. K = 4 on a binary task) it is singular for every
    example, so det G = 0 exactly and the term is constant. In both cases the term is defined as 0 (no
    gradient), and one warning per instance says so.
    """

    name: str

    def __init__(self, jitter: float = 1e-7) -> None:
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = float(jitter)
        self._warned = False

    def _constant(self, probs: torch.Tensor) -> str | None:
        size, _, num_classes = probs.shape
        if size == 1:
            return "with K = 1 particle the diversity term is constant"
        if size > num_classes - 1:
            return (f"K = {size} particles exceed C − 1 = {num_classes - 1} wrong classes: the DPP Gram matrix is "
                    "singular for every example, so the diversity term is constant and is set to 0")
        return None

    def __call__(self, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example diversity loss (B,) from class probabilities (K, B, C) and targets (B,)."""
        reason = self._constant(probs)
        if reason is not None:
            if not self._warned:
                warnings.warn(reason, stacklevel=3)
                self._warned = True
            return probs.new_zeros(probs.shape[1])
        return self.from_log_volume(dpp_log_volume(probs, targets, self.jitter))

    @abstractmethod
    def from_log_volume(self, log_volume: torch.Tensor) -> torch.Tensor:
        """The per-example loss (B,) from log det(G + jI) (B,)."""


class Volume(_DPPDiversity):
    r"""The paper's term: minus the squared volume spanned by the particles' wrong-class vectors,

        l_div(θ_{1:K}; x, y) = −Vol²(V) = −det(G + jI),   G = VᵀV,   v_i = f^i_{−y} / ||f^i_{−y}||.

    Source: the paper, "Divergence Loss" (DPP diversity). Its gradient vanishes as the particles agree
    (det G → 0 with zero slope): it carries little signal from identical starting particles.
    """

    name = "volume"

    def from_log_volume(self, log_volume: torch.Tensor) -> torch.Tensor:
        return -log_volume.exp()


class LogVolume(_DPPDiversity):
    r"""The authors' code's term: minus the log squared volume,

        l_div(θ_{1:K}; x, y) = −log det(G + jI)   (j = 1e-7 in the authors' code).

    Source: the authors' code (ADP-style log-determinant), not the paper. Its gradient grows as the
    particles agree (it is large at identical starts; the authors clip the ascent gradient for that reason).
    """

    name = "log_volume"

    def from_log_volume(self, log_volume: torch.Tensor) -> torch.Tensor:
        return -log_volume


DiversityTerm = Volume | LogVolume
