"""A resumable grid of (task, method, seed) runs and its accuracy/ECE tables (paper Tables 1–3 style)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import pyro
import torch

from ..checkpoint import save_checkpoint
from ..evaluation import fixed_draws
from ..io import write_csv, write_json
from ..methods import METHODS
from ..metrics import EnsembleMode, calibration_bins, ensemble_probs, evaluate_predictions
from ..model import BayesianLoRA
from ..posterior import Posterior
from ..precision import AUTOCAST_DTYPES, Precision
from ..predictive import predict_loader
from ..train import fit
from .plots import reliability_diagram
from .store import ResultStore, Unit, canonical_config, config_differences, config_hash


def run_grid(
    units: Iterable[Unit],
    run_unit: Callable[[Unit], dict[str, Any]],
    store: ResultStore,
    *,
    unit_config: Callable[[Unit], dict[str, Any]],
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every unit without a reusable record, in order, saving each record as soon as it finishes.

    ``unit_config(unit)`` is the unit's full configuration: every setting that can change its numbers
    (plain JSON values). A stored record is reused only when it was made with the same configuration
    (equal hashes); otherwise it is set aside under ``runs/old/`` with its files, the message names what
    changed, and the unit is trained again. Returns the records of ``units``, in order.
    """
    records = []
    for unit in units:
        config = canonical_config(unit_config(unit))
        if store.done(unit):
            stored = store.load(unit)
            if stored.get("config_hash") == config_hash(config):
                echo(f"[{unit.key}] finished earlier with the same configuration: reusing its result")
                records.append(stored)
                continue
            changes = config_differences(stored.get("config", {}), config)
            aside = store.set_aside(unit, stored)
            echo(f"[{unit.key}] the stored result has another configuration ({'; '.join(changes[:6])}"
                 f"{'; ...' if len(changes) > 6 else ''}): moved to {aside}; training again")
        echo(f"[{unit.key}] running")
        store.clear_resume(unit, keep=store.resume_path(unit, config))
        store.save(unit, run_unit(unit), config)
        store.clear_resume(unit)
        records.append(store.load(unit))
    return records


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


def check_methods(methods: Sequence[str]) -> None:
    """A usage error naming unknown methods and listing the registered ones."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise click.BadParameter(f"unknown methods {unknown}; known: {sorted(METHODS)}", param_hint="--methods")


def cli_options() -> dict[str, Any]:
    """The options of the running click command, JSON-ready (what a results file records as its call)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in click.get_current_context().params.items()}


#: Options that set the grid's extent or how it runs, never what one unit computes.
NOT_UNIT_CONFIGURATION = ("tasks", "methods", "seeds", "output", "threads", "checkpoint_every")


def unit_options() -> dict[str, Any]:
    """The running command's options that can change a unit's numbers (:func:`cli_options` without
    :data:`NOT_UNIT_CONFIGURATION`), for the unit configuration that decides whether a stored result is reused."""
    return {k: v for k, v in cli_options().items() if k not in NOT_UNIT_CONFIGURATION}


def snapshots(path: Path, every: int) -> dict[str, Any]:
    """fit() options that snapshot the run to ``path`` every ``every`` epochs (none for 0)."""
    return {"checkpoint": path, "checkpoint_every": every} if every else {}


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
    """
    pyro.set_rng_seed(unit.seed)  # the LoRA initialisation must not depend on the units that ran before
    model = BayesianLoRA(build_net().to(device), num_data=num_data)
    result = fit(unit.method, model, train_loader, seed=unit.seed, device=device, precision=precision, **fit_options)
    posterior = result.posterior
    start = time.perf_counter()
    requested = None if posterior.natural_num_samples else num_samples
    metrics, probs, targets = score(model, posterior, test_loader(), num_samples=requested, seed=unit.seed,
                                    device=device, precision=precision)
    samples, ensemble = metrics["num_samples"], metrics["ensemble"]
    eval_seconds = time.perf_counter() - start
    files = {}
    if output is not None:
        store = ResultStore(output)
        reliability_diagram(probs, targets, store.reliability_path(unit), n_bins=N_BINS,
                            title=f"{unit.method} on {unit.task}")
        optim = fit_options.get("optim")
        config = {"rebuild": rebuild or {}, "task": unit.task, "num_data": num_data, "method_config": result.config,
                  "optim": asdict(optim) if optim is not None else None, "preset": result.preset,
                  "steps": result.steps,
                  "prediction": {"ensemble": ensemble, "num_samples": samples, "n_bins": N_BINS,
                                 "precision": precision}}
        path = save_checkpoint(store.posterior_path(unit), result.posterior, spec=model.spec, method=result.method,
                               config=config, seed=unit.seed, state=result.state)
        files["posterior"] = path.relative_to(store.folder).as_posix()
    return {
        **files,
        "metrics": metrics,
        "cost": {
            "steps": result.steps,
            "wall_time_s": result.wall_time_s,
            "time_per_step_s": result.time_per_step_s,
            "passes_per_step": result.passes_per_step,
            "num_particles_or_samples": result.num_particles_or_samples,
            "test_samples": samples,
            "peak_memory_mb": result.peak_memory_mb,
            "eval_time_s": eval_seconds,
            "trainable_parameters": model.dim,
            "resumed_at_step": result.resumed_at_step,
        },
        "history": result.history,
        "state": _json_ready(result.state),
    }


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
