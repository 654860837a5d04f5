"""Figures of predictive quality: the reliability diagram, and the drawing helpers the report shares.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas, no pyplot state, no display)
and written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from pyro_ibdr.io import atomic_write
from pyro_ibdr.metrics import calibration_bins


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` in the format named by the suffix of ``path``, atomically."""
    fmt = path.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot infer a figure format from {path.name!r}; use one of {sorted(supported)}")
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=150)


def draw_reliability(ax: Axes, ax_count: Axes, count: np.ndarray, accuracy: np.ndarray,
                     confidence: np.ndarray) -> None:
    """One reliability diagram from per-bin statistics: M equal-width bins plus the confidence-1 group last
    (the layout of :class:`pyro_ibdr.metrics.CalibrationBins`), accuracy above, counts below.

    Bars: accuracy per bin against the diagonal acc = conf, the gap to each bin's mean confidence shaded;
    the confidence-1 group is a marker at confidence 1. Every artist is labelled for a legend.
    """
    m = len(count) - 1
    edges = np.linspace(0.0, 1.0, m + 1)
    left, width = edges[:-1], edges[1:] - edges[:-1]
    filled = count[:m] > 0
    ax.bar(left[filled], accuracy[:m][filled], width=width[filled], align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.6, label="accuracy")
    gap = confidence[:m] - accuracy[:m]
    ax.bar(left[filled], gap[filled], bottom=accuracy[:m][filled], width=width[filled], align="edge",
           facecolor="none", hatch="///", edgecolor="tab:red", linewidth=0.8,
           label="gap to mean confidence")  # hatched, unfilled: readable over the bar when accuracy > confidence
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    if count[m] > 0:
        ax.plot([1.0], [accuracy[m]], marker="D", color="tab:orange", linestyle="none",
                label=f"confidence = 1 (n = {int(count[m])})")
        ax_count.bar([1.0], [count[m]], width=0.3 / m, color="tab:orange")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax_count.bar(left, count[:m], width=width, align="edge", color="tab:gray", edgecolor="black", linewidth=0.6)
    ax_count.set_xlabel("confidence (top-label probability)")
    ax_count.set_ylabel("count")


def new_figure(width: float, height: float) -> Figure:
    """A bare figure on an Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    path: str | os.PathLike[str],
    *,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Draw the reliability diagram of predictive probabilities ``probs`` (B, C) and write it to ``path``.

    Top: accuracy per equal-width confidence bin (bars) against the diagonal acc = conf, with the gap to
    each bin's mean confidence shaded and the ECE = Σ_k (n_k / N) |acc_k − conf_k| in the legend.
    Examples with a confidence of exactly 1.0, which torchmetrics' ECE counts as a bin of their own, are a
    marker at confidence 1. Bottom: the number of examples per bin. The bins are those of
    :func:`pyro_ibdr.metrics.calibration_bins`, so the ECE shown equals ``classification_metrics``'s.
    The format follows the suffix of ``path`` (e.g. ``.png``); missing parent folders are created.

    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    bins = calibration_bins(probs, targets, n_bins)
    fig = new_figure(5.0, 6.0)
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    draw_reliability(ax, ax_count, bins.count.cpu().numpy(), bins.accuracy.cpu().numpy(),
                     bins.confidence.cpu().numpy())
    ax.legend(loc="upper left", title=f"ECE = {bins.ece:.4f} ({bins.n_bins} bins)", fontsize="small")
    if title is not None:
        ax.set_title(title)
    save_figure(fig, path)
    return path
