"""The interface every inference method implements, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal

import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI

from .. import distributed
from ..checks import check_field_types
from ..functional import Inputs, batch_size
from ..model import BayesianLoRA
from ..posterior import Posterior
from ..registry import register_subclass
from ..resume import load_param_store_state, param_store_state

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
        check_field_types(self)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}")
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
    """Set the rate of every torch optimiser inside a Pyro optimiser, and of those it creates later.

    Pyro creates a parameter's torch optimiser at its first step and only then loads a state given by
    ``set_state``; the rate stored in such a pending state is set too, or that first step would use the
    rate of the step before the snapshot.
    """
    if isinstance(optim.pt_optim_args, dict):
        optim.pt_optim_args["lr"] = lr
    pending = [state.get("optimizer", state) for state in optim._state_waiting_to_be_consumed.values()]
    groups = [group for state in pending for group in state["param_groups"]]
    for torch_optim in optim.optim_objs.values():
        groups += torch_optim.param_groups
    for group in groups:
        group["lr"] = lr


@dataclass(frozen=True)
class MethodConfig:
    """The settings of one inference method (as peft's ``LoraConfig``): each method module defines a subclass.

    A config holds plain values only, so a saved run rebuilds its method from ``config.to_dict()``.

    :cvar size_field: the field that sets the ensemble size (K particles, or S training samples), or None.
    :cvar test_samples: the method's own default number of posterior draws at test time (e.g. BLoB's N = 10),
        or None to leave it to the caller.
    """

    size_field: ClassVar[str | None] = None
    test_samples: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        """Every field must match its annotation (subclasses that check more call this first)."""
        check_field_types(self)

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

    **Several processes.** :attr:`distributed_modes` names the modes of :func:`pyro_ibdr.distributed.parallel`
    the method supports; building it inside another mode is an error naming the supported ones. A data-parallel
    step receives this process's shard of the batch and must leave every process with the update of the whole
    batch; SVI-based methods get that from :func:`distributed_svi`.

    Resuming (``fit(..., checkpoint=...)``) works for a new method without extra code when its training
    state is Pyro's param store and ``self.optim``. Otherwise it extends :meth:`state_dict` and
    :meth:`load_state_dict` with the rest (step counters, chains, dual variables, generators), and a method
    that sets itself up lazily from the first batch while drawing random numbers (autoguide prototypes)
    does that in :meth:`prepare`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: The modes of :func:`pyro_ibdr.distributed.parallel` this method runs under (``"data"``, ``"particle"``).
    distributed_modes: ClassVar[frozenset[str]] = frozenset()
    adapter: ClassVar[Adapter] = "lora"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_subclass(METHODS, cls, "name")

    def __new__(cls, *args: Any, **kwargs: Any) -> Method:
        method = super().__new__(cls)
        method._init_arguments = (args, kwargs)  # what reset() constructs again from, whatever the signature
        return method

    def __init__(
        self, model: BayesianLoRA, config: MethodConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        if not isinstance(model, BayesianLoRA):
            raise TypeError(f"model must be a BayesianLoRA, got {type(model).__name__}")
        if optim is not None and not isinstance(optim, OptimSettings):
            raise TypeError(f"optim must be an OptimSettings, e.g. OptimSettings(lr=1e-3), got {type(optim).__name__}")
        current = distributed.mode()
        if current is not None and current not in self.distributed_modes:
            supported = ", ".join(repr(m) for m in sorted(self.distributed_modes)) or "none"
            raise ValueError(f"method {self.name!r} does not run under distributed={current!r} "
                             f"(supported: {supported})")
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.model = model
        self.config = config
        #: The distributed mode this method was built for (None: one process).
        self.distributed_mode = current
        self.optim_settings = optim or OptimSettings()
        self.seed = seed
        self.lr = self.optim_settings.lr
        self.optim: pyro.optim.PyroOptim | None = None
        self.planned_steps: int | None = None

    @property
    @abstractmethod
    def passes_per_step(self) -> int: ...

    @abstractmethod
    def step(self, x: Inputs, y: torch.Tensor) -> dict[str, float]:
        """One update on a minibatch; returns named scalars (always including ``"loss"``)."""

    @abstractmethod
    def posterior(self) -> Posterior:
        """The current posterior (detached copies of the learned tensors)."""

    def plan(self, total_steps: int) -> None:
        """Told by :func:`~pyro_ibdr.fit` how many steps the run will take, before the first one; kept in
        :attr:`planned_steps` (None until then) for methods with stages, e.g. BayesTune, that split the budget."""
        self.planned_steps = total_steps

    def reset(self) -> None:
        """Return to the state right after construction, as :func:`~pyro_ibdr.fit` does before every run.

        A method's state is more than its parameters in Pyro's param store (which ``fit`` clears): step counters,
        SGLD's chain, SVGD's initial particles, IBDR's λ, the optimiser. Every setting is in the constructor's
        arguments, so the constructor is run again on the arguments the instance was built with. Parameters in
        Pyro's param store are not touched here: clear the store first (``pyro.clear_param_store()``).
        """
        args, kwargs = self._init_arguments
        type(self).__init__(self, *args, **kwargs)

    def prepare(self, x: Inputs, y: torch.Tensor) -> None:
        """Build what the method sets up lazily from a first batch (e.g. an autoguide's prototype trace).

        :func:`~pyro_ibdr.fit` calls it on the first batch of every run segment (a fresh start and each
        resumption) with torch's generators forked, so that the set-up draws nothing from the streams the
        training steps use and a resumed run draws what an uninterrupted one does. Default: nothing.
        """
        return None

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
        """Extra state to report and checkpoint with the posterior (e.g. IBDR's λ and settings)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly from here (what :func:`~pyro_ibdr.fit` snapshots).

        The default covers the common case, a method whose learned tensors live in Pyro's param store and
        which steps them with ``self.optim``: the param store (unconstrained values and constraint names), the
        optimiser's per-parameter state (``PyroOptim.get_state()``: Adam moments, momentum buffers, step
        counts) and the current learning rate. A method that keeps training state anywhere else extends both
        this and :meth:`load_state_dict` (counters, a Markov chain, a dual variable, its own generators)::

            def state_dict(self):
                return {**super().state_dict(), "num_steps": self.num_steps}

            def load_state_dict(self, state):
                super().load_state_dict(state)
                self.num_steps = state["num_steps"]

        Values must be tensors or plain Python values (the snapshot is read with ``weights_only=True``).

        :raises NotImplementedError: when the method keeps a ``torch.nn.Parameter`` or a ``torch.optim.Optimizer``
            in an attribute but does not override this method (that state would be lost on resuming).
        """
        self.check_resumable()
        return {
            "param_store": param_store_state(),
            "optim": self.optim.get_state() if self.optim is not None else {},
            "lr": self.lr,
        }

    def check_resumable(self) -> None:
        """Refuse snapshots that would silently lose training state: a method keeping a ``torch.nn.Parameter`` or
        a ``torch.optim.Optimizer`` outside Pyro's param store must override :meth:`state_dict` and
        :meth:`load_state_dict`.

        :raises NotImplementedError: naming the attributes the default does not save.
        """
        if type(self).state_dict is not Method.state_dict:
            return
        unsaved = sorted(name for name, value in vars(self).items()
                         if isinstance(value, torch.nn.Parameter | torch.optim.Optimizer))
        if unsaved:
            raise NotImplementedError(
                f"{type(self).__name__} ({self.name!r}) keeps training state in {', '.join(unsaved)}, which the "
                "default Method.state_dict does not save; it cannot be resumed from a snapshot until it overrides "
                "state_dict/load_state_dict (run it without checkpoint=/--checkpoint-every 0)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a freshly built method (same model, config and optimiser settings)."""
        load_param_store_state(state["param_store"], self.model.theta0.device)
        if self.optim is not None:
            self.optim.set_state(state["optim"])
        self.set_lr(state["lr"])


class _ReducedGradients:
    """``SVI.loss_and_grads`` followed by :func:`~pyro_ibdr.distributed.reduce_gradients` on the parameters it
    touched (data parallelism: shard-weighted means; particle parallelism: sums of the parameters every process
    holds, i.e. all but the guide's ``sharded_params``)."""

    def __init__(self, loss_and_grads: Any) -> None:
        self.loss_and_grads = loss_and_grads

    def __call__(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Any:
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(model, guide, *args, **kwargs)
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        distributed.reduce_gradients(params, batch_size(args[0]), getattr(guide, "sharded_params", ()))
        return loss


def distributed_svi(model: Any, guide: Any, optim: pyro.optim.PyroOptim, loss: Any) -> SVI:
    """``pyro.infer.SVI(model, guide, optim, loss)`` whose steps reduce the gradients across processes between
    ``loss_and_grads`` and the optimiser step (:func:`~pyro_ibdr.distributed.reduce_gradients`; nothing happens
    outside a distributed mode). The returned loss stays this process's own."""
    svi = SVI(model, guide, optim, loss)
    svi.loss_and_grads = _ReducedGradients(svi.loss_and_grads)
    return svi


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
