"""A forward pass batched over any leading particle/sample dimensions of θ.

For θ of shape (*lead, D) the network is evaluated once per row of θ on the same inputs x, giving
logits of shape (*lead, B, C). The frozen backbone weights stay unbatched, so under ``torch.vmap`` every
frozen matmul becomes one large GEMM over all particles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .params import ParamSpec

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


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


def call_with_params(net: nn.Module, params: Mapping[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """Logits (B, C) of ``net`` with its adapter tensors replaced by ``params``."""
    if isinstance(inputs, Mapping):
        out = functional_call(net, dict(params), args=(), kwargs=dict(inputs), strict=False)
    else:
        out = functional_call(net, dict(params), args=(inputs,), strict=False)
    return as_logits(out)


class BatchedForward:
    """Evaluate ``net`` for every row of θ: (*lead, D) → logits (*lead, B, C).

    ``vectorize=True`` uses ``torch.vmap`` (independent dropout per particle); ``False`` is a Python
    loop over the rows (also the fallback for modules that vmap cannot trace); ``None`` picks vmap for θ on
    a GPU and the loop on a CPU, where vmap measured slower than the loop (``benchmarks/ibdr_step.py``:
    1.21× for ViT-S/16 at 112 px, K = 4, B = 16 on 2 cores; fused attention has no batching rule there).
    """

    def __init__(self, net: nn.Module, spec: ParamSpec, *, vectorize: bool | None = None) -> None:
        self.net = net
        self.spec = spec
        self.vectorize = vectorize

    def _single(self, theta: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return call_with_params(self.net, self.spec.unflatten(theta), inputs)

    def __call__(self, theta: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        if theta.dim() == 1:
            return self._single(theta, inputs)
        lead = theta.shape[:-1]
        rows = theta.reshape(-1, theta.shape[-1])
        if self.vectorize or (self.vectorize is None and rows.is_cuda):
            logits = torch.vmap(self._single, in_dims=(0, None), randomness="different")(rows, inputs)
        else:
            logits = torch.stack([self._single(row, inputs) for row in rows])
        return logits.reshape(*lead, *logits.shape[1:])
