"""Where an experiment runs: the ``--device`` option (``auto`` by default) and the environment its results record."""

from __future__ import annotations

import platform
from typing import Any

import click
import torch

from ..checkpoint import library_versions

DEVICE_HELP = ("Device to train and evaluate on: auto (the GPU when one is present, else the CPU), cpu, cuda, "
               "cuda:N or mps.")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; any other name must be a usable device.

    Raises ``ValueError`` for a name torch does not know, or a CUDA/MPS device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use --device cpu or auto")
    return device


def _device_callback(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return str(resolve_device(value))
    except ValueError as err:
        raise click.BadParameter(str(err)) from err


def device_option() -> Any:
    """The ``--device`` click option shared by the experiment commands; its value is the resolved device name."""
    return click.option("--device", default="auto", callback=_device_callback, help=DEVICE_HELP)


def run_environment(device: str | torch.device) -> dict[str, Any]:
    """JSON-ready description of the run's hardware and software: device (and GPU name), CPU threads, versions."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "versions": {**library_versions(), "python": platform.python_version()}}
