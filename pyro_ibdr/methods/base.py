"""The interface every inference method implements, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal

import pyro.optim
import torch
from pyro import poutine

from ..functional import Inputs
from ..model import BayesianLoRA
from ..posterior import Posterior

METHODS: dict[str, type[Method]] = {}

#: What a method trains: LoRA factors (peft ``LoraConfig``), every weight of a plain network, or peft's PVeRA vectors.
Adapter = Literal["lora", "full", "pvera"]


ObjectiveScale = Literal["elbo", "per_example"]


@dataclass(frozen=True)
class OptimSettings:
    """The weights' optimiser; ``lr`` is the base rate that schedules scale.

    ``objective_scale`` fixes the units of the objective whose gradient the optimiser follows, and so what
    ``lr`` means:

    - ``"elbo"`` (Pyro's default): the negative ELBO, a minibatch sum scaled to the data set,
      (N/B) Σ_b −log p(y_b | x_b, θ) + KL. Its gradient is N times that of a per-example mean.
    - ``"per_example"``: the negative ELBO divided by N, i.e. the per-example mean loss + KL/N: the scale
      that SGD learning rates from papers assume (the IBDR authors' 0.1–2.0). Implemented the Pyro way, with
      ``pyro.poutine.scale(scale=1/N)`` around the step, which scales model and guide sites alike.

    Adam and AdamW are nearly invariant to the scale; SGD is not. SGLD and SVGD state how they read it.
    """

    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    objective_scale: ObjectiveScale = "elbo"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.objective_scale not in ("elbo", "per_example"):
            raise ValueError(f"objective_scale must be 'elbo' or 'per_example', got {self.objective_scale!r}")

    def scale_factor(self, num_data: int) -> float:
        """The factor from ELBO units to the objective's units: 1 or 1/N."""
        return 1.0 if self.objective_scale == "elbo" else 1.0 / num_data

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


@dataclass(frozen=True)
class MethodConfig:
    """The settings of one inference method (as peft's ``LoraConfig``): each method module defines a subclass.

    A config holds plain values only, so a saved run rebuilds its method from ``config.to_dict()``.

    :cvar size_field: the field that sets the ensemble size (K particles, or S training samples), or None.
    """

    size_field: ClassVar[str | None] = None

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build the config from keyword options; an unknown option is an error naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {unknown}; valid options: {sorted(valid)}")
        return cls(**options)

    def with_size(self, size: int) -> MethodConfig:
        """A copy with the ensemble size set (unchanged when the method has none)."""
        return replace(self, **{self.size_field: size}) if self.size_field else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method(ABC):
    """One inference method over a :class:`~pyro_ibdr.BayesianLoRA` model.

    Subclasses set ``name`` (registered on definition: a subclass without its own ``name`` is not
    registered, and a name taken by another class is an error) and ``config_class``, implement
    :meth:`step` (one minibatch update, returning the terms to log) and :meth:`posterior`, and report
    :attr:`passes_per_step`: the number of forward+backward passes over B examples one step costs
    (K particles × ascent passes), the unit in which comparisons state their compute. A method that keeps
    a Pyro optimiser in ``self.optim`` gets its scheduled learning rate through :meth:`set_lr`. A post-hoc step
    on the trained model (e.g. fitting a Laplace approximation) goes in :meth:`finalize`, which
    :func:`~pyro_ibdr.fit` calls once after the last step.

    :cvar adapter: the network the method expects, read by the experiment CLIs when they build it: ``"lora"``
        (peft LoRA, the default), ``"full"`` (a plain network, every weight in θ) or ``"pvera"`` (peft PVeRA).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    adapter: ClassVar[Adapter] = "lora"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        registered = METHODS.get(name)
        if registered is not None and registered.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"method name {name!r} is already registered by {registered.__module__}.{registered.__qualname__}; "
                "give the new class its own name"
            )
        METHODS[name] = cls

    def __init__(
        self, model: BayesianLoRA, config: MethodConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.optim_settings = optim or OptimSettings()
        self.seed = seed
        self.lr = self.optim_settings.lr
        self.optim: pyro.optim.PyroOptim | None = None

    @property
    @abstractmethod
    def passes_per_step(self) -> int: ...

    @abstractmethod
    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        """One update on a minibatch; returns named scalars (always including ``"loss"``)."""

    @abstractmethod
    def posterior(self) -> Posterior:
        """The current posterior (detached copies of the learned tensors)."""

    def objective_units(self) -> poutine.messenger.Messenger:
        """A context that puts the model's and guide's log-densities in the units of
        ``optim.objective_scale`` (``poutine.scale``); SVI-based methods run their steps inside it."""
        return poutine.scale(scale=self.optim_settings.scale_factor(self.model.num_data))

    def set_lr(self, lr: float) -> None:
        """Apply a scheduled learning rate (to ``self.optim`` when the method has one)."""
        self.lr = lr
        if self.optim is not None:
            set_learning_rate(self.optim, lr)

    def finalize(self, train_loader: Iterable[tuple[Inputs, torch.Tensor]]) -> None:  # noqa: B027 (a no-op hook)
        """A post-hoc step after training, given re-iterable training batches (x, y) on the model's device.

        The default does nothing.
        """

    def state(self) -> dict[str, Any]:
        """Extra state to checkpoint besides the posterior (e.g. IBDR's λ)."""
        return {}


def create_method(
    name: str, model: BayesianLoRA, *, optim: OptimSettings | None = None, seed: int = 0, **options: Any
) -> Method:
    """Build a registered method by name, e.g. ``create_method("ibdr", model, num_particles=4)``.

    ``options`` are the fields of the method's config class (``METHODS[name].config_class``).

    :raises ValueError: for an unknown name (the message lists the registered ones).
    :raises TypeError: for an option the method does not have.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(model, cls.config_class.from_options(**options), optim, seed=seed)
