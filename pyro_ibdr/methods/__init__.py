"""Inference methods on one Bayesian LoRA model; each is one small module registered by name."""

from .base import METHODS, Method, OptimSettings, create_method, set_learning_rate
from .ibdr import IBDR

__all__ = ["IBDR", "METHODS", "Method", "OptimSettings", "create_method", "set_learning_rate"]
