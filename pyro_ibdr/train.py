"""One training loop for every inference method: schedule, seeding, logging, timing and memory.

Pyro's param store is global, so :func:`fit` clears it first: runs in one process do not leak into each
other, and a :class:`~pyro_ibdr.methods.Method` instance passed to ``fit`` starts from its initialisation.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from .methods.base import Method, OptimSettings, create_method
from .model import BayesianLoRA
from .posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior, Posterior
from .precision import Precision, autocast
from .predictive import to_device
from .presets import Preset, get_preset
from .schedules import AUTHORS_WARMUP_STEPS, Constant, Schedule, ScheduleName, make_schedule

#: Called after every epoch with (epoch index from 0, that epoch's log record).
Callback = Callable[[int, dict[str, float]], None]


@dataclass
class FitResult:
    """What one :func:`fit` run produced and what it cost.

    :ivar posterior: the learned posterior over θ.
    :ivar method: the method's registered name.
    :ivar history: one record per epoch: the epoch's mean of every term the steps returned (``loss``,
        ``lambda``, ``cost``, ``diversity``, ``kl``, ...), plus ``sigma`` for posteriors with a scale,
        ``epoch``, ``steps`` (steps so far) and ``lr`` (the last scheduled rate).
    :ivar steps: optimisation steps taken.
    :ivar wall_time_s: wall time of the training loop.
    :ivar time_per_step_s: ``wall_time_s / steps``.
    :ivar passes_per_step: forward+backward passes over a minibatch per step (the compute unit).
    :ivar peak_memory_mb: peak CUDA memory allocated during the run on a CUDA device; otherwise the
        process's peak resident set size (a process-wide high-water mark, not this run's alone).
    :ivar num_particles_or_samples: K particles, S stored samples, or the method's training samples.
    :ivar state: the method's extra state (e.g. IBDR's λ and settings).
    :ivar config: the method's config as plain values (``method.config.to_dict()``).
    :ivar preset: the name of the preset the run used, or None.
    """

    posterior: Posterior
    method: str
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    time_per_step_s: float = 0.0
    passes_per_step: int = 0
    peak_memory_mb: float = 0.0
    num_particles_or_samples: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None


def _check_length(epochs: int | None, steps: int | None) -> None:
    if (epochs is None) == (steps is None):
        raise ValueError(f"pass exactly one of epochs and steps, got epochs={epochs}, steps={steps}")
    value, name = (epochs, "epochs") if steps is None else (steps, "steps")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _total_steps(loader: Iterable, epochs: int | None, steps: int | None) -> int:
    """Steps to run; a loader with ``len() == 0`` is refused here, before the method is built or any step runs."""
    try:
        per_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    if per_epoch == 0:
        raise ValueError("the training loader is empty (len 0): no training data, or fewer examples than one "
                         "batch with drop_last=True")
    if steps is not None:
        return steps
    if per_epoch is None:
        raise ValueError("training for a number of epochs needs a loader with len(); pass steps instead")
    return epochs * per_epoch


def _numbered_batches(loader: Iterable, total_steps: int) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) pairs: passes over ``loader`` (re-iterated as needed) until ``total_steps`` batches."""
    step, epoch = 0, 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield epoch, batch
            step += 1
            if step == total_steps:
                return
        if empty and epoch == 0:
            raise ValueError("the training loader yielded no batches in pass 1: the training data is empty")
        if empty:
            raise ValueError(
                f"the training loader yielded no batches in pass {epoch + 1}; a generator can be iterated only "
                "once, so pass a re-iterable loader (a DataLoader or a list of batches)"
            )
        epoch += 1


def _build_method(
    method: Method | str, model: BayesianLoRA, optim: OptimSettings | None, seed: int, options: dict[str, Any],
    preset: Preset | None,
) -> Method:
    if isinstance(method, Method):
        if optim is not None or options or preset is not None:
            raise ValueError("optim, preset and method options apply only when the method is given by name")
        if method.model is not model:
            raise ValueError("the method instance was built for a different model")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a Method or a registered name, got {type(method).__name__}")
    if preset is not None:
        optim = optim or preset.optim
        options = {**preset.method_options(method), **options}
    return create_method(method, model, optim=optim, seed=seed, **options)


class _OnDevice:
    """A re-iterable view of a loader whose batches (x, y) are moved to ``device``."""

    def __init__(self, loader: Iterable[tuple[Any, torch.Tensor]], device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for x, y in self.loader:
            yield to_device(x, self.device), y.to(self.device)


def _resolve_schedule(schedule: Schedule | ScheduleName | None, total_steps: int, preset: Preset | None) -> Schedule:
    """The given schedule; by name with the preset's warm-up (else the authors' 500 steps); else the preset's."""
    if isinstance(schedule, str):
        return make_schedule(schedule, total_steps, preset.warmup_steps if preset else AUTHORS_WARMUP_STEPS)
    if schedule is not None:
        return schedule
    return preset.make_schedule(total_steps) if preset else Constant()


def posterior_scale(posterior: Posterior) -> float | None:
    """σ of a particle mixture, the mean scale of a Gaussian posterior, else None (for logging)."""
    if isinstance(posterior, ParticlePosterior):
        return float(posterior.sigma)
    if isinstance(posterior, GaussianPosterior):
        return float(posterior.scale.mean())
    return None


def num_particles_or_samples(method: Method, posterior: Posterior) -> int | None:
    """K particles or S samples behind a method: its own ``num_particles``/``num_samples`` attribute, its
    guide's ``num_particles``, else the rows of a particle or sample posterior."""
    for owner in (method, getattr(method, "guide", None)):
        for attribute in ("num_particles", "num_samples"):
            value = getattr(owner, attribute, None)
            if isinstance(value, int):
                return value
    if isinstance(posterior, ParticlePosterior):
        return posterior.num_particles
    if isinstance(posterior, EmpiricalPosterior):
        return posterior.samples.shape[0]
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a CUDA device, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _check_loss(step: int, terms: dict[str, float]) -> None:
    if "loss" not in terms:
        raise KeyError(f"the method's step returned no 'loss' (got {sorted(terms)})")
    if not math.isfinite(terms["loss"]):
        raise FloatingPointError(
            f"the loss is not finite at step {step}: {terms}; lower the learning rate or check the inputs"
        )


def _epoch_record(
    sums: dict[str, float], count: int, posterior: Posterior, epoch: int, step: int, lr: float
) -> dict[str, float]:
    """The epoch's mean of every logged term, the posterior's scale, and where the run stands."""
    record = {name: total / count for name, total in sums.items()}
    sigma = posterior_scale(posterior)
    if sigma is not None:
        record["sigma"] = sigma
    record.update(epoch=epoch, steps=step, lr=lr)
    return record


def fit(
    method: Method | str,
    model: BayesianLoRA,
    train_loader: Iterable[tuple[Any, torch.Tensor]],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    optim: OptimSettings | None = None,
    schedule: Schedule | ScheduleName | None = None,
    preset: Preset | str | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: Precision = "fp32",
    **method_options: Any,
) -> FitResult:
    """Train ``method`` on ``model`` for exactly one of ``epochs`` (passes over the loader) or ``steps``.

    Clears Pyro's global param store and seeds torch, Python and NumPy through ``pyro.set_rng_seed(seed)``,
    then builds the method by name (``create_method(name, model, optim=optim, seed=seed, **method_options)``).
    Every step sets the rate lr_t = ``optim.lr`` · schedule(t) and calls ``method.step(x, y)`` on a batch
    moved to ``device`` (default: the device of the model's θ₀; the model must already live there).
    With ``steps``, the loader is re-iterated as often as needed and every pass is one epoch of the history.
    After the last step ``method.finalize`` gets the loader (batches moved to ``device``) for a post-hoc step such
    as a Laplace fit; its time counts in ``wall_time_s``.

    A ``preset`` (:data:`~pyro_ibdr.presets.PAPER`, :data:`~pyro_ibdr.presets.OFFICIAL`, or their names)
    supplies what is not given explicitly: ``optim``, ``schedule``, the method's options
    (``preset.method_options(name)``, overridden by ``method_options``) and the run length (``preset.epochs``
    when neither ``epochs`` nor ``steps`` is given). The preset's batch size is the loader's business.

    :param train_loader: re-iterable batches (x, y); x a tensor or a dict of tensors.
    :param schedule: ``"constant"``, ``"warmup_cosine"`` (warm-up of the preset's ``warmup_steps``, else the
        authors' 500 steps; a run not longer than that is an error) or a callable step ↦ multiplier; None:
        the preset's schedule, else constant.
    :param callbacks: called after every epoch with ``(epoch, record)``.
    :param progress: show a progress bar (only when stderr is a terminal) with the loss and λ.
    :param precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` to run every step under ``torch.autocast``
        (:mod:`pyro_ibdr.precision`: θ and the optimiser state stay float32, no gradient scaler).
    :raises FloatingPointError: naming the step at which the loss became NaN or infinite.
    """
    preset = get_preset(preset) if preset is not None else None
    if preset is not None and preset.epochs is not None and epochs is None and steps is None:
        epochs = preset.epochs
    _check_length(epochs, steps)
    total = _total_steps(train_loader, epochs, steps)
    multiplier = _resolve_schedule(schedule, total, preset)
    device = torch.device(device) if device is not None else model.theta0.device
    mixed = autocast(precision, device)  # checks the setting before any work
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    runner = _build_method(method, model, optim, seed, method_options, preset)
    base_lr = runner.optim_settings.lr
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history: list[dict[str, float]] = []
    bar = tqdm(total=total, disable=not progress or not sys.stderr.isatty(), desc=runner.name, leave=False)
    step, lr = 0, base_lr
    start = time.perf_counter()
    try:
        for epoch, batches in groupby(_numbered_batches(train_loader, total), key=itemgetter(0)):
            sums: dict[str, float] = defaultdict(float)
            count = 0
            for _, (x, y) in batches:
                lr = base_lr * multiplier(step)
                runner.set_lr(lr)
                try:
                    with mixed:
                        terms = runner.step(to_device(x, device), y.to(device))
                except FloatingPointError as err:
                    raise FloatingPointError(f"training failed at step {step}: {err}") from err
                _check_loss(step, terms)
                for name, value in terms.items():
                    sums[name] += value
                count += 1
                step += 1
                bar.update()
                bar.set_postfix({k: f"{terms[k]:.4g}" for k in ("loss", "lambda") if k in terms}, refresh=False)
            record = _epoch_record(sums, count, runner.posterior(), epoch, step, lr)
            history.append(record)
            for callback in callbacks:
                callback(epoch, record)
    finally:
        bar.close()
    runner.finalize(_OnDevice(train_loader, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    posterior = runner.posterior()
    return FitResult(
        posterior=posterior,
        method=runner.name,
        history=history,
        steps=step,
        wall_time_s=wall,
        time_per_step_s=wall / step,
        passes_per_step=runner.passes_per_step,
        peak_memory_mb=peak_memory_mb(device),
        num_particles_or_samples=num_particles_or_samples(runner, posterior),
        state=runner.state(),
        config=runner.config.to_dict(),
        preset=preset.name if preset is not None else None,
    )
