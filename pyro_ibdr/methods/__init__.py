"""Inference methods on one Bayesian LoRA model; each is one small module (a config dataclass and a class)
registered by name."""

from .base import METHODS, Method, MethodConfig, OptimSettings, create_method
from .bayestune import BayesTune, BayesTuneConfig
from .bbb import BayesByBackprop, BBBConfig
from .blob import BLoB, BLoBConfig
from .ensemble import DeepEnsemble, EnsembleConfig
from .fhbi import FHBI, FHBIConfig
from .ibdr import IBDR, IBDRConfig
from .map import MAP, MAPConfig
from .mc_dropout import MCDropout, MCDropoutConfig
from .sa_bnn import SABNN, SABNNConfig
from .sam import SAM, SAMConfig
from .sgld import SGLD, SGLDConfig
from .svgd import SteinVGD, SVGDConfig

__all__ = [
    "FHBI",
    "IBDR",
    "MAP",
    "METHODS",
    "SABNN",
    "SAM",
    "SGLD",
    "BBBConfig",
    "BLoB",
    "BLoBConfig",
    "BayesByBackprop",
    "BayesTune",
    "BayesTuneConfig",
    "DeepEnsemble",
    "EnsembleConfig",
    "FHBIConfig",
    "IBDRConfig",
    "MAPConfig",
    "MCDropout",
    "MCDropoutConfig",
    "Method",
    "MethodConfig",
    "OptimSettings",
    "SABNNConfig",
    "SAMConfig",
    "SGLDConfig",
    "SVGDConfig",
    "SteinVGD",
    "create_method",
]
