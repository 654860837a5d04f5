"""How the offline commonsense default was chosen: on VALIDATION questions carved from the training pool.

Not a speed benchmark. For each task, ``--val`` questions are held out from the offline training pool
(:func:`~pyro_ibdr.experiments.data.commonsense.validation_split`, the same rule as ``--select``); the test
questions are never scored. SmolLM2-135M is scored on them

1. zero-shot in the BLoB letter formulation and in the cloze formulation normalised by tokens and by
   characters (the formulation choice);
2. after map training (LoRA r = 8 on q, v; AdamW; ``--batch-size`` questions per step) in the cloze
   formulation with ``--normalization``, for each learning rate in ``--lrs``, evaluated after each number
   of steps in ``--checkpoints`` (one run per learning rate, evaluated along the way).

    python -m benchmarks.commonsense_selection --out results/commonsense_selection.json

Writes the validation accuracies (and the wall time) as JSON and prints them.
"""

from __future__ import annotations

import argparse
import copy
import time
from itertools import cycle
from typing import Any

import pyro
import torch
from torch.utils.data import DataLoader

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.experiments.commonsense import OFFLINE_LM, build_net, collator, load_backbone
from pyro_ibdr.experiments.data.commonsense import load_offline, validation_split
from pyro_ibdr.experiments.environment import run_environment
from pyro_ibdr.io import write_json
from pyro_ibdr.methods import OptimSettings, create_method
from pyro_ibdr.posterior import ParticlePosterior, Posterior
from pyro_ibdr.predictive import predict_loader


def accuracy(model: BayesianLoRA, posterior: Posterior, loader: DataLoader) -> float:
    probs, targets = predict_loader(model, posterior, loader, 1)
    return (probs.mean(0).argmax(-1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="winogrande_s,arc_challenge,arc_easy,winogrande_m,obqa,boolq")
    parser.add_argument("--val", type=int, default=40, help="validation questions per task")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--normalization", choices=["tokens", "chars"], default="tokens")
    parser.add_argument("--lrs", default="1e-3,4e-3")
    parser.add_argument("--checkpoints", default="6,12,24")
    parser.add_argument("--zero-shot-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = [int(s) for s in args.checkpoints.split(",")]
    start = time.perf_counter()
    tokenizer, backbone, _ = load_backbone(OFFLINE_LM, load_in_8bit=False)
    backbone.requires_grad_(False)
    results: dict[str, Any] = {"settings": vars(args), "environment": run_environment("cpu"), "tasks": {}}

    def model_for(formulation: str, n_choices: int, num_data: int) -> BayesianLoRA:
        net = build_net(copy.deepcopy(backbone), tokenizer, is_encoder=False, n_choices=n_choices, rank=8,
                        lora_alpha=16.0, lm_head=False, formulation=formulation)
        return BayesianLoRA(net, num_data=num_data)

    for task in args.tasks.split(","):
        split = load_offline(task)
        train, val = validation_split(split.train, args.val)
        row: dict[str, Any] = {"train": len(train), "val": len(val)}
        for name, formulation, normalization in (("letter", "letter", "tokens"), ("cloze_tokens", "cloze", "tokens"),
                                                 ("cloze_chars", "cloze", "chars")):
            model = model_for(formulation, split.n_choices, len(train))
            collate = collator(tokenizer, is_encoder=False, formulation=formulation, max_length=args.max_length,
                               length_normalization=normalization)
            loader = DataLoader(val, batch_size=8, collate_fn=collate)
            row[f"zero_shot_{name}"] = accuracy(model, ParticlePosterior(model.theta0[None]), loader)
            print(task, name, "zero-shot", row[f"zero_shot_{name}"], f"{time.perf_counter() - start:.0f}s", flush=True)
        collate = collator(tokenizer, is_encoder=False, formulation="cloze", max_length=args.max_length,
                           length_normalization=args.normalization)
        val_loader = DataLoader(val, batch_size=8, collate_fn=collate)
        for lr in ([] if args.zero_shot_only else [float(s) for s in args.lrs.split(",")]):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            model = model_for("cloze", split.n_choices, len(train))
            method = create_method("map", model, optim=OptimSettings(lr=lr, optimizer="adamw"), seed=0)
            batches = cycle(DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(0)))
            for step in range(1, max(checkpoints) + 1):
                method.step(*next(batches))
                if step in checkpoints:
                    row[f"map_lr{lr:g}_step{step}"] = accuracy(model, method.posterior(), val_loader)
                    print(task, f"map lr {lr:g} step {step}", row[f"map_lr{lr:g}_step{step}"],
                          f"{time.perf_counter() - start:.0f}s", flush=True)
        results["tasks"][task] = row
        results["wall_time_s"] = time.perf_counter() - start
        if args.out:
            write_json(args.out, results)


if __name__ == "__main__":
    main()
