"""Choose the paper preset's open IBDR settings on validation data, and ablate them.

    python -m examples.select_defaults --output runs/select

The paper leaves σ, the diversity kind, ρ and the dual step open (``pyro_ibdr.presets.PAPER``). This script
fits IBDR variants and the baselines at the same K on two problems and scores them on VALIDATION splits only
(the test splits are never read):

* ``cifar10``: the offline CIFAR-10 VTAB-1k folder (train800 → val200) on the offline DINOv2-S/14 at 56 px,
  LoRA (r = 8, α = 8) on the last block's MLP (``fc1``, ``fc2``) and a new head. Everything before that MLP
  is frozen and independent of θ, so the residual stream entering it is computed once; the class token is
  all the head reads, and the LayerNorms act per token, so the model on that cached vector equals the full
  network with the same adapters (checked when the cache is built).
* ``digits``: scikit-learn's digits (a fixed stratified 60/20/20 split; the last 20 % is never read), a small
  MLP pre-trained on digits 0–4 then frozen, LoRA on its two hidden layers and a new head for all 10 classes.

Stages, each at K = 4 over 3 seeds: (A) diversity ∈ {volume, log-volume} × σ ∈ {0, 1e-3, learnable from
1e-3}; (B) ρ ∈ {ρ₀/4, ρ₀, 4ρ₀} at A's choice; (D) the dual step η ∈ {η₀/10, η₀, 10η₀}, then λ₀ ∈ {λ₀/4,
λ₀, 4λ₀}, at the choice so far; (C) ablations at the final choice (ascent off, diversity off, σ = 0) beside
map and a deep ensemble. The rule, fixed before running: the lowest validation NLL averaged over both
problems (each the mean over seeds); accuracy and ECE are reported beside it.

A rerun into the same ``--output`` reuses the runs of ``selection.json`` whose label, method and options are
those asked for (the seeds too), so a new stage costs only its own runs.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click
import peft
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import PAPER, BayesianLoRA, evaluate, fit
from pyro_ibdr.io import atomic_write, write_json

K = PAPER.num_particles
SEEDS = (0, 1, 2)
RHO0 = PAPER.loss.rho
ETA0 = PAPER.loss.dual_lr
LAMBDA0 = PAPER.loss.lambda_init


@dataclass(frozen=True)
class Problem:
    name: str
    train: TensorDataset
    val: TensorDataset
    build: Callable[[], nn.Module]  # a fresh peft model (frozen base + adapters + new head)
    epochs: int


class CLSTail(nn.Module):
    """The last ViT block's MLP half, the final norm and the head, on the class token's residual (B, D)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        block = vit.blocks[-1]
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.norm, self.head = vit.norm, vit.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.ls2(self.mlp(self.norm2(h)))
        return self.head(self.norm(h))


def _residual_before_mlp(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token's residual stream after the last block's attention: (B, D)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    return (x + last.ls1(last.attn(last.norm1(x))))[:, 0]


def _cifar10(cache: Path) -> Problem:
    from pyro_ibdr.experiments.assets.cifar10 import ensure_cifar10_vtab
    from pyro_ibdr.experiments.data.vtab import VTABDataset
    from pyro_ibdr.experiments.vision import create_offline_vit

    root = ensure_cifar10_vtab().parent
    vit = create_offline_vit(10, 56).eval()
    if not cache.exists():
        tensors = {}
        with torch.no_grad():
            for split in ("train800", "val200"):
                data = VTABDataset(root, "cifar10", split, img_size=56, normalization="imagenet")
                images = torch.stack([data[i][0] for i in range(len(data))])
                feats = torch.cat([_residual_before_mlp(vit, chunk) for chunk in images.split(100)])
                torch.nn.init.normal_(vit.head.weight)  # a non-zero head makes the equality check informative
                full, tail = vit(images[:8]), CLSTail(vit)(feats[:8])
                nn.init.zeros_(vit.head.weight)
                if not torch.allclose(full, tail, atol=1e-4):
                    raise RuntimeError("the cached class-token tail does not reproduce the full network")
                tensors[split] = (feats, data.targets)
        with atomic_write(cache, "wb") as handle:
            torch.save(tensors, handle)
    tensors = torch.load(cache)

    def build() -> nn.Module:
        config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["mlp.fc1", "mlp.fc2"], modules_to_save=["head"])
        return peft.get_peft_model(CLSTail(create_offline_vit(10, 56)), config)

    return Problem("cifar10", TensorDataset(*tensors["train800"]), TensorDataset(*tensors["val200"]), build, 10)


def _digits() -> Problem:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_rest, _, y_rest, _ = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)  # test: unread
    x_tr, x_va, y_tr, y_va = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=0)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    seen = y_tr < 5
    optimiser = torch.optim.Adam(base.parameters(), lr=1e-2)
    for _ in range(200):  # pre-train on digits 0-4 only
        optimiser.zero_grad()
        nn.functional.cross_entropy(base(x_tr[seen]), y_tr[seen]).backward()
        optimiser.step()
    state = base.state_dict()

    def build() -> nn.Module:
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        net.load_state_dict(state)
        nn.init.zeros_(net[4].weight)
        nn.init.zeros_(net[4].bias)
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], modules_to_save=["4"])
        return peft.get_peft_model(net, config)

    return Problem("digits", TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va), build, 15)


def run_one(problem: Problem, method: str, options: dict[str, Any], seed: int) -> dict[str, float]:
    net = problem.build()
    model = BayesianLoRA(net, num_data=len(problem.train))
    loader = DataLoader(problem.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    result = fit(method, model, loader, preset=PAPER, epochs=problem.epochs, seed=seed, progress=False, **options)
    metrics = evaluate(model, result.posterior, DataLoader(problem.val, batch_size=256), seed=seed)
    return {k: float(metrics[k]) for k in ("accuracy", "ece", "nll", "disagreement")}


def score(problems: list[Problem], method: str, options: dict[str, Any], log: dict, label: str,
          earlier: dict | None = None) -> float:
    """Mean validation NLL over problems (each averaged over seeds); records every run under ``label``, reusing
    ``earlier``'s runs (a previous ``selection.json`` log) of the same label, method, options and seeds."""
    per_problem = []
    for problem in problems:
        stored = (earlier or {}).get(label, {}).get(problem.name)
        if stored and stored["method"] == method and stored["options"] == options and stored["seeds"] == list(SEEDS):
            runs = stored["runs"]
        else:
            runs = [run_one(problem, method, options, seed) for seed in SEEDS]
        summary = {k: (statistics.mean(r[k] for r in runs), statistics.stdev(r[k] for r in runs)) for k in runs[0]}
        log.setdefault(label, {})[problem.name] = {"method": method, "options": options, "seeds": list(SEEDS),
                                                   "runs": runs, "mean_std": summary}
        per_problem.append(summary["nll"][0])
        click.echo(f"{label:<34} {problem.name:<8} " + "  ".join(
            f"{k} {m:.4f}±{s:.4f}" for k, (m, s) in summary.items()), err=True)
    return statistics.mean(per_problem)


def table(log: dict) -> str:
    names = sorted({p for runs in log.values() for p in runs})
    lines = ["| setting | " + " | ".join(f"{p} acc | {p} ECE | {p} NLL" for p in names) + " |",
             "|---|" + "---|---|---|" * len(names)]
    for label, runs in log.items():
        cells = []
        for p in names:
            ms = runs[p]["mean_std"]
            cells += [f"{ms['accuracy'][0]:.3f} ± {ms['accuracy'][1]:.3f}", f"{ms['ece'][0]:.3f} ± {ms['ece'][1]:.3f}",
                      f"{ms['nll'][0]:.3f} ± {ms['nll'][1]:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Folder for the table and runs.")
@click.option("--threads", type=int, default=2, help="torch threads.")
def main(output: Path, threads: int) -> None:
    """Stages A, B, D and C on validation data; writes selection.json and selection.md to OUTPUT."""
    torch.set_num_threads(threads)
    output.mkdir(parents=True, exist_ok=True)
    problems = [_cifar10(output / "cifar10_features.pt"), _digits()]
    stored = output / "selection.json"
    earlier = json.loads(stored.read_text())["runs"] if stored.exists() else None
    log: dict[str, Any] = {}
    run = partial(score, problems, log=log, earlier=earlier)

    stage_a = {(d, s): {"diversity": d, "sigma": 1e-3 if s != "0" else 0.0,
                        "learn_sigma": s == "learned"}
               for d in ("volume", "log_volume") for s in ("0", "1e-3", "learned")}
    a = {key: run("ibdr", opts, label=f"ibdr {key[0]}, σ {key[1]}") for key, opts in stage_a.items()}
    best_a = stage_a[min(a, key=a.get)]
    b = {RHO0: a[min(a, key=a.get)]}
    for rho in (RHO0 / 4, RHO0 * 4):
        b[rho] = run("ibdr", {**best_a, "rho": rho}, label=f"ibdr A's choice, ρ {rho:g}")
    chosen, best = {**best_a, "rho": min(b, key=b.get)}, min(b.values())
    for name, symbol, default, factor in (("dual_lr", "η", ETA0, 10), ("lambda_init", "λ₀", LAMBDA0, 4)):
        d = {default: best}
        for value in (default / factor, default * factor):
            d[value] = run("ibdr", {**chosen, name: value}, label=f"ibdr choice so far, {symbol} {value:g}")
        if min(d, key=d.get) != default:
            chosen = {**chosen, name: min(d, key=d.get)}
        best = min(d.values())
    for label, change in (("ascent off", {"ascent": "none"}), ("diversity off", {"alpha": 0.0}),
                          ("σ = 0", {"sigma": 0.0, "learn_sigma": False})):
        if {**chosen, **change} != chosen:
            run("ibdr", {**chosen, **change}, label=f"ibdr chosen, {label}")
    run("map", {}, label="map")
    run("ensemble", {}, label=f"deep ensemble (K = {K})")

    report = {"chosen": chosen, "rule": "lowest mean validation NLL over both problems", "runs": log}
    write_json(output / "selection.json", report)
    with atomic_write(output / "selection.md") as handle:
        handle.write(f"Chosen (validation NLL): {chosen}\n\n" + table(log))
    click.echo(f"chosen: {chosen}\n" + table(log))


if __name__ == "__main__":
    main()
