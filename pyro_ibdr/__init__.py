"""pyro_ibdr: Interactive Bayesian Distributional Robustness for LoRA fine-tuning, with Pyro.

The model puts one latent site θ over the trainable LoRA tensors of a peft model; IBDR is a guide
(a mixture of K Gaussians) plus a loss for ``pyro.infer.SVI``.
"""

from .diversity import dpp_log_volume
from .guides import ParticleGuide
from .losses import IBDRLoss, IBDRSettings
from .model import BayesianLoRA
from .params import ParamSpec, lora_only, trainable
from .predictive import predictive_probs

__version__ = "0.1.0.dev0"

__all__ = [
    "BayesianLoRA",
    "IBDRLoss",
    "IBDRSettings",
    "ParamSpec",
    "ParticleGuide",
    "dpp_log_volume",
    "lora_only",
    "predictive_probs",
    "trainable",
]
