"""Saved posteriors put to use without retraining: ``pyro-ibdr predict`` scores new data, ``pyro-ibdr export``
writes the particles as peft adapters.

Every finished unit of an experiment saves its posterior to ``<output>/posteriors/<key>.pt``
(:func:`pyro_ibdr.checkpoint.save_checkpoint`). Its config records the method and its config, the optimiser,
the prediction mode (ensemble, S samples, bins), the training-set size N and ``rebuild``: the experiment
(``vtab`` or ``commonsense``), the keyword arguments that built the network, and the data it was tested on.
Both commands rebuild that network with the unit's seed (so a randomly initialised backbone is the same
one), check that θ fits it, and load the posterior.

    pyro-ibdr predict outputs/vtab/posteriors/cifar10__ibdr__seed0.pt --output scores.json
    pyro-ibdr predict run.pt --data-dir ~/data/vtab-1k --task eurosat --split val200
    pyro-ibdr predict run.pt --test-file new_questions.jsonl
    pyro-ibdr export outputs/vtab/posteriors/cifar10__ibdr__seed0.pt adapters/
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pyro
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..checkpoint import Checkpoint, check_compatible, export_adapters, load_checkpoint
from ..io import write_json
from ..model import BayesianLoRA
from ..posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior, Posterior
from .grid import score


@dataclass
class Rebuilt:
    """A saved unit's network with its posterior loaded, and how it was evaluated."""

    checkpoint: Checkpoint
    model: BayesianLoRA
    rebuild: dict[str, Any]
    tokenizer: Any = None


def _rebuild_config(checkpoint: Checkpoint, path: Path) -> dict[str, Any]:
    rebuild = checkpoint.config.get("rebuild") or {}
    if rebuild.get("experiment") not in ("vtab", "commonsense"):
        raise click.UsageError(
            f"{path} records no experiment to rebuild its network from (config['rebuild']['experiment'] is "
            f"{rebuild.get('experiment')!r}); it was not written by `pyro-ibdr vtab` or `pyro-ibdr commonsense`"
        )
    return rebuild


def _vtab_net(rebuild: dict[str, Any]) -> tuple[nn.Module, None]:
    from .vtab import build_net

    net = dict(rebuild["net"])
    net["checkpoint"] = Path(net["checkpoint"]) if net.get("checkpoint") else None
    return build_net(**net), None


def _commonsense_net(rebuild: dict[str, Any]) -> tuple[nn.Module, Any]:
    from .commonsense import build_net, load_backbone

    backbone = rebuild["backbone"]
    tokenizer, lm, _ = load_backbone(backbone["name"], load_in_8bit=backbone["load_in_8bit"])
    lm.requires_grad_(False)
    return build_net(lm, tokenizer, **rebuild["net"]), tokenizer


def load_unit(path: Path, device: str) -> Rebuilt:
    """Rebuild the network a saved posterior was trained on (seeded as in training) and check θ fits it."""
    try:
        checkpoint = load_checkpoint(path, map_location=device)
    except (FileNotFoundError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="POSTERIOR") from error
    rebuild = _rebuild_config(checkpoint, path)
    pyro.set_rng_seed(checkpoint.seed)  # as train_and_evaluate did: a random backbone is the same one
    net, tokenizer = (_vtab_net if rebuild["experiment"] == "vtab" else _commonsense_net)(rebuild)
    model = BayesianLoRA(net.to(device), num_data=checkpoint.config["num_data"])
    check_compatible(checkpoint, model)
    return Rebuilt(checkpoint, model, rebuild, tokenizer)


def _vtab_data(rebuild: dict[str, Any], data_dir: Path | None, task: str | None, split: str | None,
               batch_size: int) -> tuple[Iterable, dict[str, Any]]:
    from .data.preprocess import ImagePreprocess
    from .data.vtab import PreloadedDataset, VTABDataset, get_task

    recorded = rebuild["data"]
    task = task or recorded["task"]
    try:
        classes, trained = get_task(task).num_classes, rebuild["net"]["num_classes"]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--task") from error
    if classes != trained:
        raise click.BadParameter(f"task {task!r} has {classes} classes; the posterior was trained on "
                                 f"{recorded['task']!r} with {trained}", param_hint="--task")
    own = data_dir is None and task == recorded["task"] and split in (None, recorded["split"])
    root = data_dir or Path(recorded["data_dir"])
    preprocess = ImagePreprocess(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in recorded["preprocess"].items()})
    dataset = PreloadedDataset(VTABDataset(root, task, split or recorded["split"], preprocess=preprocess))
    if own and recorded.get("max_test"):  # the run's own test protocol: its first max_test images
        dataset = Subset(dataset, range(min(recorded["max_test"], len(dataset))))
    described = {"data_dir": str(root), "task": task, "split": split or recorded["split"], "examples": len(dataset)}
    return DataLoader(dataset, batch_size=batch_size), described


def _commonsense_data(rebuild: dict[str, Any], tokenizer: Any, test_file: Path | None, source: str | None,
                      batch_size: int) -> tuple[Iterable, dict[str, Any]]:
    from .commonsense import collator
    from .data.commonsense import format_rows, load_commonsense, read_rows

    recorded = rebuild["data"]
    task, source = recorded["task"], source or recorded["source"]
    if test_file is not None:  # new questions, all of them
        records, dropped = format_rows(task, read_rows(test_file))
        described: dict[str, Any] = {"task": task, "test_file": str(test_file), "dropped": dropped}
    else:  # the run's own test protocol: its file or source, its first max_test questions
        if source == "files":
            records, dropped = format_rows(task, read_rows(recorded["test_file"]))
            described = {"task": task, "test_file": recorded["test_file"], "dropped": dropped}
        else:
            records = load_commonsense(task, source).test
            described = {"task": task, "source": source, "split": "test"}
        if recorded.get("max_test"):
            records = records[: recorded["max_test"]]
    if not records:
        raise click.UsageError(f"no {task} questions to score (every row was dropped or the file is empty)")
    max_length = recorded["max_length"]
    collate = collator(tokenizer, is_encoder=rebuild["net"]["is_encoder"], formulation=rebuild["net"]["formulation"],
                       max_length=max_length, length_normalization=recorded["length_normalization"])
    described["examples"] = len(records)
    return DataLoader(records, batch_size=batch_size, collate_fn=collate), described


@click.command(context_settings={"show_default": True})
@click.argument("posterior", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="VTAB: the root holding the task folder (default: the one the posterior was tested on).")
@click.option("--task", default=None, help="VTAB: the task folder to score (default: the trained task; same classes).")
@click.option("--split", type=click.Choice(["train800", "val200", "train800val200", "test"]), default=None,
              help="VTAB: the split to score (default: the split the run was evaluated on).")
@click.option("--test-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Commonsense: questions to score (JSONL or Parquet, raw HF fields of the trained task).")
@click.option("--source", type=click.Choice(["offline", "hub"]), default=None,
              help="Commonsense: score the test split of this source instead of a file (default: the run's).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Posterior samples S (default: the S the run was evaluated with).")
@click.option("--ensemble", type=click.Choice(["mean_probs", "mean_logits"]), default=None,
              help="How the S predictions are combined (default: the run's mode).")
@click.option("--max-examples", type=click.IntRange(min=1), default=None, help="Score the first N examples only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Examples per prediction batch (default: the run's test batch size, which reproduces its numbers "
                   "exactly; padding and summation order depend on it).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Device to predict on.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the scores as JSON to this file (they are always printed as JSON).")
def predict(posterior, data_dir, task, split, test_file, source, num_samples, ensemble, max_examples, batch_size,
            device, output) -> None:
    """Score data with a saved POSTERIOR (posteriors/<key>.pt of an experiment folder), without retraining.

    Prints (and with --output writes) accuracy, ECE (a fraction, 15 bins, top-label L1), NLL (nats), Brier
    (summed over classes) and the diversity metrics of the ensemble predictive, with the conventions used.
    With the defaults it reproduces the run's own test metrics.
    """
    unit = load_unit(posterior, device)
    experiment = unit.rebuild["experiment"]
    given = {"vtab": {"--test-file": test_file, "--source": source},
             "commonsense": {"--data-dir": data_dir, "--task": task, "--split": split}}[experiment]
    misplaced = [name for name, value in given.items() if value is not None]
    if misplaced:
        raise click.UsageError(f"{', '.join(misplaced)} do(es) not apply to a {experiment} posterior")
    batch_size = batch_size or unit.rebuild["data"]["batch_size"]
    if experiment == "vtab":
        loader, described = _vtab_data(unit.rebuild, data_dir, task, split, batch_size)
    else:
        loader, described = _commonsense_data(unit.rebuild, unit.tokenizer, test_file, source, batch_size)
    if max_examples is not None:
        loader = DataLoader(Subset(loader.dataset, range(min(max_examples, len(loader.dataset)))),
                            batch_size=batch_size, collate_fn=loader.collate_fn)
        described["examples"] = len(loader.dataset)
    recorded = unit.checkpoint.config["prediction"]
    try:
        metrics, _, _ = score(unit.model, unit.checkpoint.posterior, loader,
                              num_samples=num_samples or recorded["num_samples"], seed=unit.checkpoint.seed,
                              ensemble=ensemble or recorded["ensemble"], device=device,
                              precision=recorded.get("precision", "fp32"))
    except ValueError as error:  # an S the posterior cannot honour (point masses are evaluated once each)
        raise click.BadParameter(str(error), param_hint="--num-samples") from error
    result = {
        "posterior": str(posterior), "method": unit.checkpoint.method, "seed": unit.checkpoint.seed,
        "data": described, "metrics": metrics,
        "conventions": {"accuracy": "fraction of examples (top-1 of the ensemble predictive)",
                        "ece": f"fraction in [0, 1], top-label L1 over {metrics['n_bins']} equal-width bins",
                        "nll": "nats per example", "brier": "squared error summed over classes, range [0, 2]",
                        "ensemble": metrics["ensemble"], "num_samples": metrics["num_samples"]},
    }
    if output is not None:
        write_json(output, result)
    click.echo(json.dumps(result, indent=2))


def named_thetas(posterior: Posterior) -> dict[str, torch.Tensor]:
    """The θ vectors to export, by adapter name: particles' means, a Gaussian's or a Laplace approximation's mean
    (θ_MAP), or the stored samples.

    :raises TypeError: for a posterior kind without an export rule.
    """
    if isinstance(posterior, ParticlePosterior):
        return {f"particle_{k}": theta for k, theta in enumerate(posterior.particles)}
    if isinstance(posterior, GaussianPosterior):
        return {"mean": posterior.loc}
    if isinstance(posterior, EmpiricalPosterior):
        return {f"sample_{k}": theta for k, theta in enumerate(posterior.samples)}
    if posterior.kind == "laplace":
        return {"mean": posterior.tensors()["mean"]}
    raise TypeError(f"no export rule for a {type(posterior).__name__} posterior")


@click.command(context_settings={"show_default": True})
@click.argument("posterior", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def export(posterior, folder) -> None:
    """Write a saved POSTERIOR as standard peft adapters in FOLDER, one sub-folder per θ.

    Particles become particle_0, particle_1, ... (each component mean μ_k), a Gaussian or Laplace posterior its
    mean, SGLD's kept samples sample_0, ...; each loads with ``peft.PeftModel.from_pretrained(base_model, path)``.
    Full fine-tuning (fft) has no adapter to export. FOLDER is replaced as a whole, atomically.
    """
    unit = load_unit(posterior, "cpu")
    try:
        paths = export_adapters(unit.model, named_thetas(unit.checkpoint.posterior), folder)
    except TypeError as error:  # a posterior without θ vectors to export, or a network that is not a peft model
        raise click.UsageError(f"cannot export {posterior} ({unit.checkpoint.method}): {error}") from error
    click.echo(f"{len(paths)} peft adapter(s) of {unit.checkpoint.method}: " + ", ".join(map(str, paths)))
