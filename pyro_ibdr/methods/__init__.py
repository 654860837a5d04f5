"""Inference methods on one Bayesian LoRA model; each is one small module registered by name."""

from .base import METHODS, Method, OptimSettings, create_method, set_learning_rate
from .bbb import BayesByBackprop
from .ensemble import DeepEnsemble
from .ibdr import IBDR
from .map import MAP
from .mc_dropout import MCDropout
from .sa_bnn import SABNN
from .sam import SAM
from .sgld import SGLD
from .svgd import SteinVGD

__all__ = [
    "IBDR",
    "MAP",
    "METHODS",
    "SABNN",
    "SAM",
    "SGLD",
    "BayesByBackprop",
    "DeepEnsemble",
    "MCDropout",
    "Method",
    "OptimSettings",
    "SteinVGD",
    "create_method",
    "set_learning_rate",
]
