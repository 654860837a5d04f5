"""Time one IBDR training step with the particles fused, looped or vmapped, against the unavoidable work.

The unavoidable work of an IBDR step with K particles is two forward+backward passes over K·B examples of the
plain LoRA model (the ascent pass and the descent pass); every ratio is measured in this one run. Scenarios:

    a  ViT-S/16 at 112 px, K = 4, B = 16, LoRA on the qkv of all 12 blocks   target: fused <= 1.0x the loop
    b  the same at B = 4 (small per-particle batches)                         target: fused <= 0.8x the loop
    c  the offline DINOv2-S/14 at 56 px, LoRA on split q, v (paper placement)  skipped if the asset is not cached
    d  ViT-S/16 at 112 px, LoRA on the last 4 of 12 blocks only               the frozen prefix runs once

and in every scenario: fused IBDR step <= 1.05x the unavoidable work. Peak memory is the CUDA allocator's peak
above the memory in use before the step; on a Linux CPU it is the rise of the process's peak resident set
(reset before each variant; a rough figure, since the allocator keeps freed pages).

    python -m benchmarks.ibdr_step --threads 2
    python -m benchmarks.ibdr_step --scenario b --scenario d --repeats 5
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import peft
import pyro
import timm
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from torch import nn

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide
from pyro_ibdr.precision import Precision, autocast

MODES = ("fused", "loop", "vmap")


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting: a LoRA network builder and the batch it is timed on."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    img_size: int
    batch: int
    particles: int = 4
    target: str = ""


def vit_lora(name: str, img_size: int, *, layers: Sequence[int] | None = None, rank: int = 8,
             **options: object) -> nn.Module:
    """A random-weight timm ViT (``options`` go to ``timm.create_model``) with LoRA on every (or the listed)
    block's fused qkv and a trained head."""
    vit = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=10, **options)
    placement = {"layers_to_transform": list(layers), "layers_pattern": "blocks"} if layers else {}
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], modules_to_save=["head"], **placement)
    return peft.get_peft_model(vit, config)


def offline_dinov2(img_size: int) -> nn.Module:
    """The offline DINOv2-S/14 with split q, v LoRA, as ``pyro_ibdr.experiments.vtab`` builds it."""
    from pyro_ibdr.experiments.vision import create_offline_vit, split_qkv, vit_lora_config

    return peft.get_peft_model(split_qkv(create_offline_vit(10, img_size)), vit_lora_config(8, 8))


def dinov2_cached() -> Path | None:
    """The converted DINOv2-S weights if they are cached (never converts or downloads here)."""
    from pyro_ibdr.experiments.assets.dinov2 import WEIGHTS_FILE
    from pyro_ibdr.experiments.assets.fetch import cache_dir

    path = cache_dir() / "models" / WEIGHTS_FILE
    return path if path.is_file() else None


SCENARIOS = {
    "a": Scenario("a", "ViT-S/16 at 112 px, LoRA on all 12 blocks", lambda: vit_lora("vit_small_patch16_224", 112),
                  112, 16, target="fused <= 1.0x loop"),
    "b": Scenario("b", "ViT-S/16 at 112 px, LoRA on all 12 blocks", lambda: vit_lora("vit_small_patch16_224", 112),
                  112, 4, target="fused <= 0.8x loop"),
    "c": Scenario("c", "offline DINOv2-S/14 at 56 px, LoRA on q, v", lambda: offline_dinov2(56), 56, 16),
    "d": Scenario("d", "ViT-S/16 at 112 px, LoRA on the last 4 of 12 blocks",
                  lambda: vit_lora("vit_small_patch16_224", 112, layers=range(8, 12)), 112, 16,
                  target="fused < 2K full passes"),
}


class PeakMemory:
    """MB of peak memory above the level before the block: CUDA allocator peak, or Linux peak RSS (rough)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mb = float("nan")

    @staticmethod
    def _status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # kB -> MB
        raise KeyError(field)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated() / 2**20
        elif sys.platform == "linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back, so the peak is this block's
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            self._before = self._status("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self._before
        elif sys.platform == "linux":
            self.mb = self._status("VmHWM:") - self._before


@dataclass(frozen=True)
class Timing:
    """One variant's measurement: seconds of each timed round (in round order) and the warm-up's peak MB."""

    rounds: tuple[float, ...]
    peak_mb: float

    @property
    def seconds(self) -> float:
        return statistics.median(self.rounds)

    def ratio(self, other: Timing) -> tuple[float, float, float]:
        """(median, lower, upper quartile) of the per-round ratios self / other: each round times both variants
        back to back, so a slow spell of the machine (other tenants, frequency changes) slows both alike and
        largely cancels in the ratio."""
        ratios = [a / b for a, b in zip(self.rounds, other.rounds, strict=True)]
        if len(ratios) < 2:
            return ratios[0], ratios[0], ratios[0]
        low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return statistics.median(ratios), low, high


def measure(steps: dict[str, Callable[[], None]], repeats: int, device: str) -> dict[str, Timing]:
    """{name: Timing}: one warm-up call of each step (its peak memory), then ``repeats`` rounds that time every
    step in turn."""
    peaks = {}
    for name, step in steps.items():
        with PeakMemory(device) as memory:
            step()
        peaks[name] = memory.mb
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(times[name]), peaks[name]) for name in steps}


def ibdr_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, particles: int, mode: str,
              precision: Precision) -> Callable[[], None]:
    """One SVI step of IBDR (closed-form ascent: two passes per particle) with the particles run as ``mode``."""
    model = BayesianLoRA(net, num_data=1000, vectorize=mode)
    guide = ParticleGuide(model, particles, sigma=0.01, name=f"bench_{mode}")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), loss=IBDRLoss(alpha=0.02))

    def step() -> None:
        with autocast(precision, x.device):
            svi.step(x, y)

    return step


def reference_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, particles: int,
                   precision: Precision) -> Callable[[], None]:
    """The unavoidable work: two plain LoRA forward+backward passes over K·B examples."""
    xs, ys = x.repeat(particles, *[1] * (x.dim() - 1)), y.repeat(particles)

    def step() -> None:
        for _ in range(2):
            with autocast(precision, x.device):
                loss = F.cross_entropy(net(xs), ys)
            loss.backward()
        net.zero_grad(set_to_none=True)

    return step


def run_scenario(scenario: Scenario, *, modes: Sequence[str] = MODES, repeats: int, device: str,
                 precision: Precision = "fp32") -> dict[str, Timing]:
    """Time every mode and the reference on one scenario; print and return {name: Timing}.

    Ratios are medians of per-round ratios, with their interquartile range in brackets."""
    torch.manual_seed(0)
    net = scenario.build().to(device).eval()
    x = torch.randn(scenario.batch, 3, scenario.img_size, scenario.img_size, device=device)
    y = torch.randint(0, 10, (scenario.batch,), device=device)
    k = scenario.particles
    pyro.clear_param_store()
    steps = {mode: ibdr_step(net, x, y, k, mode, precision) for mode in modes}
    steps["reference"] = reference_step(net, x, y, k, precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notice for SDPA on CPU, once per call
        results = measure(steps, repeats, device)
    click.echo(f"({scenario.key}) {scenario.title}: K={k}, B={scenario.batch}, {precision}, device={device}, "
               f"threads={torch.get_num_threads()}, {repeats} interleaved rounds (medians; ratios: median of the "
               "per-round ratios [quartiles])")
    for name, timing in results.items():
        label = "reference (2 plain LoRA passes over K·B)" if name == "reference" else f"{name} IBDR step"
        click.echo(f"    {label:42s} {timing.seconds:8.3f} s   peak {timing.peak_mb:8.0f} MB")

    def ratio(a: str, b: str) -> str:
        median, low, high = results[a].ratio(results[b])
        return f"{a} / {b} = {median:.2f} [{low:.2f}, {high:.2f}]"

    for mode in modes:
        ratios = [ratio(mode, "reference")]
        if mode != "loop" and "loop" in results:
            ratios.append(ratio(mode, "loop"))
        click.echo("    " + ",  ".join(ratios))
    if scenario.target:
        click.echo(f"    target: {scenario.target}; IBDR step (fused) <= 1.05x reference")
    return results


@click.command(context_settings={"show_default": True})
@click.option("--scenario", "keys", multiple=True, type=click.Choice(sorted(SCENARIOS)),
              help="Scenarios to run (repeatable); default: all.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES), help="Particle modes (default: all).")
@click.option("--repeats", default=3, help="Timed steps per variant after one warm-up step.")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--precision", default="fp32", type=click.Choice(["fp32", "bf16", "fp16"]), help="Autocast setting.")
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's choice).")
def main(keys: tuple[str, ...], modes: tuple[str, ...], repeats: int, device: str, precision: Precision,
         threads: int | None) -> None:
    """Fused vs loop vs vmap IBDR steps and their ratio to the unavoidable work."""
    if threads:
        torch.set_num_threads(threads)
    for key in keys or sorted(SCENARIOS):
        if key == "c" and dinov2_cached() is None:
            click.echo("(c) skipped: the offline DINOv2-S weights are not cached (python -m examples.vtab caches them)")
            continue
        results = run_scenario(SCENARIOS[key], modes=modes or MODES, repeats=repeats, device=device,
                               precision=precision)
        if key == "d" and "fused" in results:
            k = SCENARIOS[key].particles
            median, low, high = results["fused"].ratio(results["reference"])
            click.echo(f"    fused step / 2K full passes (K={k}) = {median:.2f} [{low:.2f}, {high:.2f}] "
                       "(the frozen first 8 blocks run once, not K times)")


if __name__ == "__main__":
    main()
