"""pyro_ibdr: Interactive Bayesian Distributional Robustness for LoRA fine-tuning, with Pyro.

The model puts one latent site θ over the trainable LoRA tensors of a peft model; IBDR is a guide
(a mixture of K Gaussians) plus a loss for ``pyro.infer.SVI``.
"""

from .checkpoint import export_peft_adapter, load_checkpoint, save_checkpoint
from .diversity import dpp_log_volume
from .evaluation import evaluate
from .guides import ParticleGuide
from .losses import IBDRLoss, IBDRSettings
from .methods import METHODS, OptimSettings, create_method
from .model import BayesianLoRA
from .params import ParamSpec, lora_only, trainable
from .posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior, Posterior
from .predictive import posterior_predictive, predict_loader, predictive_probs
from .presets import OFFICIAL, PAPER, Preset
from .train import FitResult, fit

__version__ = "0.1.0.dev0"

__all__ = [
    "METHODS",
    "OFFICIAL",
    "PAPER",
    "BayesianLoRA",
    "EmpiricalPosterior",
    "FitResult",
    "GaussianPosterior",
    "IBDRLoss",
    "IBDRSettings",
    "OptimSettings",
    "ParamSpec",
    "ParticleGuide",
    "ParticlePosterior",
    "Posterior",
    "Preset",
    "create_method",
    "dpp_log_volume",
    "evaluate",
    "export_peft_adapter",
    "fit",
    "load_checkpoint",
    "lora_only",
    "posterior_predictive",
    "predict_loader",
    "predictive_probs",
    "save_checkpoint",
    "trainable",
]
