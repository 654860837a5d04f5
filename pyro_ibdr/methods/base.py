"""The interface every inference method implements, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyro.optim
import torch

from ..functional import Inputs
from ..model import BayesianLoRA
from ..posterior import Posterior

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class OptimSettings:
    """The weights' optimiser; ``lr`` is the base rate that schedules scale."""

    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def pyro_optimizer(self) -> pyro.optim.PyroOptim:
        """A Pyro optimiser (one torch optimiser per parameter tensor)."""
        if self.optimizer == "sgd":
            return pyro.optim.SGD({"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay})
        if self.optimizer == "adamw":
            return pyro.optim.AdamW({"lr": self.lr, "weight_decay": self.weight_decay})
        return pyro.optim.Adam({"lr": self.lr, "weight_decay": self.weight_decay})


def set_learning_rate(optim: pyro.optim.PyroOptim, lr: float) -> None:
    """Set the rate of every torch optimiser inside a Pyro optimiser, and of those it creates later."""
    if isinstance(optim.pt_optim_args, dict):
        optim.pt_optim_args["lr"] = lr
    for torch_optim in optim.optim_objs.values():
        for group in torch_optim.param_groups:
            group["lr"] = lr


class Method(ABC):
    """One inference method over a :class:`~pyro_ibdr.BayesianLoRA` model.

    Subclasses set ``name`` (registered on definition), implement :meth:`step` (one minibatch update,
    returning the terms to log) and :meth:`posterior`, and report :attr:`passes_per_step`: the number of
    forward+backward passes over B examples one step costs (K particles × ascent passes), the unit in which
    comparisons state their compute.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            METHODS[cls.name] = cls

    def __init__(self, model: BayesianLoRA, optim: OptimSettings | None = None, *, seed: int = 0) -> None:
        self.model = model
        self.optim_settings = optim or OptimSettings()
        self.seed = seed
        self.lr = self.optim_settings.lr

    @property
    @abstractmethod
    def passes_per_step(self) -> int: ...

    @abstractmethod
    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        """One update on a minibatch; returns named scalars (always including ``"loss"``)."""

    @abstractmethod
    def posterior(self) -> Posterior:
        """The current posterior (detached copies of the learned tensors)."""

    def set_lr(self, lr: float) -> None:
        """Apply a scheduled learning rate."""
        self.lr = lr

    def state(self) -> dict[str, Any]:
        """Extra state to checkpoint besides the posterior (e.g. IBDR's λ)."""
        return {}


def create_method(name: str, model: BayesianLoRA, **options: Any) -> Method:
    """Build a registered method by name, e.g. ``create_method("ibdr", model, num_particles=4)``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name](model, **options)
