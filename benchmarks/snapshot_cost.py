"""What a training snapshot (``fit(..., checkpoint=...)``) costs, in IBDR steps of the same model.

One snapshot holds the method's state (param store, Adam moments, λ), the RNG states and the run's history;
it is written atomically once per ``checkpoint_every`` epochs. The script times one IBDR step and one
snapshot of a timm ViT with LoRA on q, k, v (random weights, no download) and prints their ratio, measured
in one run on the same machine. Per epoch the overhead is that ratio divided by the steps per epoch
(VTAB-1k with batch 64: 16 steps).

    python -m benchmarks.snapshot_cost --model vit_small_patch16_224 --img-size 112 --batch 16 --particles 4
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from benchmarks.ibdr_step import make_net, timed
from pyro_ibdr import BayesianLoRA, create_method
from pyro_ibdr.resume import rng_state, save_training_state


@click.command()
@click.option("--model", "model_name", default="vit_small_patch16_224", help="timm architecture (random weights).")
@click.option("--img-size", type=int, default=112, help="Input side in pixels.")
@click.option("--batch", type=int, default=16, help="Minibatch size.")
@click.option("--particles", type=int, default=4, help="K particles.")
@click.option("--repeats", type=int, default=5, help="Timed repetitions (the median is reported).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="Device.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
def main(model_name: str, img_size: int, batch: int, particles: int, repeats: int, device: str,
         threads: int | None) -> None:
    """Print the time of one IBDR step, of one snapshot, and their ratio."""
    if threads:
        torch.set_num_threads(threads)
    model = BayesianLoRA(make_net(model_name, img_size, 10, device), num_data=1000)
    method = create_method("ibdr", model, num_particles=particles)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    history = [{"loss": 1.0, "lambda": 1.0, "epoch": e} for e in range(150)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "snapshot.pt"
        step_s = timed(lambda: method.step(x, y), repeats, device)  # the warm-up step creates Adam's state

        def snapshot() -> None:
            save_training_state(path, {"method": method.state_dict(), "rng": rng_state(), "history": history})

        snapshot_s = timed(snapshot, repeats, device)
        size_mb = path.stat().st_size / 2**20
    click.echo(f"{model_name} at {img_size} px, LoRA D = {model.dim}, K = {particles}, batch {batch}, {device}")
    click.echo(f"IBDR step {step_s:.3f} s; snapshot {snapshot_s:.3f} s ({size_mb:.1f} MB); "
               f"snapshot / step = {snapshot_s / step_s:.3f}")


if __name__ == "__main__":
    main()
