"""``report.md``: an experiment folder's results as tables and figures, regenerated from ``results.json`` alone.

The report holds, per task and method: accuracy, ECE, NLL and Brier as mean ± standard deviation over
seeds; an accuracy-vs-ECE scatter; the reliability diagrams side by side (each pooled over seeds from the
per-bin statistics stored in every record); training curves from each run's per-epoch history (loss terms,
λ, diversity, σ, ...); and the cost of each run. Every metric states its unit and convention. Figures go to
``<folder>/report/`` (replaced as a whole, atomically), the Markdown to ``<folder>/report.md``.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..io import atomic_folder, atomic_write
from .plots import draw_reliability, new_figure, save_figure

#: Metrics of the tables: (key, heading with unit and convention, scale, digits, whether higher is better).
TABLES = (
    ("accuracy", "Accuracy (%, top-1 of the ensemble predictive; higher is better)", 100.0, 1, True),
    ("ece", "ECE (a fraction in [0, 1], not ×100; top-label L1 over {bins} equal-width confidence bins; lower is "
            "better)", 1.0, 3, False),
    ("nll", "NLL (nats per test example; lower is better)", 1.0, 3, False),
    ("brier", "Brier score (squared error summed over classes, range [0, 2]; lower is better)", 1.0, 3, False),
)
#: History entries drawn as training curves, in this order, with their meaning.
CURVES = {
    "loss": "the method's objective (ELBO units: minibatch terms scaled to the training set, except SGLD's "
            "per-example potential)",
    "data": "data term of IBDR-family losses",
    "diversity": "α × diversity term",
    "kl": "KL term",
    "lambda": "IBDR's dual variable λ",
    "cost": "IBDR's transport cost c",
    "sigma": "posterior scale σ (particle σ or mean Gaussian σ)",
    "kl_weight": "KL annealing weight",
    "sq_grad": "SVGD's mean squared update",
    "lr": "scheduled learning rate",
}
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")


def _load_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {folder}: run an experiment into this folder first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or not results["runs"]:
        raise ValueError(f"{path} holds no runs (expected a 'runs' list of records)")
    return results


def _ordered(runs: Sequence[dict[str, Any]], field: str) -> list[str]:
    return list(dict.fromkeys(str(r[field]) for r in runs))


def _group(runs: Sequence[dict[str, Any]], task: str, method: str) -> list[dict[str, Any]]:
    return [r for r in runs if str(r["task"]) == task and str(r["method"]) == method]


def _stats(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _colour(methods: Sequence[str]) -> dict[str, str]:
    return {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}


# ------------------------------------------------------------------------------------------------- tables
def _metric_table(runs: Sequence[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str], metric: str,
                  scale: float, digits: int, higher: bool) -> list[str]:
    """Markdown rows: tasks × methods, mean ± std over seeds, the best mean per row in bold, then a mean row."""
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    per_method: dict[str, list[float]] = {m: [] for m in methods}
    for task in tasks:
        cells: dict[str, tuple[float, float | None, int]] = {}
        for method in methods:
            values = [r["metrics"][metric] * scale for r in _group(runs, task, method) if metric in r["metrics"]]
            if values:
                mean, std = _stats(values)
                cells[method] = (mean, std, len(values))
                per_method[method].append(mean)
        best = (max if higher else min)(c[0] for c in cells.values()) if cells else None
        row = []
        for method in methods:
            if method not in cells:
                row.append("–")
                continue
            mean, std, _ = cells[method]
            text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
            row.append(f"**{text}**" if round(mean, digits) == round(best, digits) else text)
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    if len(tasks) > 1:
        means = [f"{statistics.fmean(v):.{digits}f}" if len(v) == len(tasks) else "–" for v in per_method.values()]
        lines.append("| mean over tasks | " + " | ".join(means) + " |")
    return lines


def _cost_table(runs: Sequence[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str]) -> list[str]:
    columns = (("time_per_step_s", "s/step", 3), ("passes_per_step", "passes/step", 0),
               ("num_particles_or_samples", "K or S (train)", 0), ("test_samples", "S (test)", 0),
               ("steps", "steps", 0), ("wall_time_s", "train s", 1), ("eval_time_s", "eval s", 1),
               ("peak_memory_mb", "peak memory (MB)", 0), ("trainable_parameters", "D (trainable)", 0))
    lines = ["| task | method | seeds | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for task in tasks:
        for method in methods:
            group = [r for r in _group(runs, task, method) if "cost" in r]
            if not group:
                continue
            cells = []
            for key, _, digits in columns:
                values = [r["cost"][key] for r in group if r["cost"].get(key) is not None]
                cells.append(f"{statistics.fmean(values):.{digits}f}" if values else "–")
            lines.append(f"| {task} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def _setup_table(config: dict[str, Any]) -> list[str]:
    """The run-wide settings that fit on a line (long tables such as per-task settings are left to results.json)."""
    lines = ["| setting | value |", "|---|---|"]
    for key, value in config.items():
        if isinstance(value, dict) or key == "options":
            continue
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        if len(text) <= 120:
            lines.append(f"| {key} | {text} |")
    versions = config.get("versions")
    if isinstance(versions, dict):
        lines.append("| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ figures
def _panels(panel: tuple[float, float], count: int, columns: int = 3) -> tuple[Figure, np.ndarray]:
    """A figure with ``count`` panels of size ``panel`` (inches) in rows of ``columns``."""
    cols = min(columns, count)
    rows = -(-count // cols)
    fig = new_figure(panel[0] * cols, panel[1] * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _scatter(runs: Sequence[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str], path: Path) -> None:
    colour = _colour(methods)
    fig, axes = _panels((4.6, 3.8), len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        for method in methods:
            group = _group(runs, task, method)
            if not group:
                continue
            ece = [r["metrics"]["ece"] for r in group]
            acc = [100 * r["metrics"]["accuracy"] for r in group]
            ax.scatter(ece, acc, s=14, alpha=0.45, color=colour[method])
            (x, dx), (y, dy) = _stats(ece), _stats(acc)
            ax.errorbar([x], [y], xerr=[dx or 0.0], yerr=[dy or 0.0], fmt="o", ms=8, capsize=3, color=colour[method],
                        markeredgecolor="black", label=f"{method} (n = {len(group)})")
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 100.5))  # accuracy is a percentage: no axis beyond 0 or 100
        ax.set_title(task)
        ax.set_xlabel("ECE (fraction, 15 bins) — lower is better")
        ax.set_ylabel("accuracy (%) — higher is better")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Accuracy vs ECE (dots: seeds; large: mean ± std)")
    save_figure(fig, path)


def _pooled_bins(group: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-bin count, accuracy and confidence of all seeds' test examples together (count-weighted)."""
    stored = [r["metrics"]["calibration"] for r in group if "calibration" in r["metrics"]]
    if not stored or len({len(s["count"]) for s in stored}) != 1:
        return None
    count = np.sum([s["count"] for s in stored], axis=0)
    safe = np.maximum(count, 1.0)
    accuracy = np.sum([np.multiply(s["count"], s["accuracy"]) for s in stored], axis=0) / safe
    confidence = np.sum([np.multiply(s["count"], s["confidence"]) for s in stored], axis=0) / safe
    return count, accuracy, confidence


def _reliability(runs: Sequence[dict[str, Any]], task: str, methods: Sequence[str], path: Path) -> bool:
    pooled = {m: _pooled_bins(_group(runs, task, m)) for m in methods}
    pooled = {m: bins for m, bins in pooled.items() if bins is not None}
    if not pooled:
        return False
    fig = new_figure(3.3 * len(pooled) + 0.4, 4.8)
    axes = fig.subplots(2, len(pooled), squeeze=False, sharex=True, sharey="row", height_ratios=[3, 1])
    for column, (method, (count, accuracy, confidence)) in enumerate(pooled.items()):
        ece = [r["metrics"]["ece"] for r in _group(runs, task, method)]
        mean, std = _stats(ece)
        draw_reliability(axes[0, column], axes[1, column], count, accuracy, confidence)
        seeds = f"{len(ece)} seed{'s' if len(ece) > 1 else ''}"
        axes[0, column].set_title(f"{method}: ECE {mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
                                  + f"\n({seeds}, {len(count) - 1} bins)", fontsize="medium")
        if column:
            axes[0, column].set_ylabel("")
            axes[1, column].set_ylabel("")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(f"Reliability on {task} (ensemble predictive, seeds pooled)")
    save_figure(fig, path)
    return True


def _curve(ax: Axes, epochs: list[int], values: list[float], colour: str, **style: Any) -> None:
    ax.plot(epochs, values, color=colour, marker="o" if len(epochs) < 30 else None, ms=3, **style)


def _training_curves(runs: Sequence[dict[str, Any]], task: str, methods: Sequence[str],
                     path: Path) -> tuple[list[str], dict[str, float]]:
    """Panels of every history entry in :data:`CURVES` that some run logged and that changes; returns the entries
    drawn and the constant ones with their value."""
    groups = {m: [r for r in _group(runs, task, m) if r.get("history")] for m in methods}
    logged = {k: {e[k] for g in groups.values() for r in g for e in r["history"] if k in e} for k in CURVES}
    constant = {k: next(iter(v)) for k, v in logged.items() if len(v) == 1}
    keys = [k for k, v in logged.items() if len(v) > 1]
    if not keys:
        return [], constant
    colour = _colour(methods)
    fig, axes = _panels((4.2, 3.1), len(keys))
    for ax, key in zip(axes, keys, strict=True):
        positive = True
        for method, group in groups.items():
            series = [[(e["epoch"] + 1, e[key]) for e in r["history"] if key in e] for r in group]
            series = [s for s in series if s]
            if not series:
                continue
            for s in series if len(series) > 1 else ():
                _curve(ax, [p[0] for p in s], [p[1] for p in s], colour[method], alpha=0.3, linewidth=0.8)
            length = min(len(s) for s in series)
            mean = [statistics.fmean(s[i][1] for s in series) for i in range(length)]
            _curve(ax, [p[0] for p in series[0][:length]], mean, colour[method], label=method, linewidth=1.8)
            positive = positive and all(p[1] > 0 for s in series for p in s)
        values = [line.get_ydata() for line in ax.get_lines()]
        span = [float(v) for y in values for v in y]
        if positive and span and max(span) / min(span) > 50:
            ax.set_yscale("log")
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"Training on {task}: epoch means (thick: mean over seeds, thin: each seed)")
    save_figure(fig, path)
    return keys, constant


# ------------------------------------------------------------------------------------------------ report
def _section(title: str, body: Sequence[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def write_report(folder: str | Path) -> Path:
    """Write ``<folder>/report.md`` and its figures from ``<folder>/results.json``; nothing is retrained.

    :returns: the path of ``report.md``.
    :raises FileNotFoundError: when the folder has no ``results.json``.
    :raises ValueError: when ``results.json`` is not valid JSON or holds no runs.
    """
    folder = Path(folder)
    results = _load_results(folder)
    runs, config = results["runs"], results.get("config", {})
    tasks, methods = _ordered(runs, "task"), _ordered(runs, "method")
    metrics0 = runs[0].get("metrics", {})
    bins = metrics0.get("n_bins", 15)
    modes = sorted({f"{r['metrics'].get('ensemble', 'mean_probs')}" for r in runs})
    samples = sorted({r["metrics"].get("num_samples") for r in runs if r["metrics"].get("num_samples") is not None})

    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Results: {folder.name}", "",
             f"{len(runs)} runs: {len(tasks)} task(s) × {len(methods)} method(s) × {len(seeds)} seed(s). Every "
             "number comes from `results.json`; `pyro-ibdr report <this folder>` regenerates this page.", ""]
    lines += _section("Conventions", [
        f"- Every metric is computed on the **ensemble predictive** of S posterior samples, combined by "
        f"{' / '.join(modes)} (mean_probs: the average of the samples' probabilities, the Bayesian model average; "
        f"mean_logits: the softmax of their average log-probabilities, the IBDR authors' choice); "
        f"S = {', '.join(map(str, samples)) or '?'} (K point-mass particles are each evaluated once).",
        f"- ECE is a **fraction** in [0, 1] (0.05 means 5 points of miscalibration), never ×100: the top-label L1 "
        f"calibration error Σ_k (n_k/N)·|acc_k − conf_k| over {bins} equal-width confidence bins, a confidence "
        "of exactly 1 forming a group of its own (torchmetrics' `MulticlassCalibrationError`).",
        "- Accuracy in %, NLL in nats per example, Brier summed over classes (range [0, 2]).",
        "- Tables: mean ± sample standard deviation over seeds (no ± with one seed); the best mean per row in bold.",
    ])
    lines += _section("Setup", _setup_table(config))
    for metric, heading, scale, digits, higher in TABLES:
        if any(metric in r["metrics"] for r in runs):
            lines += _section(heading.format(bins=bins),
                              _metric_table(runs, tasks, methods, metric, scale, digits, higher))

    with atomic_folder(folder / "report") as figures:
        _scatter(runs, tasks, methods, figures / "accuracy_vs_ece.png")
        lines += _section("Accuracy vs ECE", ["![accuracy vs ECE](report/accuracy_vs_ece.png)"])
        reliability, curves = [], []
        for task in tasks:
            name = f"reliability_{_slug(task)}.png"
            if _reliability(runs, task, methods, figures / name):
                reliability.append(f"![reliability on {task}](report/{name})")
            name = f"training_{_slug(task)}.png"
            drawn, constant = _training_curves(runs, task, methods, figures / name)
            if drawn:
                curves.append(f"![training on {task}](report/{name})")
            if constant:
                curves.append(f"Constant during training on {task}: "
                              + ", ".join(f"`{k}` = {v:.4g}" for k, v in constant.items()) + ".")
        lines += _section("Reliability diagrams", [
            "Bars: accuracy of the test examples in each confidence bin, all seeds pooled; hatched: the gap to the "
            "bin's mean confidence; dashed: perfect calibration; bottom: examples per bin.", "",
            *(reliability or ["(no per-bin statistics stored in these records)"])])
        lines += _section("Training curves", [
            "Per-epoch means of what each method logged: "
            + "; ".join(f"`{k}`: {v}" for k, v in CURVES.items()) + ". Loss levels of different methods are in "
            "different units: compare shapes.", "", *(curves or ["(no per-epoch history stored in these records)"])])
    lines += _section("Cost", [
        "Means over seeds. s/step: wall seconds per optimisation step; passes/step: forward+backward passes over a "
        "minibatch per step (the compute unit); peak memory: CUDA peak allocated on a GPU, else the process's peak "
        "resident set size (a process-wide high-water mark).", "", *_cost_table(runs, tasks, methods)])
    path = folder / "report.md"
    with atomic_write(path) as handle:
        handle.write("\n".join(lines).rstrip() + "\n")
    return path
