"""A forward pass batched over any leading particle/sample dimensions of θ.

For θ of shape (*lead, D) the network is evaluated once per row of θ on the same inputs x, giving
logits of shape (*lead, B, C). Three ways to do it, behind one interface (:class:`BatchedForward`):

- ``"fused"``: all rows in ONE pass over one copy of the frozen network, particles batched inside every
  LoRA layer (:mod:`pyro_ibdr.particle_lora`); the default wherever it applies.
- ``"vmap"``: ``torch.vmap`` over ``torch.func.functional_call``; the frozen weights stay unbatched.
- ``"loop"``: a Python loop over the rows with ``functional_call``; works for any module.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from .params import ParamSpec
from .particle_lora import FusedParticles, Unfusable

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Mode = Literal["fused", "vmap", "loop"]
_ALIASES: dict[Any, str] = {None: "auto", True: "vmap", False: "loop", "fused": "fused", "vmap": "vmap", "loop": "loop"}


class ParticleFallbackWarning(UserWarning):
    """The fused particle pass does not apply to a network: its particles run in a Python loop instead."""


def batch_size(inputs: Inputs) -> int:
    """B, the leading dimension of a tensor or of every tensor in a mapping (they must agree)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    sizes = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if not sizes:
        raise ValueError("inputs mapping holds no tensors")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"input tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def as_logits(output: Any) -> torch.Tensor:
    """The logits a network returned: the output itself, or its ``.logits`` (transformers' model outputs)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the network returned {type(output).__name__}; expected a tensor or an object with .logits")
    return logits


def _call(net: nn.Module, inputs: Inputs) -> Any:
    return net(**inputs) if isinstance(inputs, Mapping) else net(inputs)


def call_with_params(net: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """Logits (B, C) of ``net`` with its adapter tensors replaced by ``params``."""
    if isinstance(inputs, Mapping):
        out = functional_call(net, dict(params), args=(), kwargs=dict(inputs), strict=False)
    else:
        out = functional_call(net, dict(params), args=(inputs,), strict=False)
    return as_logits(out)


class BatchedForward:
    """Evaluate ``net`` for every row of θ: (*lead, D) → logits (*lead, B, C); θ of shape (D,) gives (B, C).

    θ is read in its own dtype (e.g. float32 master weights) and each of its tensors is cast to the dtype of
    the parameter it replaces (e.g. a network held in bfloat16); gradients flow back to θ in θ's dtype. For a
    network held in float16/bfloat16 (its first floating parameter), floating-point inputs are cast to it.

    :param vectorize: ``"fused"`` (raise :class:`~pyro_ibdr.particle_lora.Unfusable` where it does not
        apply), ``"vmap"`` (or True), ``"loop"`` (or False), or None: the fused pass, falling back to the loop
        with a one-time :class:`ParticleFallbackWarning` naming why (a network it cannot batch, or a first
        call that fails fused but runs in the loop). Measured on 2 CPU cores, ``benchmarks/ibdr_step.py``.
    """

    def __init__(self, net: nn.Module, spec: ParamSpec, *, vectorize: Mode | bool | None = None) -> None:
        if vectorize not in _ALIASES:
            raise ValueError(f"vectorize must be 'fused', 'vmap', 'loop', True, False or None, got {vectorize!r}")
        self.net = net
        self.spec = spec
        self.requested = _ALIASES[vectorize]
        params = dict(net.named_parameters())
        self.dtypes = {name: params[name].dtype for name in spec.names if name in params}
        held = next((p.dtype for p in params.values() if p.is_floating_point()), None)
        self.input_dtype = held if held in (torch.float16, torch.bfloat16) else None
        self.fused: FusedParticles | None = None
        self.fallback_reason: str | None = None
        self._fused_verified = False
        if self.requested in ("fused", "auto"):
            try:
                self.fused = FusedParticles(net, spec.names)
            except Unfusable as error:
                if self.requested == "fused":
                    raise
                self._fall_back(str(error))

    @property
    def mode(self) -> Mode:
        """The way rows are evaluated now: ``"fused"``, ``"vmap"`` or ``"loop"``."""
        if self.fused is not None:
            return "fused"
        return "vmap" if self.requested == "vmap" else "loop"

    def _fall_back(self, reason: str) -> None:
        self.fused, self.fallback_reason = None, reason
        warnings.warn(f"the fused particle pass does not apply: {reason}; particles run in a Python loop instead",
                      ParticleFallbackWarning, stacklevel=3)

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ (*lead, D) as ``{name: (*lead, *shape)}``, each cast to its parameter's dtype."""
        views = self.spec.unflatten(theta)
        return {n: v if self.dtypes.get(n, v.dtype) == v.dtype else v.to(self.dtypes[n]) for n, v in views.items()}

    def cast_inputs(self, inputs: Inputs) -> Inputs:
        """Floating-point inputs in the dtype of a network held in float16/bfloat16 (others unchanged)."""
        if self.input_dtype is None:
            return inputs
        if isinstance(inputs, Mapping):
            return {k: self.cast_inputs(v) for k, v in inputs.items()}
        return inputs.to(self.input_dtype) if inputs.is_floating_point() else inputs

    def _single(self, theta: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return call_with_params(self.net, self.params(theta), inputs)

    def _loop(self, rows: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return torch.stack([self._single(row, inputs) for row in rows])

    def _fused(self, rows: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        num_rows, k = batch_size(inputs), rows.shape[0]
        logits = as_logits(self.fused(self.params(rows), inputs, num_rows, lambda x: _call(self.net, x)))
        if logits.shape[0] != k * num_rows:
            raise Unfusable(f"the network returned {logits.shape[0]} rows for {k} particles × {num_rows} examples")
        return logits.reshape(k, num_rows, *logits.shape[1:])

    def _rows(self, rows: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        if self.fused is None:
            if self.mode == "vmap":
                return torch.vmap(self._single, in_dims=(0, None), randomness="different")(rows, inputs)
            return self._loop(rows, inputs)
        try:
            logits = self._fused(rows, inputs)
        except torch.OutOfMemoryError:
            raise
        except Unfusable as error:
            if self.requested == "fused":
                raise
            self._fall_back(str(error))
            return self._loop(rows, inputs)
        except (RuntimeError, IndexError, ValueError) as error:
            if self.requested == "fused" or self._fused_verified:
                raise
            logits = self._loop(rows, inputs)  # a bad input raises here too, with the loop's own message
            self._fall_back(f"its first call failed ({type(error).__name__}: {error})")
            return logits
        self._fused_verified = True
        return logits

    def __call__(self, theta: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        inputs = self.cast_inputs(inputs)
        if theta.dim() == 1:
            if self.fused is None:
                return self._single(theta, inputs)
            return self._rows(theta.unsqueeze(0), inputs)[0]
        lead = theta.shape[:-1]
        logits = self._rows(theta.reshape(-1, theta.shape[-1]), inputs)
        return logits.reshape(*lead, *logits.shape[1:])
