"""A resumable grid of (task, method, seed) runs and its accuracy/ECE tables (paper Tables 1–3 style)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pyro
import torch

from ..evaluation import fixed_draws
from ..io import write_csv, write_json
from ..methods import METHODS
from ..metrics import ensemble_probs, evaluate_predictions
from ..model import BayesianLoRA
from ..posterior import ParticlePosterior, Posterior
from ..precision import AUTOCAST_DTYPES, Precision
from ..predictive import predict_loader
from ..train import fit, peak_memory_mb
from .plots import reliability_diagram


@dataclass(frozen=True)
class Unit:
    """One training run: a method on a task with a seed."""

    task: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}__{self.method}__seed{self.seed}"


class ResultStore:
    """One JSON record per finished unit under ``<folder>/runs/``, each written atomically.

    A unit whose record exists is finished; an interrupted grid resumes at the first unit without one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.runs = self.folder / "runs"

    def path(self, unit: Unit) -> Path:
        return self.runs / f"{unit.key}.json"

    def done(self, unit: Unit) -> bool:
        return self.path(unit).is_file()

    def load(self, unit: Unit) -> dict[str, Any]:
        path = self.path(unit)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"result file {path} is corrupted ({error}); delete it to rerun that unit") from error

    def save(self, unit: Unit, record: dict[str, Any]) -> Path:
        return write_json(self.path(unit), {"task": unit.task, "method": unit.method, "seed": unit.seed, **record})


def run_grid(
    units: Iterable[Unit],
    run_unit: Callable[[Unit], dict[str, Any]],
    store: ResultStore,
    *,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every unfinished unit in order, saving each record as soon as it finishes; return all records."""
    records = []
    for unit in units:
        if store.done(unit):
            echo(f"[{unit.key}] finished earlier: reusing its result")
        else:
            echo(f"[{unit.key}] running")
            store.save(unit, run_unit(unit))
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
) -> dict[str, Any]:
    """Fit ``unit.method`` on a fresh LoRA model, then evaluate it once on the test loader.

    ``test_loader`` is called only after training, so test data is never read before training ends. Point-mass
    posteriors are evaluated on each particle once; others with ``num_samples`` draws (``Posterior.num_draws``);
    the ensemble combines them in the posterior's own prediction mode.
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) is the autocast setting of training and prediction.
    Returns a JSON-ready record: test metrics, the cost of training, the per-epoch history and method state.
    """
    pyro.set_rng_seed(unit.seed)  # the LoRA initialisation must not depend on the units that ran before
    model = BayesianLoRA(build_net().to(device), num_data=num_data)
    result = fit(unit.method, model, train_loader, seed=unit.seed, device=device, precision=precision, **fit_options)
    requested = None if result.posterior.natural_num_samples else num_samples
    metrics, samples, eval_seconds = _evaluate(unit, model, result.posterior, test_loader, requested, output, device,
                                               precision)
    return {
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
        },
        "history": result.history,
        "state": _json_ready(result.state),
    }


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
    metrics, _, eval_seconds = _evaluate(unit, model, posterior, test_loader, None, output, device, precision)
    cost = {"steps": 0, "wall_time_s": 0.0, "time_per_step_s": 0.0, "passes_per_step": 0,
            "num_particles_or_samples": 1, "test_samples": 1, "peak_memory_mb": peak_memory_mb(torch.device(device)),
            "eval_time_s": eval_seconds, "trainable_parameters": model.dim}
    return {"metrics": metrics, "cost": cost, "history": [], "state": {}}


def _evaluate(unit: Unit, model: BayesianLoRA, posterior: Posterior, test_loader: Callable[[], Iterable],
              requested: int | None, output: Path | None, device: str | torch.device,
              precision: Precision) -> tuple[dict[str, Any], int, float]:
    """(test metrics, S, seconds) of fixed draws of ``posterior`` (``Posterior.num_draws(requested)`` of them),
    combined in its own prediction mode; writes the reliability diagram."""
    start = time.perf_counter()
    draws = fixed_draws(posterior, requested, seed=unit.seed)
    samples, ensemble = posterior.num_draws(requested), posterior.prediction
    probs, targets = predict_loader(model, draws, test_loader(), samples, device=device, seed=unit.seed,
                                    precision=precision)
    metrics = {**evaluate_predictions(probs, targets, mode=ensemble), "ensemble": ensemble, "num_samples": samples}
    eval_seconds = time.perf_counter() - start
    if output is not None:
        reliability_diagram(ensemble_probs(probs, ensemble), targets,
                            Path(output) / "reliability" / f"{unit.key}.png", title=f"{unit.method} on {unit.task}")
    return metrics, samples, eval_seconds


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
