"""Tiny frozen networks wrapped with peft LoRA."""

from __future__ import annotations

import peft
import timm
import torch
from torch import nn


class TinyMLP(nn.Module):
    """x (B, F) → logits (B, C): two hidden layers (LoRA targets), dropout, a linear head."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = self.drop(torch.relu(self.fc2(h)))
        return self.head(h)


def lora_mlp(seed: int = 0, rank: int = 4, **kwargs) -> nn.Module:
    """A TinyMLP with random frozen weights and LoRA on fc1, fc2; the head is trained too."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    return peft.get_peft_model(TinyMLP(**kwargs), config)


def lora_vit(seed: int = 0, num_classes: int = 10, img_size: int = 8) -> nn.Module:
    """A 1-block timm ViT (dim 32, 4×4 patches, mean-pooled tokens) built from a config, LoRA on qkv, head trained.

    Random frozen ViTs lose most of the input in deeper stacks; one block keeps the features informative.
    """
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=4, embed_dim=32, depth=1,
        num_heads=2, num_classes=num_classes, in_chans=1, global_pool="avg",
    )
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(vit, config)


def plain_mlp(seed: int = 0, **kwargs) -> nn.Module:
    """A TinyMLP with random weights, all trainable, without adapters (for full fine-tuning)."""
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)


def pvera_mlp(seed: int = 0, rank: int = 8, targets: tuple[str, ...] = ("fc1", "fc2"), head: bool = True,
              **kwargs) -> nn.Module:
    """A TinyMLP with random frozen weights and peft's PVeRA on ``targets``; the head is trained too when ``head``."""
    torch.manual_seed(seed)
    config = peft.PveraConfig(r=rank, target_modules=list(targets), modules_to_save=["head"] if head else None)
    return peft.get_peft_model(TinyMLP(**kwargs), config)
