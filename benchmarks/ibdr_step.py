"""Time one IBDR training step: vmap-vectorised particles vs a Python loop vs the unavoidable work.

The unavoidable work of an IBDR step with K particles is two forward+backward passes over K·B examples
(ascent pass and descent pass) of the same LoRA model; the script reports each variant's time relative
to that reference, all measured in one run on the same machine.

    python -m benchmarks.ibdr_step --model vit_small_patch16_224 --img-size 112 --batch 16 --particles 4
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import click
import peft
import pyro
import timm
import torch
import torch.nn.functional as F
from pyro.infer import SVI

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide


def make_net(name: str, img_size: int, num_classes: int, device: str) -> torch.nn.Module:
    vit = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes)
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(vit, config).to(device).eval()


def timed(step: Callable[[], None], repeats: int, device: str) -> float:
    """Median wall time of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ibdr_step(net, x, y, particles: int, vectorize: bool) -> Callable[[], None]:
    pyro.clear_param_store()
    model = BayesianLoRA(net, num_data=1000, vectorize=vectorize)
    guide = ParticleGuide(model, particles, sigma=0.01, name=f"bench_{vectorize}")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), loss=IBDRLoss(alpha=0.02))
    return lambda: svi.step(x, y)


def reference_step(net, x, y, particles: int) -> Callable[[], None]:
    """Two plain LoRA forward+backward passes over K·B examples."""
    xs, ys = x.repeat(particles, *[1] * (x.dim() - 1)), y.repeat(particles)

    def step() -> None:
        for _ in range(2):
            F.cross_entropy(net(xs), ys).backward()
        net.zero_grad(set_to_none=True)

    return step


@click.command()
@click.option("--model", "model_name", default="vit_small_patch16_224", show_default=True, help="timm architecture")
@click.option("--img-size", default=112, show_default=True)
@click.option("--batch", default=16, show_default=True, help="B, examples per particle")
@click.option("--particles", default=4, show_default=True, help="K")
@click.option("--repeats", default=5, show_default=True)
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True)
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's choice)")
def main(model_name: str, img_size: int, batch: int, particles: int, repeats: int, device: str, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = make_net(model_name, img_size, 10, device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    results = {
        "vmap": timed(ibdr_step(net, x, y, particles, vectorize=True), repeats, device),
        "loop": timed(ibdr_step(net, x, y, particles, vectorize=False), repeats, device),
        "reference": timed(reference_step(net, x, y, particles), repeats, device),
    }
    click.echo(f"{model_name} @ {img_size}px, K={particles}, B={batch}, device={device}, "
               f"threads={torch.get_num_threads()}")
    for name, seconds in results.items():
        click.echo(f"  {name:10s} {seconds:8.3f} s/step")
    click.echo(f"  vmap / loop       = {results['vmap'] / results['loop']:.2f}")
    click.echo(f"  vmap / reference  = {results['vmap'] / results['reference']:.2f}")
    click.echo(f"  loop / reference  = {results['loop'] / results['reference']:.2f}")


if __name__ == "__main__":
    main()
