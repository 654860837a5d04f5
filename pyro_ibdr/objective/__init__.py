"""The pieces of the IBDR objective, one idea each, composed by :class:`~pyro_ibdr.IBDRLoss`.

    min_{μ, σ} min_{λ ≥ 0}  λρ + E_θ[(1/K) Σ_i max_{θ'_i} ℓ̃(θ'_i, θ_i)] + KL term,
    ℓ̃ = l(θ'_i) + α l_div(θ'_i, θ_{−i}) − λ c(θ_i, θ'_i)      (the paper's practical objective)

- data term l: :class:`ParticleCrossEntropy` (paper), :class:`EnsembleCrossEntropy` (authors' code);
- diversity l_div: :class:`Volume` (paper), :class:`LogVolume` (authors' code);
- ascent θ' = θ + e: :class:`ClosedFormAscent`, :class:`NormalisedAscent` (SAM), :class:`NoAscent`, with
  :func:`clip_global_norm` (authors' code) and :func:`tie_shared` (a head shared by the particles);
- dual rule: :class:`ProjectedDualStep` on the cost :class:`ParameterCost` (paper) or :class:`OutputCost`
  (authors' code);
- KL: :class:`PaperKL`, :class:`ExactKL`, :class:`MonteCarloKL`, :class:`NoKL`.
"""

from .ascent import AscentRule, ClosedFormAscent, NoAscent, NormalisedAscent, clip_global_norm, tie_shared
from .data import DataTerm, EnsembleCrossEntropy, ParticleCrossEntropy
from .diversity import DiversityTerm, LogVolume, Volume
from .dual import OutputCost, ParameterCost, ProjectedDualStep, TransportCost
from .kl import ExactKL, KLTerm, MonteCarloKL, NoKL, PaperKL

__all__ = [
    "AscentRule",
    "ClosedFormAscent",
    "DataTerm",
    "DiversityTerm",
    "EnsembleCrossEntropy",
    "ExactKL",
    "KLTerm",
    "LogVolume",
    "MonteCarloKL",
    "NoAscent",
    "NoKL",
    "NormalisedAscent",
    "OutputCost",
    "PaperKL",
    "ParameterCost",
    "ParticleCrossEntropy",
    "ProjectedDualStep",
    "TransportCost",
    "Volume",
    "clip_global_norm",
    "tie_shared",
]
