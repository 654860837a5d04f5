"""Time per training step and communication per step of 1 vs W processes, data- and particle-parallel.

Every configuration trains the same LoRA MLP (frozen random weights, LoRA on its hidden layers, a trained head)
on the same random batches. The W-process runs are groups of spawned processes (gloo on CPU; nccl on CUDA with
one process per GPU); the communication volume is what :mod:`pyro_ibdr.distributed` counts: the bytes each
process puts into its collectives, per step, by kind. One run prints every number and the ratios to 1 process.

    python -m benchmarks.distributed_step                      # CPU, 2 processes, one thread each
    python -m benchmarks.distributed_step --device cuda --world 4 --hidden 1024 --batch 256
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import peft
import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pyro_ibdr import BayesianLoRA, distributed
from pyro_ibdr.methods import OptimSettings, create_method


def make_net(features: int, hidden: int, classes: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, classes))
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"])
    return peft.get_peft_model(net, config).to(device).eval()


def measure(mode: distributed.Mode | None, cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """Median seconds per step (after one warm-up step) and this process's bytes per step, by collective."""
    net = make_net(cfg["features"], cfg["hidden"], cfg["classes"], device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], cfg["features"], generator=generator).to(device)
    y = torch.randint(cfg["classes"], (cfg["batch"],), generator=generator).to(device)
    model = BayesianLoRA(net, num_data=10 * cfg["batch"])
    extra = {"num_particles": cfg["particles"]} if cfg["method"] in ("ibdr", "svgd", "ensemble") else {}
    with distributed.parallel(mode):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        method = create_method(cfg["method"], model, optim=OptimSettings(lr=1e-3), **extra)
        xs, ys = distributed.shard_batch(x, y)
        method.step(xs, ys)
        distributed.traffic.clear()
        times = []
        for _ in range(cfg["steps"]):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            distributed.barrier()
            start = time.perf_counter()
            method.step(xs, ys)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        traffic = {key: value / cfg["steps"] for key, value in distributed.traffic.items()}
    return {"seconds": statistics.median(times), "traffic": traffic, "dim": model.dim}


def _worker(rank: int, world: int, folder: str, modes: list[str], options: dict[str, Any]) -> None:
    torch.set_num_threads(options["threads"])
    cuda = options["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    try:
        results = {mode: measure(mode, options, f"cuda:{rank}" if cuda else "cpu") for mode in modes}
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()


def _kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--world", type=click.IntRange(min=2), default=2, show_default=True, help="W, processes (GPUs)")
@click.option("--method", default="ibdr", show_default=True, help="a registered method")
@click.option("--particles", default=4, show_default=True, help="K (a multiple of W for particle mode)")
@click.option("--batch", default=64, show_default=True, help="B, the global batch")
@click.option("--features", default=64, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--classes", default=10, show_default=True)
@click.option("--steps", default=5, show_default=True, help="timed steps (after one warm-up step)")
@click.option("--threads", default=1, show_default=True, help="torch threads per process")
def main(device: str, world: int, method: str, particles: int, batch: int, features: int, hidden: int, classes: int,
         steps: int, threads: int) -> None:
    if device == "cuda" and torch.cuda.device_count() < world:
        raise click.UsageError(f"--world {world} needs {world} GPUs, found {torch.cuda.device_count()}")
    options = {"device": device, "method": method, "particles": particles, "batch": batch, "features": features,
               "hidden": hidden, "classes": classes, "steps": steps, "threads": threads}
    torch.set_num_threads(threads)
    single = measure(None, options, "cuda:0" if device == "cuda" else "cpu")
    modes = ["data", "particle"] if method in ("ibdr", "svgd") else ["data"]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, folder, modes, options), nprocs=world)
        ranks = torch.load(Path(folder) / "results.pt", weights_only=False)
    print(f"{method}: K = {particles}, global batch B = {batch}, D = {single['dim']} LoRA parameters, {device}, "
          f"{threads} thread(s) per process, median of {steps} steps")
    print(f"  1 process            {single['seconds'] * 1e3:8.1f} ms/step")
    for mode in modes:
        seconds = max(r[mode]["seconds"] for r in ranks)  # a step ends when the slowest process ends
        traffic = ranks[0][mode]["traffic"]
        total = sum(v for k, v in traffic.items() if not k.endswith(" calls"))
        kinds = ", ".join(f"{k} {_kib(v)} in {traffic[k + ' calls']:.0f} calls" for k, v in sorted(traffic.items())
                          if not k.endswith(" calls"))
        print(f"  {world} processes, {mode:8s} {seconds * 1e3:8.1f} ms/step  (x{single['seconds'] / seconds:.2f} "
              f"speed-up)  sent per process per step: {_kib(total)} ({kinds})")


if __name__ == "__main__":
    main()
