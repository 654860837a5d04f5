"""Checkpoints of learned posteriors, and export of particles as standard peft adapters.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: the posterior's state dict, the method's name and extra state (e.g. IBDR's
λ), the run's configuration and seed, library versions, and the names and shapes of the flat vector θ
(:class:`~pyro_ibdr.ParamSpec`) it belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .io import atomic_folder, atomic_write
from .model import BayesianLoRA
from .params import ParamSpec, assigned
from .posterior import ParticlePosterior, Posterior

#: Marks a file as a pyro_ibdr checkpoint; the number changes when the layout does.
FORMAT = "pyro_ibdr.checkpoint"
FORMAT_VERSION = 1

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def library_versions() -> dict[str, str]:
    """Installed versions of pyro_ibdr and the libraries that shape its results (``"not installed"`` when absent)."""
    versions = {}
    for name, dist_name in (("pyro_ibdr", "pyro_ibdr"), ("torch", "torch"), ("pyro", "pyro-ppl"), ("peft", "peft"),
                            ("transformers", "transformers"), ("timm", "timm"), ("torchvision", "torchvision")):
        try:
            versions[name] = version(dist_name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _check_plain(value: Any, where: str) -> None:
    """Reject values that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ValueError(f"{where} has a key of type {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(
            f"{where} is a {type(value).__name__}; checkpoints store only tensors, str, int, float, bool, None "
            "and lists/tuples/dicts of them"
        )


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``spec`` is the θ layout of the model it was trained on."""

    posterior: Posterior
    method: str
    config: dict[str, Any]
    seed: int
    spec: ParamSpec
    state: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike[str],
    posterior: Posterior,
    *,
    spec: ParamSpec,
    method: str,
    config: dict[str, Any],
    seed: int,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (a temporary file in the same folder, then ``os.replace``).

    :param spec: the layout of θ (``model.spec``); it must have the posterior's dimension D.
    :param config: the run's configuration (plain values only).
    :param state: the method's extra state (``method.state()``, plain values and tensors only).
    """
    if posterior.dim != spec.dim:
        raise ValueError(f"the posterior has dimension {posterior.dim} but the parameter spec has D = {spec.dim}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "posterior": posterior.state_dict(),
        "method": method,
        "config": config,
        "seed": int(seed),
        "state": state or {},
        "versions": library_versions(),
        "param_spec": {"names": list(spec.names), "shapes": [list(s) for s in spec.shapes]},
    }
    _check_plain(payload, "checkpoint")
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled).

    :raises FileNotFoundError: when ``path`` does not exist.
    :raises ValueError: when the file is truncated, corrupted or not a pyro_ibdr checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupted file?): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro_ibdr checkpoint (no {FORMAT!r} marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {payload.get('format_version')}; this library reads {FORMAT_VERSION}"
        )
    spec = payload["param_spec"]
    return Checkpoint(
        posterior=Posterior.from_state_dict(payload["posterior"]),
        method=payload["method"],
        config=payload["config"],
        seed=payload["seed"],
        spec=ParamSpec(tuple(spec["names"]), tuple(torch.Size(s) for s in spec["shapes"])),
        state=payload["state"],
        versions=payload["versions"],
    )


def check_compatible(checkpoint: Checkpoint, model: BayesianLoRA) -> None:
    """Raise ``ValueError`` naming the differences when the checkpoint's θ layout is not the model's."""
    saved, current = checkpoint.spec, model.spec
    if saved == current:
        return
    saved_shapes = dict(zip(saved.names, saved.shapes, strict=True))
    current_shapes = dict(zip(current.names, current.shapes, strict=True))
    problems = [f"missing in the model: {n}" for n in saved.names if n not in current_shapes]
    problems += [f"not in the checkpoint: {n}" for n in current.names if n not in saved_shapes]
    problems += [
        f"{n}: checkpoint {tuple(s)} vs model {tuple(current_shapes[n])}"
        for n, s in saved_shapes.items()
        if n in current_shapes and current_shapes[n] != s
    ]
    if not problems:
        problems = ["the tensors are the same but in a different order"]
    raise ValueError(
        f"the checkpoint (D = {saved.dim}) does not fit this model (D = {current.dim}): " + "; ".join(problems[:5])
        + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    )


# ------------------------------------------------------------------------------------------ peft export
def _save_adapter(model: BayesianLoRA, theta: torch.Tensor, folder: Path) -> None:
    if theta.shape != (model.dim,):
        raise ValueError(f"theta must have shape ({model.dim},), got {tuple(theta.shape)}")
    save = getattr(model.net, "save_pretrained", None)
    if save is None:
        raise TypeError(f"the model's network ({type(model.net).__name__}) is not a peft model with save_pretrained")
    with assigned(model.net, model.spec, theta):
        save(str(folder))


def export_peft_adapter(model: BayesianLoRA, theta: torch.Tensor, folder: str | os.PathLike[str]) -> Path:
    """Write particle θ (D,) as a standard peft adapter folder (LoRA factors and ``modules_to_save`` heads)
    that ``peft.PeftModel.from_pretrained(base_model, folder)`` loads unchanged.

    θ is copied into the peft model's trainable tensors, ``save_pretrained`` writes a temporary folder that
    then replaces ``folder``, and the model's own tensors are restored.
    """
    with atomic_folder(folder) as tmp:
        _save_adapter(model, theta, tmp)
    return Path(folder)


def export_particles(model: BayesianLoRA, posterior: ParticlePosterior, folder: str | os.PathLike[str]) -> list[Path]:
    """Export every particle μ_k of a :class:`ParticlePosterior` to ``folder/particle_k`` (one atomic folder).

    With σ > 0 each adapter holds the component mean μ_k.
    """
    if not isinstance(posterior, ParticlePosterior):
        raise TypeError(f"export_particles needs a ParticlePosterior, got {type(posterior).__name__}")
    names = [f"particle_{k}" for k in range(posterior.num_particles)]
    with atomic_folder(folder) as tmp:
        for name, theta in zip(names, posterior.particles, strict=True):
            _save_adapter(model, theta, tmp / name)
    return [Path(folder) / name for name in names]
