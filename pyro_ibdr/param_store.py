"""Parameters in Pyro's global param store that refuse a stored value of another shape.

Pyro's param store is global and keyed by name: a guide built after another one of the same name reads the
first guide's tensors (Pyro's semantics, kept when the shapes agree). A stored tensor of another shape (say
K = 4 particles left by an earlier guide when this one has K = 2) would otherwise be used silently or fail
later with an unrelated index or reshape error.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.distributions import constraints


def check_param_shape(name: str, found: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """:raises ValueError: naming the parameter, both shapes and the two fixes, when ``found != shape``."""
    if tuple(found) != tuple(shape):
        raise ValueError(
            f"Pyro's param store holds {name!r} with shape {tuple(found)}, but this guide needs {tuple(shape)}: a "
            "guide of the same name ran earlier in this process. Call pyro.clear_param_store() before building the "
            "new guide (fit does), or give the new guide its own name where it takes one"
        )


def shaped_param(
    name: str,
    init: Callable[[], torch.Tensor],
    shape: tuple[int, ...],
    constraint: constraints.Constraint = constraints.real,
) -> torch.Tensor:
    """``pyro.param(name, init, constraint=constraint)``, checked to have ``shape`` (:func:`check_param_shape`)."""
    value = pyro.param(name, init, constraint=constraint)
    check_param_shape(name, value.shape, shape)
    return value


def check_stored_param(name: str, shape: tuple[int, ...]) -> None:
    """For guides whose parameters Pyro creates (autoguides, ``SVGD``): a stored ``name`` must have ``shape``."""
    store = pyro.get_param_store()
    if name in store:
        check_param_shape(name, store[name].shape, shape)
