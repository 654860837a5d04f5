"""A flat view of a module's trainable adapter tensors: θ ∈ R^D ↔ named tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ParamFilter = Callable[[str, nn.Parameter], bool]


def is_lora_factor(name: str) -> bool:
    """Whether a parameter name is a peft LoRA factor (``lora_A``, ``lora_B``, ``lora_embedding_*``, ...)."""
    return ".lora_" in name or name.startswith("lora_")


def _is_saved_module(name: str) -> bool:
    return ".modules_to_save." in name


def lora_only(name: str, param: nn.Parameter) -> bool:
    """Select only the LoRA factors (not the ``modules_to_save`` heads)."""
    return param.requires_grad and is_lora_factor(name)


def trainable(name: str, param: nn.Parameter) -> bool:
    """Select every tensor that peft left trainable: LoRA factors and ``modules_to_save`` copies."""
    return param.requires_grad


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the tensors that make up one flat vector θ.

    ``unflatten`` maps θ of shape ``(*lead, D)`` to ``{name: (*lead, *shape)}`` by views, so any leading
    particle or sample dimensions pass through untouched.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_module(cls, net: nn.Module, select: ParamFilter = trainable) -> ParamSpec:
        chosen = [(name, p) for name, p in net.named_parameters() if select(name, p)]
        if not chosen:
            raise ValueError(
                "the model has no trainable adapter tensors: wrap it with peft.get_peft_model(...) "
                "(LoRA target_modules must match some layers) or pass a different parameter filter"
            )
        return cls(tuple(n for n, _ in chosen), tuple(p.shape for _, p in chosen))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """D, the number of scalars in θ."""
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the named tensors (no leading dims) into θ of shape (D,)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"tensors missing from the flat parameter spec: {missing[:5]}")
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split θ of shape (*lead, D) into ``{name: (*lead, *shape)}``."""
        if theta.shape[-1] != self.dim:
            raise ValueError(f"theta has last dimension {theta.shape[-1]}, expected D = {self.dim}")
        lead = theta.shape[:-1]
        chunks = torch.split(theta, self.numels, dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def head_mask(self) -> torch.Tensor:
        """Boolean (D,): True for the entries of peft ``modules_to_save`` copies (the trained task heads)."""
        parts = [torch.full((k,), _is_saved_module(name)) for name, k in zip(self.names, self.numels, strict=True)]
        return torch.cat(parts)

    def lora_a_bounds(self) -> torch.Tensor:
        """Per-entry bound b = 1/sqrt(fan_in) of peft's default uniform init of ``A`` (0 elsewhere).

        peft draws A with kaiming_uniform(a=√5), i.e. U(−b, b) with b = √(6 / ((1 + 5) fan_in)).
        """
        parts = []
        for name, shape, k in zip(self.names, self.shapes, self.numels, strict=True):
            bound = 1.0 / math.sqrt(math.prod(shape[1:])) if ".lora_A." in name and len(shape) > 1 else 0.0
            parts.append(torch.full((k,), bound))
        return torch.cat(parts)


@contextmanager
def assigned(net: nn.Module, spec: ParamSpec, theta: torch.Tensor) -> Iterator[None]:
    """Copy θ (D,) into ``net``'s own tensors named by ``spec`` for the duration of the block, then restore them.

    For code that calls ``net`` itself rather than through :class:`~pyro_ibdr.functional.BatchedForward`
    (peft's ``save_pretrained``, laplace-torch). The copies are in place, so references to the parameters stay valid.
    """
    params = dict(net.named_parameters())
    values = spec.unflatten(theta.detach())
    originals = {name: params[name].detach().clone() for name in spec.names}
    try:
        with torch.no_grad():
            for name in spec.names:
                params[name].copy_(values[name])
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)
