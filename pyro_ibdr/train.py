"""One training loop for every inference method: schedule, seeding, logging, timing and memory.

Pyro's param store is global, so :func:`fit` clears it first and resets a method instance passed to it
(:meth:`~pyro_ibdr.methods.Method.reset`): runs in one process do not leak into each other, and an instance that
stepped before starts from its initialisation again.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from .distributed import Mode, average_terms, is_main_process, mode, parallel, shard_batch, world_size
from .methods.base import Method, OptimSettings, create_method
from .model import BayesianLoRA
from .posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior, Posterior
from .precision import Precision, autocast
from .predictive import split_batch, to_device
from .presets import Preset, get_preset
from .resume import (
    fingerprint_difference,
    load_training_state,
    loader_generators,
    rng_state,
    save_training_state,
    set_rng_state,
)
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
    :ivar resumed_at_step: the step at which this call continued a snapshot (0: it ran from the start).
    :ivar preset: the name of the preset the run used, or None.
    :ivar distributed: the distributed mode (``"data"``, ``"particle"``) and the number of processes, or None.
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
    resumed_at_step: int = 0
    preset: str | None = None
    distributed: dict[str, Any] | None = None


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


def _build_method(
    method: Method | str, model: BayesianLoRA, optim: OptimSettings | None, seed: int, options: dict[str, Any],
    preset: Preset | None,
) -> Method:
    if isinstance(method, Method):
        if optim is not None or options or preset is not None:
            raise ValueError("optim, preset and method options apply only when the method is given by name")
        if method.model is not model:
            raise ValueError("the method instance was built for a different model")
        method.reset()  # an instance that stepped before restarts from its initialisation
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a Method or a registered name, got {type(method).__name__}")
    if preset is not None:
        optim = optim or preset.optim_for(method)
        options = {**preset.method_options(method), **options}
    return create_method(method, model, optim=optim, seed=seed, **options)


class _OnDevice:
    """A re-iterable view of a loader whose batches (x, y) are moved to ``device``."""

    def __init__(self, loader: Iterable[tuple[Any, torch.Tensor]], device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.loader:
            x, y = split_batch(batch)
            yield to_device(x, self.device), y.to(self.device)


def _resolve_schedule(schedule: Schedule | ScheduleName | None, total_steps: int, preset: Preset | None) -> Schedule:
    """The given schedule; by name with the preset's warm-up (else the authors' 500 steps); else the preset's."""
    if isinstance(schedule, str):
        return make_schedule(schedule, total_steps, preset.warmup_steps if preset else AUTHORS_WARMUP_STEPS)
    if schedule is not None:
        return schedule
    return preset.make_schedule(total_steps) if preset else Constant()


def posterior_scale(posterior: Posterior) -> float | None:
    """σ of a particle mixture (the mean over particles when each has its own), the mean scale of a Gaussian
    posterior, else None (for logging)."""
    if isinstance(posterior, ParticlePosterior):
        return float(posterior.sigma.mean())
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


@dataclass
class _Progress:
    """Where a run stands: steps and epochs done, the history so far, the wall time of earlier segments."""

    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    earlier_wall_time_s: float = 0.0
    posterior: Posterior | None = None


def _fingerprint(runner: Method, model: BayesianLoRA, loader: Iterable, seed: int, total: int,
                 schedule: Schedule | ScheduleName | None, preset: Preset | None,
                 precision: Precision) -> dict[str, Any]:
    """What a snapshot must share with the run that continues it."""
    return {
        "preset": preset.name if preset is not None else None,
        "precision": precision,
        "method": runner.name,
        "config": runner.config.to_dict(),
        "optim": asdict(runner.optim_settings),
        "seed": seed,
        "total_steps": total,
        "batches_per_epoch": len(loader) if hasattr(loader, "__len__") else None,
        "schedule": schedule if isinstance(schedule, str) else getattr(schedule, "__qualname__", repr(schedule)),
        "param_names": list(model.spec.names),
        "param_shapes": [list(shape) for shape in model.spec.shapes],
        "num_data": model.num_data,
    }


def _resume(path: Path, runner: Method, fingerprint: dict[str, Any], generators: list[torch.Generator]) -> _Progress:
    """The progress stored in the snapshot at ``path`` (restored into ``runner`` and the RNGs), or a fresh start."""
    snapshot = load_training_state(path)
    if snapshot is None:
        return _Progress()
    differences = fingerprint_difference(snapshot["fingerprint"], fingerprint)
    if differences:
        raise ValueError(
            f"the training snapshot {path} was written by a run with other settings ({'; '.join(differences[:5])}); "
            "delete it to start afresh, or pass another checkpoint path"
        )
    runner.load_state_dict(snapshot["method"])
    set_rng_state(snapshot["rng"], generators)
    posterior = snapshot["posterior"]
    device = runner.model.theta0.device
    posterior = {**posterior, "tensors": {name: value.to(device) for name, value in posterior["tensors"].items()}}
    return _Progress(snapshot["step"], snapshot["epoch"], snapshot["history"], snapshot["wall_time_s"],
                     Posterior.from_state_dict(posterior))


def _save_snapshot(path: Path, runner: Method, fingerprint: dict[str, Any], generators: list[torch.Generator],
                   progress: _Progress, wall_time_s: float) -> None:
    save_training_state(path, {
        "fingerprint": fingerprint,
        "method": runner.state_dict(),
        "rng": rng_state(generators),
        "step": progress.step,
        "epoch": progress.epoch,
        "history": progress.history,
        "wall_time_s": wall_time_s,
        "posterior": progress.posterior.state_dict(),
    })


def _check_checkpoint_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of epochs, got {every!r}")


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
    distributed: Mode | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    precision: Precision = "fp32",
    **method_options: Any,
) -> FitResult:
    """Train ``method`` on ``model`` for exactly one of ``epochs`` (passes over the loader) or ``steps``.

    Clears Pyro's global param store and seeds torch, Python and NumPy through ``pyro.set_rng_seed(seed)``,
    then builds the method by name (``create_method(name, model, optim=optim, seed=seed, **method_options)``) or
    resets the given instance to its initialisation (:meth:`~pyro_ibdr.methods.Method.reset`), and tells it the
    run's length (``method.plan(total_steps)``).
    Every step sets the rate lr_t = ``optim.lr`` · schedule(t) and calls ``method.step(x, y)`` on a batch
    moved to ``device`` (default: the device of the model's θ₀; the model must already live there).
    With ``steps``, the loader is re-iterated as often as needed and every pass is one epoch of the history.
    After the last step ``method.finalize`` gets the loader (batches moved to ``device``) for a post-hoc step such
    as a Laplace fit; its time counts in ``wall_time_s``.

    A ``preset`` (:data:`~pyro_ibdr.presets.PAPER`, :data:`~pyro_ibdr.presets.OFFICIAL`, or their names)
    supplies what is not given explicitly: ``optim``, ``schedule``, the method's options
    (``preset.method_options(name)``, overridden by ``method_options``) and the run length (``preset.epochs``
    when neither ``epochs`` nor ``steps`` is given). The preset's batch size is the loader's business.

    Resuming: with ``checkpoint`` (a file path), a snapshot (:mod:`pyro_ibdr.resume`) is written atomically
    at the end of every ``checkpoint_every``-th epoch and of the last one, after the epoch's record and
    before the callbacks. When the file exists at the start, the run continues from it instead of from the
    beginning and ends with the same numbers as a run that was never interrupted (same posterior, history
    and method state; the wall time adds up the segments). The loader must be built as in the interrupted
    run (its generators are restored, not rebuilt), and the file is kept when the run ends.

    :param train_loader: re-iterable batches (x, y); x a tensor or a dict of tensors.
    :param schedule: ``"constant"``, ``"warmup_cosine"`` (warm-up of the preset's ``warmup_steps``, else the
        authors' 500 steps; a run not longer than that is an error) or a callable step ↦ multiplier; None:
        the preset's schedule, else constant.
    :param callbacks: called after every epoch with ``(epoch, record)``.
    :param progress: show a progress bar (only when stderr is a terminal, on the main process) with the loss
        and λ.
    :param distributed: train with every process of the ``torch.distributed`` group (launched with
        ``torchrun``): ``"data"`` (each process steps on its contiguous shard of every batch; the logged terms
        are averaged over the shards) or ``"particle"`` (each process holds K/W particles); see
        :mod:`pyro_ibdr.distributed`. Every process calls ``fit`` with the same arguments and a loader that
        yields the same batches (seed its shuffling), and gets the same result, with the whole posterior: one
        process's run, to float rounding. Callbacks run on every process.
    :param precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` to run every step under ``torch.autocast``
        (:mod:`pyro_ibdr.precision`: θ and the optimiser state stay float32, no gradient scaler).
    :param checkpoint: the snapshot file to resume from and write to (None: no snapshots; one process only).
    :param checkpoint_every: epochs between snapshots (≥ 1).
    :raises FloatingPointError: naming the step at which the loss became NaN or infinite.
    :raises ValueError: for a method that does not support the ``distributed`` mode; when the snapshot was
        written by a run with other settings (the message lists them), or is damaged.
    """
    if not isinstance(model, BayesianLoRA):
        raise TypeError(f"model must be a BayesianLoRA, got {type(model).__name__}")
    if not all(callable(callback) for callback in callbacks):
        raise TypeError(f"callbacks must be callables (epoch, record) -> None, got {list(callbacks)!r}")
    preset = get_preset(preset) if preset is not None else None
    if preset is not None and preset.epochs is not None and epochs is None and steps is None:
        epochs = preset.epochs
    _check_length(epochs, steps)
    _check_checkpoint_every(checkpoint_every)
    total = _total_steps(train_loader, epochs, steps)
    multiplier = _resolve_schedule(schedule, total, preset)
    device = torch.device(device) if device is not None else model.theta0.device
    mixed = autocast(precision, device)  # checks the setting before any work
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with parallel(distributed):
        runner = _build_method(method, model, optim, seed, method_options, preset)
        runner.plan(total)
        if runner.distributed_mode != mode():
            raise ValueError(f"the method instance was built for distributed={runner.distributed_mode!r}: build it "
                             f"inside pyro_ibdr.distributed.parallel({distributed!r}), or pass the method's name")
        base_lr = runner.optim_settings.lr
        generators = loader_generators(train_loader)
        fingerprint = _fingerprint(runner, model, train_loader, seed, total, schedule, preset, precision)
        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None:
            if mode() is not None:
                raise ValueError("training snapshots (checkpoint=...) are written by one process; they are not "
                                 f"supported under distributed={distributed!r}")
            runner.check_resumable()
        done = _resume(path, runner, fingerprint, generators) if path is not None else _Progress()
        resumed_at = done.step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        quiet = not progress or not sys.stderr.isatty() or not is_main_process()
        bar = tqdm(total=total, initial=done.step, disable=quiet, desc=runner.name, leave=False)
        lr = done.history[-1]["lr"] if done.history else base_lr
        prepared = False
        start = time.perf_counter()
        try:
            while done.step < total:
                sums: dict[str, float] = defaultdict(float)
                count = 0
                for batch in train_loader:
                    x, y = shard_batch(*split_batch(batch))
                    x, y = to_device(x, device), y.to(device)
                    if not prepared:
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            runner.prepare(x, y)
                        prepared = True
                    lr = base_lr * multiplier(done.step)
                    runner.set_lr(lr)
                    try:
                        with mixed:
                            terms = runner.step(x, y)
                    except FloatingPointError as err:
                        raise FloatingPointError(f"training failed at step {done.step}: {err}") from err
                    terms = average_terms(terms, y.shape[0])
                    _check_loss(done.step, terms)
                    for name, value in terms.items():
                        sums[name] += value
                    count += 1
                    done.step += 1
                    bar.update()
                    bar.set_postfix({k: f"{terms[k]:.4g}" for k in ("loss", "lambda") if k in terms}, refresh=False)
                    if done.step == total:
                        break
                if count == 0 and done.epoch == 0:
                    raise ValueError("the training loader yielded no batches in pass 1: the training data is empty")
                if count == 0:
                    raise ValueError(
                        f"the training loader yielded no batches in pass {done.epoch + 1}; a generator can be "
                        "iterated only once, so pass a re-iterable loader (a DataLoader or a list of batches)"
                    )
                done.posterior = runner.posterior()
                record = _epoch_record(sums, count, done.posterior, done.epoch, done.step, lr)
                done.history.append(record)
                done.epoch += 1
                if path is not None and (done.epoch % checkpoint_every == 0 or done.step == total):
                    _save_snapshot(path, runner, fingerprint, generators, done,
                                   done.earlier_wall_time_s + time.perf_counter() - start)
                for callback in callbacks:
                    callback(done.epoch - 1, record)
        finally:
            bar.close()
        on_device = _OnDevice(train_loader, device)
        if not prepared:  # resumed from a snapshot of the last step: finalize may need the lazily built guide
            shuffles = [g.get_state() for g in generators]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                runner.prepare(*next(iter(on_device)))
            for generator, state in zip(generators, shuffles, strict=True):  # finalize sees the loader's next order
                generator.set_state(state)
        runner.finalize(on_device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = done.earlier_wall_time_s + time.perf_counter() - start
        posterior = runner.posterior()
    return FitResult(
        posterior=posterior,
        method=runner.name,
        history=done.history,
        steps=done.step,
        wall_time_s=wall,
        time_per_step_s=wall / done.step,
        passes_per_step=runner.passes_per_step,
        peak_memory_mb=peak_memory_mb(device),
        num_particles_or_samples=num_particles_or_samples(runner, posterior),
        state=runner.state(),
        config=runner.config.to_dict(),
        resumed_at_step=resumed_at,
        preset=preset.name if preset is not None else None,
        distributed={"mode": distributed, "world_size": world_size()} if distributed is not None else None,
    )
