"""Dropout switched on for Monte-Carlo dropout while every other layer keeps its mode.

``net.train()`` would also put BatchNorm layers in training mode (batch statistics, and updates of the frozen
backbone's running averages) and switch any other mode-dependent layer; MC dropout samples dropout masks only
(Gal & Ghahramani, 2016).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

#: The modules whose masks MC dropout samples: torch's dropout layers (peft's ``lora_dropout`` is ``nn.Dropout``).
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _samples_in_training_mode(module: nn.Module) -> bool:
    """A dropout module, or a layer of peft's PVeRA (``peft.tuners.pvera``), which draws its adapter noise only in
    training mode (checked by module name, so that importing this module does not import peft)."""
    return isinstance(module, DROPOUT_TYPES) or type(module).__module__.startswith("peft.tuners.pvera")


def has_dropout(net: nn.Module) -> bool:
    """Whether ``net`` holds a dropout module with rate p > 0 (e.g. peft ``lora_dropout`` or the backbone's)."""
    return any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in net.modules())


@contextmanager
def dropout_mode(net: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, the dropout modules of ``net`` (:data:`DROPOUT_TYPES`) and peft PVeRA layers are in
    training mode when ``enabled``; no other module changes mode. Every such module's own mode is restored
    afterwards.

    Layers that read their own ``training`` flag to drop values (e.g. timm's fused attention, whose dropout rate
    is ``attn_drop.p if self.training``) are not dropout modules and stay as they are.
    """
    modules = [m for m in net.modules() if _samples_in_training_mode(m)] if enabled else []
    modes = [m.training for m in modules]
    for module in modules:
        module.training = True
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.training = mode
