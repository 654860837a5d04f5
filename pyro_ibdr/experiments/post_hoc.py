"""Post-hoc steps the experiment commands can apply to every trained posterior: ``--post-hoc tfb``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click
import torch

from ..model import BayesianLoRA
from ..params import is_lora_a
from ..posterior import ParticlePosterior, Posterior
from ..tfb import bayesianize
from .grid import PostHoc

#: The post-hoc steps the commands know.
POST_HOC = ("tfb",)


def post_hoc_options(anchor_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options of the post-hoc steps (``anchor_size``: the command's default TFB anchor size)."""
    options = [
        click.option("--post-hoc", "post_hoc", type=click.Choice(POST_HOC), multiple=True,
                     help="Also evaluate each point-estimate posterior after this post-hoc step, as rows "
                          "'<method>+<step>' (tfb: training-free Bayesianization; repeat for several)."),
        click.option("--tfb-tolerance", type=click.FloatRange(min=0), default=0.01,
                     help="TFB: the largest admissible performance drop on the anchor set (accuracy points as "
                          "a fraction, or the NLL's relative increase)."),
        click.option("--tfb-metric", type=click.Choice(["accuracy", "nll"]), default="accuracy",
                     help="TFB: the performance whose drop is bounded."),
        click.option("--tfb-anchor-size", type=click.IntRange(min=1), default=anchor_size,
                     help="TFB: training examples (a seeded random subset of the training split) in the anchor set."),
        click.option("--tfb-samples", type=click.IntRange(min=1), default=4,
                     help="TFB: posterior draws per evaluation during the search."),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def anchor_indices(num_train: int, size: int, seed: int) -> list[int]:
    """A seeded random subset of ``size`` training indices (all of them when the split is smaller)."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[: min(size, num_train)].tolist()


def tfb_step(anchor: Iterable, *, tolerance: float, metric: str, num_samples: int, seed: int,
             device: str | torch.device) -> PostHoc:
    """TFB on the anchor loader for point-estimate posteriors over LoRA factors; others are left alone (None)."""

    def step(model: BayesianLoRA, posterior: Posterior) -> tuple[Posterior, dict[str, Any]] | None:
        point = isinstance(posterior, ParticlePosterior) and posterior.is_point_mass and not posterior.dropout_at_test
        if not point or not model.spec.entry_mask(is_lora_a).any():
            return None
        result = bayesianize(model, posterior, anchor, tolerance=tolerance, metric=metric, num_samples=num_samples,
                             seed=seed, device=device)
        return result.posterior, result.summary()

    return step
