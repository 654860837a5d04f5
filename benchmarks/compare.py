"""Compare inference methods on one small task at the same number of steps.

The task: scikit-learn's 8×8 digits (1,797 images; a fixed train/test split), a random frozen MLP
64 → hidden → hidden → 10 with LoRA on both hidden layers and a trained head. Every method gets the same
backbone, LoRA placement and rank, minibatches, optimiser, steps and number of test draws S. Each method
runs in a fresh process (unless ``--in-process``) so that the CPU peak memory (max RSS) is its own.

    python benchmarks/compare.py --steps 300 --methods ibdr svgd bbb map --out results/compare

Prints one table row per method; ``--out PREFIX`` also writes PREFIX.json (configuration, seed,
versions, per-method results and training history) and PREFIX.csv (the table).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import peft
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.checkpoint import library_versions
from pyro_ibdr.evaluation import evaluate
from pyro_ibdr.io import write_csv, write_json
from pyro_ibdr.methods import METHODS, OptimSettings
from pyro_ibdr.train import fit

DEFAULT_METHODS = ("ibdr", "svgd", "bbb", "map")
#: Methods whose particle count is set by ``--particles``.
PARTICLE_METHODS = ("ibdr", "svgd", "ensemble")
COLUMNS = ("method", "accuracy", "ece", "nll", "ms_per_step", "passes_per_step", "k_or_s", "peak_memory_mb")


class FrozenMLP(nn.Module):
    """x (B, 64) → logits (B, 10): two ReLU hidden layers (the LoRA targets) and a linear head."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def digits_split(n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order[:n_train]], y[order[:n_train]], x[order[n_train:]], y[order[n_train:]]


def build_model(config: dict[str, Any], num_data: int, device: torch.device) -> BayesianLoRA:
    torch.manual_seed(config["seed"])
    lora = peft.LoraConfig(r=config["rank"], lora_alpha=config["rank"], target_modules=["fc1", "fc2"],
                           lora_dropout=config["lora_dropout"], modules_to_save=["head"])
    net = peft.get_peft_model(FrozenMLP(config["hidden"]), lora).to(device).eval()
    return BayesianLoRA(net, num_data=num_data)


def method_options(name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"num_particles": config["particles"]} if name in PARTICLE_METHODS else {}


def run_method(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Train one method and evaluate it on the test split (runs in its own process)."""
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    x, y, x_test, y_test = digits_split(config["n_train"], config["seed"])
    model = build_model(config, len(y), device)
    loader = DataLoader(TensorDataset(x, y), batch_size=config["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(config["seed"]))
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    result = fit(name, model, loader, steps=config["steps"], optim=OptimSettings(lr=config["lr"]),
                 seed=config["seed"], progress=False, device=device, **method_options(name, config))
    metrics = evaluate(model, result.posterior, test_loader, num_samples=config["test_samples"], device=device)
    return {
        "method": name,
        "accuracy": metrics["accuracy"],
        "ece": metrics["ece"],
        "nll": metrics["nll"],
        "ms_per_step": 1e3 * result.time_per_step_s,
        "passes_per_step": result.passes_per_step,
        "k_or_s": result.num_particles_or_samples,
        "peak_memory_mb": result.peak_memory_mb,
        "rss_before_fit_mb": rss_before_mb,
        "wall_time_s": result.wall_time_s,
        "metrics": metrics,
        "history": result.history,
        "options": method_options(name, config),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and abs(value) < 10 else (
            f"{value:.1f}" if isinstance(value, float) else str(value))

    table = [list(COLUMNS)] + [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="registered method names")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--particles", type=int, default=4, help=f"K for {', '.join(PARTICLE_METHODS)}")
    parser.add_argument("--test-samples", type=int, default=None,
                        help="S posterior draws at test (default: point masses once each, 8 draws otherwise)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="peft's lora_dropout (mc_dropout needs > 0)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (faster start; CPU peak memory is then cumulative)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    if "mc_dropout" in args.methods and not args.lora_dropout > 0:
        parser.error("mc_dropout needs dropout in the network: pass --lora-dropout, e.g. 0.1")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k not in ("methods", "out", "in_process")}
    rows = []
    for name in args.methods:
        if args.in_process:
            rows.append(run_method(name, config))
            continue
        # A fresh process per method: CPU max RSS is a per-process high-water mark.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(run_method, name, config).result())
    print(f"digits, frozen MLP + LoRA r={args.rank}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, "
          f"S={args.test_samples or 'default'} test draws, seed {args.seed}, device {args.device}")
    print(format_table(rows))
    if args.device == "cpu" and not args.in_process:
        print("peak_memory_mb: the run's process max RSS (includes the Python + torch runtime, "
              f"~{min(r['rss_before_fit_mb'] for r in rows):.0f} MB before training)")
    if args.out:
        write_json(f"{args.out}.json", {"config": config, "methods": args.methods, "versions": library_versions(),
                                        "results": rows})
        write_csv(f"{args.out}.csv", [{c: row[c] for c in COLUMNS} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
