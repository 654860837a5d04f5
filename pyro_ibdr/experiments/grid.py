"""A resumable grid of (task, method, seed) runs and its accuracy/ECE tables (paper Tables 1–3 style)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click
import pyro
import torch

from .. import distributed
from ..checkpoint import save_checkpoint
from ..evaluation import fixed_draws
from ..io import write_csv, write_json
from ..methods import METHODS
from ..metrics import EnsembleMode, calibration_bins, ensemble_probs, evaluate_predictions
from ..model import BayesianLoRA
from ..posterior import ParticlePosterior, Posterior
from ..precision import AUTOCAST_DTYPES, Precision
from ..predictive import predict_loader
from ..train import fit, peak_memory_mb
from .plots import reliability_diagram
from .store import ResultStore, Unit, canonical_config, config_differences, config_hash


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the units ``index, index + count, ...`` of the grid's ordered list."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"a shard needs 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` → Shard(i, n).

        :raises ValueError: for text that is not two integers ``i/n`` with 0 <= i < n.
        """
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"a shard is written i/n (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, units: Sequence[Unit]) -> list[Unit]:
        return list(units[self.index::self.count])


def run_grid(
    units: Iterable[Unit],
    run_unit: Callable[[Unit], dict[str, Any]],
    store: ResultStore,
    *,
    unit_config: Callable[[Unit], dict[str, Any]],
    echo: Callable[[str], None] = print,
    shard: Shard | None = None,
    reclaim: bool = False,
) -> list[dict[str, Any]]:
    """Run every unit (of ``shard``, if given) without a reusable record, in order, saving each record as soon as
    it finishes; return the records of every finished unit of the grid, in grid order.

    ``unit_config(unit)`` is the unit's full configuration: every setting that can change its numbers
    (plain JSON values). A stored record is reused only when it was made with the same configuration
    (equal hashes); otherwise it is set aside under ``runs/old/`` with its files, the message names what
    changed, and the unit is trained again. A unit claimed by another process (:meth:`ResultStore.claim`) is
    skipped. ``reclaim`` first removes the claims of this shard's unfinished units (after a crash; only when no
    other process works on them). Under a distributed mode (:func:`pyro_ibdr.distributed.mode`) the processes of
    the group run every unit together: rank 0 checks and claims, tells the others, and alone saves the records.
    """
    units = list(units)
    mine = shard.select(units) if shard is not None else units
    main = distributed.is_main_process()
    if reclaim and main:
        for unit in mine:
            if not store.done(unit):
                store.release(unit)
    for unit in mine:
        config = canonical_config(unit_config(unit))
        action = _reuse_or_claim(store, unit, config, echo) if main else None
        action = distributed.broadcast_object(action) if distributed.mode() is not None else action
        if action == "reuse":
            continue
        if action == "skip":
            echo(f"[{unit.key}] claimed by another process ({store.claim_path(unit)}): skipping it; after a crash "
                 "rerun with --reclaim")
            continue
        echo(f"[{unit.key}] running")
        try:
            if main:
                store.clear_resume(unit, keep=store.resume_path(unit, config))
            record = run_unit(unit)
            if main:
                store.save(unit, record, config)
                store.clear_resume(unit)
        finally:
            if main:
                store.release(unit)
    distributed.barrier()
    finished = [unit for unit in units if store.done(unit)]
    if len(finished) < len(units):
        echo(f"{len(units) - len(finished)} of {len(units)} units are not finished (other shards or processes): "
             "the summary covers the finished ones; rerun any shard once all are done for the full summary")
    return [store.load(unit) for unit in finished]


def _reuse_or_claim(store: ResultStore, unit: Unit, config: dict[str, Any], echo: Callable[[str], None]) -> str:
    """``"reuse"`` a stored record made with ``config``; else ``"run"`` when this process claims the unit (a stored
    record of another configuration is then set aside); else ``"skip"``."""
    stored = store.load(unit) if store.done(unit) else None
    if stored is not None and stored.get("config_hash") == config_hash(config):
        echo(f"[{unit.key}] finished earlier with the same configuration: reusing its result")
        return "reuse"
    if not store.claim(unit):
        return "skip"
    if stored is not None:
        changes = config_differences(stored.get("config", {}), config)
        aside = store.set_aside(unit, stored)
        echo(f"[{unit.key}] the stored result has another configuration ({'; '.join(changes[:6])}"
             f"{'; ...' if len(changes) > 6 else ''}): moved to {aside}; training again")
    return "run"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per (task, method): mean and std over seeds of each metric; then a ``mean`` task averaging the tasks."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault((record["task"], record["method"]), []).append(record)
    rows = []
    for (task, method), group in grouped.items():
        row: dict[str, Any] = {"task": task, "method": method, "seeds": len(group)}
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = _mean_std([r["metrics"][metric] for r in group])
        rows.append(row)
    for method in dict.fromkeys(r["method"] for r in rows):
        per_task = [r for r in rows if r["method"] == method]
        mean_row: dict[str, Any] = {"task": "mean", "method": method, "seeds": min(r["seeds"] for r in per_task)}
        for metric in metrics:
            mean_row[metric] = statistics.fmean(r[metric] for r in per_task)
            mean_row[f"{metric}_std"] = None  # one value per task: no spread over seeds to report
        rows.append(mean_row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], metric: str, *, scale: float = 1.0, digits: int = 1) -> str:
    """Tasks as rows, methods as columns, one metric (e.g. accuracy × 100)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    value = {(r["task"], r["method"]): r[metric] for r in rows}
    width = max(10, *(len(m) + 2 for m in methods))
    lines = [f"{metric:<22}" + "".join(f"{m:>{width}}" for m in methods)]
    for task in tasks:
        cells = [value.get((task, m)) for m in methods]
        lines.append(f"{task:<22}" + "".join(
            f"{c * scale:>{width}.{digits}f}" if c is not None else f"{'-':>{width}}" for c in cells
        ))
    return "\n".join(lines)


def report(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> str:
    """Accuracy (%) and ECE tables, then each method's cost: the text the experiments print."""
    lines = [format_table(rows, "accuracy", scale=100), "", format_table(rows, "ece", digits=3), "",
             f"{'method':<12}{'task':<22}{'seed':>5}{'s/step':>8}{'passes/step':>13}{'S':>4}{'train s':>9}"
             f"{'eval s':>8}{'peak MB':>9}"]
    for r in records:
        c = r["cost"]
        lines.append(f"{r['method']:<12}{r['task']:<22}{r['seed']:5d}{c['time_per_step_s']:8.2f}{c['passes_per_step']:13d}"
                     f"{c['test_samples']:4d}{c['wall_time_s']:9.0f}{c['eval_time_s']:8.0f}{c['peak_memory_mb']:9.0f}")
    return "\n".join(lines)


def comma_separated(_ctx: click.Context | None, _param: click.Parameter | None, value: str) -> list[str]:
    """click callback: ``"a, b"`` → ``["a", "b"]``; an empty list is a usage error."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter(f"needs at least one comma-separated name, got {value!r}")
    return names


def evaluation_draws(method: str, num_samples: int | None, num_particles: int) -> int:
    """S for a unit's test evaluation: the command's ``--num-samples``, else the method's own default
    (``config_class.test_samples``: BLoB's 10, laplace's 100), else K, the ensemble size of every method."""
    return num_samples or METHODS[method].config_class.test_samples or num_particles


def check_methods(methods: Sequence[str]) -> None:
    """A usage error naming unknown methods and listing the registered ones."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise click.BadParameter(f"unknown methods {unknown}; known: {sorted(METHODS)}", param_hint="--methods")


def parallel_options(command: Callable) -> Callable:
    """The grid commands' click options for several processes: ``--distributed``, ``--shard``, ``--reclaim``."""
    options = [
        click.option("--distributed", "distributed_mode", type=click.Choice(distributed.MODES), default=None,
                     help="Train every unit with all processes of a torchrun launch: 'data' (each takes a shard of "
                          "every batch) or 'particle' (each holds K/W particles). Only rank 0 writes."),
        click.option("--shard", default=None, callback=_shard_option,
                     help="Run only shard i/n of the (task, method, seed) units (round robin); several shards may "
                          "share one --output. Under torchrun without --distributed each rank is a shard."),
        click.option("--reclaim", is_flag=True,
                     help="Remove the claims of this shard's unfinished units left by a crashed run (only when no "
                          "other process works on them)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _shard_option(_ctx: click.Context | None, _param: click.Parameter | None, value: str | None) -> Shard | None:
    try:
        return Shard.parse(value) if value is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--shard") from error


@contextmanager
def grid_processes(mode: distributed.Mode | None, shard: Shard | None, device: str) -> Iterator[Shard | None]:
    """The processes of a grid command: yields the shard this process runs (None: every unit).

    Without ``mode``, a ``torchrun`` launch of W processes makes rank r shard r/W (no process group: the units
    are independent). With ``mode``, the process group of the launch is joined for the block, which runs under
    :func:`pyro_ibdr.distributed.parallel`; every process but rank 0 is silenced (stdout and stderr).

    :raises click.UsageError: for ``--shard`` in a torchrun launch without ``--distributed``.
    """
    rank, world = distributed.launch_environment()
    if mode is None:
        if world > 1:
            if shard is not None:
                raise click.UsageError("--shard and a torchrun launch without --distributed both split the grid; "
                                       "use one of them")
            shard = Shard(rank, world)
        yield shard
        return
    distributed.init_process_group(device)
    try:
        with distributed.parallel(mode), ExitStack() as stack:
            if not distributed.is_main_process():
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(redirect_stdout(sink))
                stack.enter_context(redirect_stderr(sink))
            yield shard
    finally:
        distributed.destroy_process_group()


def summary_writer(mode: distributed.Mode | None) -> bool:
    """Whether this process writes a grid command's summary and report: rank 0 of a ``--distributed`` launch;
    every process otherwise (each shard summarises the units finished so far)."""
    return mode is None or distributed.launch_environment()[0] == 0


def cli_options() -> dict[str, Any]:
    """The options of the running click command, JSON-ready (what a results file records as its call)."""
    return {k: (str(v) if isinstance(v, Path | Shard) else v) for k, v in click.get_current_context().params.items()}


#: Options that set the grid's extent or how it runs, never what one unit computes.
NOT_UNIT_CONFIGURATION = ("tasks", "methods", "seeds", "output", "threads", "checkpoint_every", "shard", "reclaim")


def unit_options() -> dict[str, Any]:
    """The running command's options that can change a unit's numbers (:func:`cli_options` without
    :data:`NOT_UNIT_CONFIGURATION`), for the unit configuration that decides whether a stored result is reused."""
    return {k: v for k, v in cli_options().items() if k not in NOT_UNIT_CONFIGURATION}


def snapshots(path: Path, every: int) -> dict[str, Any]:
    """fit() options that snapshot the run to ``path`` every ``every`` epochs: none for 0, and none under a
    distributed mode (``fit`` writes snapshots from one process only; such a unit reruns whole after a kill)."""
    return {"checkpoint": path, "checkpoint_every": every} if every and distributed.mode() is None else {}


def write_summary(folder: str | Path, records: Sequence[dict[str, Any]], config: dict[str, Any],
                  metrics: Sequence[str]) -> list[dict[str, Any]]:
    """``results.json`` (configuration, every record, summary) and ``results.csv`` (summary rows)."""
    folder = Path(folder)
    rows = summary_rows(records, metrics)
    write_json(folder / "results.json", {"config": config, "runs": list(records), "summary": rows})
    write_csv(folder / "results.csv", rows)
    return rows


def precision_option(command: Callable) -> Callable:
    """The ``--precision`` option shared by the experiment commands."""
    return click.option("--precision", type=click.Choice(list(AUTOCAST_DTYPES)), default="fp32",
                        help="Autocast of the network in training and test: fp32 (none), bf16 or fp16; θ, softmax and "
                             "metrics stay float32.")(command)


#: Equal-width confidence bins of every ECE and reliability diagram the experiments report.
N_BINS = 15


def score(model: BayesianLoRA, posterior: Posterior, loader: Iterable, *, num_samples: int | None, seed: int,
          ensemble: EnsembleMode | None = None, device: str | torch.device | None = None,
          precision: Precision = "fp32") -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The posterior predictive of ``model`` on ``loader`` with S = ``posterior.num_draws(num_samples)`` draws fixed
    by ``seed``, combined by ``ensemble`` (default: the posterior's own ``prediction`` mode), under ``precision``.

    Returns (metrics, ensemble probabilities (N, C), targets (N,)). The metrics are those of
    :func:`pyro_ibdr.metrics.evaluate_predictions` (ECE as a fraction over :data:`N_BINS` bins) plus
    ``ensemble``, ``num_samples``, ``n_bins`` and ``calibration``: the ensemble's per-bin ``count``,
    ``accuracy`` and ``confidence`` (N_BINS + 1 entries, the last for confidence exactly 1, as in
    :class:`pyro_ibdr.metrics.CalibrationBins`), from which reports redraw reliability diagrams.
    """
    samples, ensemble = posterior.num_draws(num_samples), ensemble or posterior.prediction
    draws = fixed_draws(posterior, samples, seed=seed)
    probs, targets = predict_loader(model, draws, loader, samples, device=device, seed=seed, precision=precision)
    mean = ensemble_probs(probs, ensemble)
    bins = calibration_bins(mean, targets, N_BINS)
    metrics = {
        **evaluate_predictions(probs, targets, n_bins=N_BINS, mode=ensemble),
        "ensemble": ensemble,
        "num_samples": samples,
        "n_bins": N_BINS,
        "calibration": {"count": bins.count.tolist(), "accuracy": bins.accuracy.tolist(),
                        "confidence": bins.confidence.tolist()},
    }
    return metrics, mean, targets


#: A post-hoc step on a trained posterior: (model, posterior) -> (new posterior, JSON-ready facts about it), or
#: None when the step does not apply to that posterior (e.g. TFB on a posterior that is not point masses).
PostHoc = Callable[[BayesianLoRA, Posterior], tuple[Posterior, dict[str, Any]] | None]


def _evaluate(model: BayesianLoRA, posterior: Posterior, unit: Unit, *, test_loader: Callable[[], Iterable],
              num_samples: int, output: Path | None, device: str | torch.device, precision: Precision
              ) -> dict[str, Any]:
    """Test metrics of one posterior (:func:`score`), the evaluation time, and its reliability diagram (drawn by
    the main process). Point masses are evaluated on each particle once, others with ``num_samples`` draws."""
    start = time.perf_counter()
    requested = None if posterior.natural_num_samples else num_samples
    metrics, probs, targets = score(model, posterior, test_loader(), num_samples=requested, seed=unit.seed,
                                    device=device, precision=precision)
    eval_seconds = time.perf_counter() - start
    if output is not None and distributed.is_main_process():
        reliability_diagram(probs, targets, ResultStore(output).reliability_path(unit), n_bins=N_BINS,
                            title=f"{unit.method} on {unit.task}")
    return {"metrics": metrics, "test_samples": metrics["num_samples"], "eval_time_s": eval_seconds}


def train_and_evaluate(
    unit: Unit,
    *,
    build_net: Callable[[], torch.nn.Module],
    train_loader: Iterable,
    test_loader: Callable[[], Iterable],
    num_data: int,
    fit_options: dict[str, Any],
    num_samples: int,
    output: Path | None = None,
    device: str | torch.device = "cpu",
    post_hoc: dict[str, PostHoc] | None = None,
    precision: Precision = "fp32",
    rebuild: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit ``unit.method`` on a fresh LoRA model, then evaluate it once on the test loader.

    ``test_loader`` is called only after training, so test data is never read before training ends. Point-mass
    posteriors are evaluated on each particle once; others with ``num_samples`` draws (``Posterior.num_draws``);
    the ensemble combines them in the posterior's own prediction mode.
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) is the autocast setting of training and prediction.
    Returns a JSON-ready record: test metrics (:func:`score`), the cost of training, the per-epoch history and
    method state. With ``output``, the reliability diagram and the posterior are written there
    (:class:`~pyro_ibdr.experiments.store.ResultStore` layout); the posterior's checkpoint records the method,
    its config, the optimiser, the prediction (ensemble mode, S, bins, precision), N and ``rebuild``: what
    ``pyro-ibdr predict`` needs to build the network and read data again (plain values, written by the
    experiment command).
    Each ``post_hoc`` step (e.g. ``{"tfb": ...}``) runs on the trained posterior, before any test data is
    read, and its result is evaluated the same way under ``record["post_hoc"][name]`` (``{"skipped": ...}``
    when it does not apply); :func:`with_post_hoc` turns these into rows of their own.
    Under a distributed mode (the grid commands' ``--distributed``) training uses the process group, prediction
    splits the draws over it, and only rank 0 writes files.
    """
    pyro.set_rng_seed(unit.seed)  # the LoRA initialisation must not depend on the units that ran before
    model = BayesianLoRA(build_net().to(device), num_data=num_data)
    result = fit(unit.method, model, train_loader, seed=unit.seed, device=device, precision=precision,
                 distributed=distributed.mode(), **fit_options)
    derived: dict[str, tuple[Posterior, dict[str, Any], float] | None] = {}
    for name, step in (post_hoc or {}).items():
        start = time.perf_counter()
        outcome = step(model, result.posterior)
        derived[name] = None if outcome is None else (*outcome, time.perf_counter() - start)
    evaluation = partial(_evaluate, model, test_loader=test_loader, num_samples=num_samples,
                         output=output, device=device, precision=precision)
    evaluated = evaluation(result.posterior, unit)
    files = {}
    if output is not None and distributed.is_main_process():
        store = ResultStore(output)
        optim = fit_options.get("optim")
        metrics = evaluated["metrics"]
        config = {"rebuild": rebuild or {}, "task": unit.task, "num_data": num_data, "method_config": result.config,
                  "optim": asdict(optim) if optim is not None else None, "preset": result.preset,
                  "steps": result.steps,
                  "prediction": {"ensemble": metrics["ensemble"], "num_samples": metrics["num_samples"],
                                 "n_bins": N_BINS, "precision": precision}}
        path = save_checkpoint(store.posterior_path(unit), result.posterior, spec=model.spec, method=result.method,
                               config=config, seed=unit.seed, state=result.state)
        files["posterior"] = path.relative_to(store.folder).as_posix()
    record = {
        **files,
        "metrics": evaluated["metrics"],
        "cost": {
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "time_per_step_s": result.time_per_step_s,
            "passes_per_step": result.passes_per_step,
            "num_particles_or_samples": result.num_particles_or_samples,
            "test_samples": evaluated["test_samples"],
            "peak_memory_mb": result.peak_memory_mb,
            "eval_time_s": evaluated["eval_time_s"],
            "trainable_parameters": model.dim,
            "resumed_at_step": result.resumed_at_step,
        },
        "history": result.history,
        "state": _json_ready(result.state),
    }
    if post_hoc:
        record["post_hoc"] = {}
        for name, outcome in derived.items():
            if outcome is None:
                record["post_hoc"][name] = {"skipped": f"{name} does not apply to this {unit.method} posterior"}
                continue
            posterior, facts, seconds = outcome
            done = evaluation(posterior, Unit(unit.task, f"{unit.method}+{name}", unit.seed))
            record["post_hoc"][name] = {"metrics": done["metrics"], "test_samples": done["test_samples"],
                                        "eval_time_s": done["eval_time_s"], "post_hoc_time_s": seconds,
                                        "state": _json_ready(facts)}
    return record


def run_command_grid(units: Sequence[Unit], run_unit: Callable[[Unit], dict[str, Any]], store: ResultStore, *,
                     unit_config: Callable[[Unit], dict[str, Any]], post_hoc: Sequence[str],
                     distributed_mode: distributed.Mode | None, shard: Shard | None, reclaim: bool,
                     device: str) -> list[dict[str, Any]] | None:
    """An experiment command's grid: the post-hoc steps checked against stored records, then :func:`run_grid`
    on this process's shard inside the process group of ``distributed_mode`` (:func:`grid_processes`).

    Returns the records with one row per post-hoc step (:func:`with_post_hoc`), or None on a process that does
    not write the summary (:func:`summary_writer`).
    """
    check_post_hoc(store, units, post_hoc)
    with grid_processes(distributed_mode, shard, device) as shard:
        records = run_grid(units, run_unit, store, unit_config=unit_config, shard=shard, reclaim=reclaim,
                           echo=lambda m: click.echo(m, err=True))
    return with_post_hoc(records, post_hoc) if summary_writer(distributed_mode) else None


def check_post_hoc(store: ResultStore, units: Iterable[Unit], names: Sequence[str]) -> None:
    """A usage error, before any training, when a finished unit's record lacks a requested post-hoc step (it
    was written by a run without it); reusing it would silently drop that step's rows."""
    for unit in units:
        if names and store.done(unit):
            missing = [n for n in names if n not in store.load(unit).get("post_hoc", {})]
            if missing:
                raise click.UsageError(f"{store.path(unit)} was written without --post-hoc {','.join(missing)}; "
                                       "delete it or choose another --output")


def with_post_hoc(records: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """The records, each followed by one row per applied post-hoc step in ``names``, as method
    ``"<method>+<step>"``: that step's test metrics and evaluation cost, the parent's training cost."""
    rows = []
    for record in records:
        rows.append(record)
        for name in names:
            derived = record.get("post_hoc", {}).get(name)
            if derived is None or "skipped" in derived:
                continue
            cost = {**record["cost"], "test_samples": derived["test_samples"], "eval_time_s": derived["eval_time_s"],
                    "post_hoc_time_s": derived["post_hoc_time_s"]}
            rows.append({"task": record["task"], "method": f"{record['method']}+{name}", "seed": record["seed"],
                         "metrics": derived["metrics"], "cost": cost, "state": derived["state"]})
    return rows


def evaluate_untrained(
    unit: Unit,
    *,
    build_net: Callable[[], torch.nn.Module],
    test_loader: Callable[[], Iterable],
    num_data: int,
    output: Path | None = None,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
) -> dict[str, Any]:
    """The zero-shot baseline: the network at its LoRA initialisation θ₀ (B = 0, so the pretrained network
    itself), scored through the same classifier, predictive and metrics as the trained methods.

    Returns a record shaped as :func:`train_and_evaluate`'s, with zero training cost.
    """
    pyro.set_rng_seed(unit.seed)
    model = BayesianLoRA(build_net().to(device), num_data=num_data)
    posterior = ParticlePosterior(model.theta0[None])
    evaluated = _evaluate(model, posterior, unit, test_loader=test_loader, num_samples=1, output=output,
                          device=device, precision=precision)
    cost = {"steps": 0, "wall_time_s": 0.0, "time_per_step_s": 0.0, "passes_per_step": 0,
            "num_particles_or_samples": 1, "test_samples": 1, "peak_memory_mb": peak_memory_mb(torch.device(device)),
            "eval_time_s": evaluated["eval_time_s"], "trainable_parameters": model.dim}
    return {"metrics": evaluated["metrics"], "cost": cost, "history": [], "state": {}}


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
