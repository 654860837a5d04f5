"""Inference methods on one Bayesian LoRA model; each is one small module (a config dataclass and a class)
registered by name."""

from .base import METHODS, Method, MethodConfig, OptimSettings, create_method
from .bbb import BayesByBackprop, BBBConfig
from .ensemble import DeepEnsemble, EnsembleConfig
from .fft import FFT, FFTConfig
from .ibdr import IBDR, IBDRConfig
from .ivon import IVON, IVONConfig
from .laplace import LaplaceConfig, LaplaceLoRA, LaplacePosterior
from .map import MAP, MAPConfig
from .mc_dropout import MCDropout, MCDropoutConfig
from .mle import MLE, MLEConfig
from .pvera import PVeRA, PVeRAConfig
from .sa_bnn import SABNN, SABNNConfig
from .sam import SAM, SAMConfig
from .sgld import SGLD, SGLDConfig
from .svgd import SteinVGD, SVGDConfig

__all__ = [
    "FFT",
    "IBDR",
    "IVON",
    "MAP",
    "METHODS",
    "MLE",
    "SABNN",
    "SAM",
    "SGLD",
    "BBBConfig",
    "BayesByBackprop",
    "DeepEnsemble",
    "EnsembleConfig",
    "FFTConfig",
    "IBDRConfig",
    "IVONConfig",
    "LaplaceConfig",
    "LaplaceLoRA",
    "LaplacePosterior",
    "MAPConfig",
    "MCDropout",
    "MCDropoutConfig",
    "MLEConfig",
    "Method",
    "MethodConfig",
    "OptimSettings",
    "PVeRA",
    "PVeRAConfig",
    "SABNNConfig",
    "SAMConfig",
    "SGLDConfig",
    "SVGDConfig",
    "SteinVGD",
    "create_method",
]
