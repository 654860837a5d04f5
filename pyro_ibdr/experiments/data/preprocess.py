"""Deterministic image preprocessing taken from a backbone's own timm data configuration.

A timm checkpoint states how its inputs were prepared (``pretrained_cfg``: input size, interpolation, mean,
std, crop fraction and crop mode); :func:`timm.data.resolve_data_config` reads it and
:func:`timm.data.create_transform` builds the evaluation transform. :class:`ImagePreprocess` holds that
configuration and splits the transform in two:

- ``geometric``: PIL image -> ``uint8`` tensor ``(3, H, W)``: timm's eval resize and centre crop (no
  normalisation). It is deterministic, so a dataset can decode and cache it once
  (:class:`~pyro_ibdr.experiments.data.vtab.PreloadedDataset`);
- ``normalize``: ``uint8`` -> ``float32``: scale to [0, 1], then ``(x - mean) / std`` per channel.

``normalize(geometric(image))`` equals timm's ``create_transform(..., is_training=False)(image)``.

Two protocols:

- ``"model"``: the backbone's configuration as it is (e.g. ViT-B/16 AugReg: bicubic, resize to 248 and crop
  224, mean = std = 0.5; DINOv2: bicubic, no crop, ImageNet mean/std; CLIP: CLIP's mean/std);
- ``"vtab"``: the VTAB-1k protocol of the IBDR authors' code (NOAH): the whole image squashed to the input
  size (``crop_mode="squash"``, ``crop_pct=1``, no crop), with the backbone's interpolation, mean and std.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torchvision.transforms import v2

Protocol = Literal["model", "vtab"]
PROTOCOLS = ("model", "vtab")


@dataclass(frozen=True)
class ImagePreprocess:
    """One timm data configuration (the keys of ``timm.data.resolve_data_config``).

    The defaults are the VTAB-1k protocol for the ImageNet-21k ViT-B/16: 224 px squashed, bicubic,
    mean = std = 0.5 (images in [-1, 1]).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    def __post_init__(self) -> None:
        channels, height, width = self.input_size
        if channels != 3 or height < 1 or width < 1:
            raise ValueError(f"input_size must be (3, H, W) with H, W >= 1, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean {self.mean}, std {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_timm(cls, model_name: str, *, img_size: int | None = None,
                  protocol: Protocol = "model") -> ImagePreprocess:
        """The eval preprocessing of timm model ``model_name`` (``"arch"`` or ``"arch.tag"``; no network).

        ``img_size`` replaces the checkpoint's input size (the model's position embeddings are resampled to
        it); ``protocol`` is ``"model"`` or ``"vtab"`` (see the module docstring). Raises ``ValueError`` for a
        name timm has no pretrained configuration for, or an unknown protocol.
        """
        import timm
        from timm.data import resolve_data_config

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is None:
            raise ValueError(f"timm has no pretrained configuration for {model_name!r} to take the preprocessing from")
        args: dict[str, Any] = {}
        if img_size is not None:
            args["input_size"] = (3, img_size, img_size)
        if protocol == "vtab":
            args.update(crop_pct=1.0, crop_mode="squash")
        config = resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict())
        return cls(input_size=tuple(config["input_size"]), interpolation=config["interpolation"],
                   mean=tuple(config["mean"]), std=tuple(config["std"]), crop_pct=float(config["crop_pct"]),
                   crop_mode=config["crop_mode"])

    @property
    def img_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def geometric(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> ``uint8`` tensor ``(3, H, W)``: timm's eval resize and crop, nothing else."""
        from timm.data import create_transform

        return create_transform(self.input_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode,
                                normalize=False)

    def normalize(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``uint8`` image tensor -> ``float32``: scale to [0, 1], then ``(x - mean) / std`` per channel."""
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready configuration (what a results file records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
