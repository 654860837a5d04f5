"""Resumable training: an atomic snapshot of everything the rest of a :func:`~pyro_ibdr.fit` run depends on.

A run continued from a snapshot ends with the same numbers as a run that was never interrupted, because
the snapshot holds, at an epoch boundary:

- the method's training state (:meth:`Method.state_dict <pyro_ibdr.methods.Method.state_dict>`: Pyro's param
  store, the optimiser's state, counters, λ, chains, generators);
- where the run stands (steps, epochs, the history so far, the wall time spent) and the posterior reached;
- the random number generators: torch (CPU and every CUDA device), Python's ``random``, NumPy's global
  generator, and the ``torch.Generator`` objects a data loader shuffles with (a ``DataLoader``'s
  ``generator`` and its sampler's), so the next epoch draws the same order of examples;
- a fingerprint of the run (method, its config, optimiser, seed, length, θ layout, N), so that a snapshot
  is never continued by a run with other settings.

The file holds only tensors and plain values and is read with ``torch.load(weights_only=True)``; it is
written atomically (a reader sees the previous snapshot or the new one, never a partial file).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions.constraints as constraints
import torch

from .checkpoint import check_plain
from .io import atomic_write

#: Marks a file as a pyro_ibdr training snapshot; the number changes when the layout does.
FORMAT = "pyro_ibdr.training_state"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ param store
def _encode_constraint(constraint: constraints.Constraint, param: str) -> str | list:
    """A constraint as plain values: its name in ``pyro.distributions.constraints`` (e.g. ``"positive"``), or
    ``["independent", base, n]`` for ``constraints.independent(base, n)``."""
    if isinstance(constraint, constraints.independent):
        return ["independent", _encode_constraint(constraint.base_constraint, param),
                constraint.reinterpreted_batch_ndims]
    if isinstance(constraint, type(constraints.real)):
        return "real"
    for name, value in vars(constraints).items():
        if value is constraint:
            return name
    raise ValueError(
        f"the parameter {param!r} has a constraint ({constraint}) that is not one of the named constraints in "
        "pyro.distributions.constraints; a method with such a parameter must save and restore it in its own "
        "state_dict/load_state_dict"
    )


def _decode_constraint(code: str | list) -> constraints.Constraint:
    if isinstance(code, list):
        _, base, ndims = code
        return constraints.independent(_decode_constraint(base), ndims)
    return getattr(constraints, code)


def param_store_state() -> dict[str, Any]:
    """Pyro's global param store as ``{"params": {name: unconstrained tensor}, "constraints": {name: code}}``."""
    state = pyro.get_param_store().get_state()
    return {
        "params": {name: value.detach().clone() for name, value in state["params"].items()},
        "constraints": {name: _encode_constraint(c, name) for name, c in state["constraints"].items()},
    }


def load_param_store_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put the parameters of :func:`param_store_state` back into Pyro's param store (on ``device``)."""
    params = {name: value.to(device).detach().requires_grad_(True) for name, value in state["params"].items()}
    named = {name: _decode_constraint(code) for name, code in state["constraints"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": named})


# ------------------------------------------------------------------------------------------ generators
def loader_generators(loader: Iterable) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects a loader draws its order from (none for a list of batches).

    Looks at ``loader.generator``, ``loader.sampler.generator`` and ``loader.batch_sampler.sampler.generator``
    (a ``DataLoader`` with ``shuffle=True, generator=g`` hands ``g`` to its ``RandomSampler``). A loader
    without a generator shuffles with torch's global generator, which :func:`rng_state` covers.
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [getattr(loader, "generator", None), getattr(sampler, "generator", None),
                  getattr(getattr(batch_sampler, "sampler", None), "generator", None)]
    found: list[torch.Generator] = []
    for generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators, Python's ``random``, NumPy's global generator and
    ``generators``."""
    version, mt_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt_state), gauss],
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what :func:`rng_state` captured; ``generators`` must be the same loader's generators, in order."""
    generators = list(generators)
    if len(generators) != len(state["generators"]):
        raise ValueError(
            f"the snapshot holds the state of {len(state['generators'])} data-loader generator(s) but this loader "
            f"has {len(generators)}; resume with a loader built like the interrupted run's"
        )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


# ----------------------------------------------------------------------------------------------- files
def fingerprint_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved → current"`` for every entry that differs (compared as JSON, so tuples equal lists)."""
    canonical = lambda value: json.dumps(value, sort_keys=True, default=str)  # noqa: E731
    return [f"{key}: {saved.get(key)!r} → {current.get(key)!r}" for key in sorted(set(saved) | set(current))
            if canonical(saved.get(key)) != canonical(current.get(key))]


def save_training_state(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write a snapshot (tensors and plain values only) atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    check_plain(payload, "training state")
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The snapshot at ``path`` (tensors on the CPU), or None when there is no file.

    :raises ValueError: when the file is damaged or is not a pyro_ibdr training snapshot.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise ValueError(f"{path} is not a readable training snapshot (damaged file?): {err}; delete it to start "
                         "the run from the beginning") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro_ibdr training snapshot (no {FORMAT!r} marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has snapshot format version {payload.get('format_version')}; this library reads "
                         f"{FORMAT_VERSION}")
    return payload
