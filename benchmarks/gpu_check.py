"""The GPU check, one command, under 8 minutes on one GPU: ViT-B/16 at 224 px (random weights, no hub),
K = 4 particles, B = 64 images, in fp32 and bf16: fused vs vmap vs loop IBDR steps, each against the unavoidable
work (two plain LoRA forward+backward passes over K·B images), with the peak CUDA memory of every variant.

    python -m benchmarks.gpu_check                 # on a CUDA machine; prints the tables the README quotes
    python -m benchmarks.gpu_check --smoke         # seconds on a CPU: a 2-block ViT, K = 2, B = 2 (checks the script)
"""

from __future__ import annotations

import sys

import click
import torch

from benchmarks.ibdr_step import MODES, Scenario, run_scenario, vit_lora

FULL = Scenario("gpu", "ViT-B/16 at 224 px, LoRA on the qkv of all 12 blocks",
                lambda: vit_lora("vit_base_patch16_224", 224), 224, 64)
SMOKE = Scenario("smoke", "2-block tiny ViT at 32 px (smoke run)",
                 lambda: vit_lora("vit_tiny_patch16_224", 32, rank=2, depth=2), 32, 2, particles=2)


@click.command(context_settings={"show_default": True})
@click.option("--smoke", is_flag=True, help="A tiny CPU run that checks the script end to end.")
@click.option("--repeats", default=5, help="Timed steps per variant after one warm-up step (smoke: 1).")
def main(smoke: bool, repeats: int) -> None:
    """Fused vs vmap vs loop IBDR steps on one GPU in fp32 and bf16."""
    if not smoke and not torch.cuda.is_available():
        raise click.UsageError("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    device = "cpu" if smoke else "cuda"
    if smoke:
        torch.set_num_threads(1)  # tiny kernels: a second thread only adds synchronisation
    scenario = SMOKE if smoke else FULL
    if not smoke:
        click.echo(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    for precision in ("fp32", "bf16"):
        run_scenario(scenario, modes=MODES, repeats=1 if smoke else repeats, device=device, precision=precision)


if __name__ == "__main__":
    sys.exit(main())
