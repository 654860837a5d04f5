"""VTAB-1k tasks stored as image folders with file lists (the NOAH/SSF layout).

``<data_dir>/<task>/`` holds ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``; each
line is ``relative/path/to/image <integer label>`` with paths relative to the task folder. Training uses
train800val200 (1,000 images), hyper-parameter search train800 -> val200, and the test split is used once.

Preprocessing is an :class:`~pyro_ibdr.experiments.data.preprocess.ImagePreprocess` (a timm data
configuration, normally the backbone's own); the default is the VTAB-1k protocol for the ImageNet-21k
ViT-B/16: squash to 224 x 224 (bicubic, no crop), scale to [0, 1], mean = std = 0.5 (images in [-1, 1]).
Other task folders (own tasks, class-per-folder images) are read by
:mod:`pyro_ibdr.experiments.data.image_tasks` into an :class:`ImageListDataset`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pyro_ibdr.experiments.data.preprocess import ImagePreprocess
from pyro_ibdr.experiments.data.textfile import read_lines

_DIGITS = re.compile(r"[0-9]+")
SPLITS = ("train800", "val200", "train800val200", "test")
Split = Literal["train800", "val200", "train800val200", "test"]


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task: canonical name, number of classes and the folder names other projects use."""

    name: str
    num_classes: int
    aliases: tuple[str, ...] = ()


TASKS: dict[str, VTABTask] = {
    t.name: t
    for t in (
        VTABTask("cifar100", 100, ("cifar", "cifar-100", "cifar_100")),
        VTABTask("caltech101", 102, ("caltech", "caltech-101")),
        VTABTask("dtd", 47),
        VTABTask("oxford_flowers102", 102, ("flowers102", "oxford_flowers", "flowers", "oxford-flowers102")),
        VTABTask("oxford_iiit_pet", 37, ("pets", "oxford_pet", "oxford-iiit-pet", "pet")),
        VTABTask("svhn", 10),
        VTABTask("sun397", 397, ("sun",)),
        VTABTask("patch_camelyon", 2, ("camelyon", "pcam", "patch-camelyon")),
        VTABTask("eurosat", 10),
        VTABTask("resisc45", 45, ("resisc",)),
        VTABTask("diabetic_retinopathy", 5, ("retinopathy", "diabetic-retinopathy")),
        VTABTask("clevr_count", 8, ("clevr-count",)),
        VTABTask("clevr_dist", 6, ("clevr-dist", "clevr_distance", "clevr-distance")),
        VTABTask("dmlab", 6),
        VTABTask("kitti", 4, ("kitti_dist", "kitti-dist")),
        VTABTask("dsprites_loc", 16, ("dsprites-loc", "dsprites_location", "dsprites-location")),
        VTABTask("dsprites_ori", 16, ("dsprites-ori", "dsprites_orientation", "dsprites-orientation")),
        VTABTask("smallnorb_azi", 18, ("smallnorb-azi", "smallnorb_azimuth", "smallnorb-azimuth")),
        VTABTask("smallnorb_ele", 9, ("smallnorb-ele", "smallnorb_elevation", "smallnorb-elevation")),
        # Not part of VTAB-1k: the offline tasks (experiments.assets): Fashion-MNIST (the default) and CIFAR-10.
        VTABTask("fashion_mnist", 10, ("fashion-mnist", "fmnist")),
        VTABTask("cifar10", 10, ("cifar-10", "cifar_10")),
    )
}


def get_task(task: str) -> VTABTask:
    """Look a task up by canonical name or alias (case-insensitive); the error lists the known tasks."""
    key = task.strip().lower()
    for spec in TASKS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"unknown VTAB task {task!r}; known tasks: {', '.join(sorted(TASKS))}")


def resolve_task_dir(data_dir: str | Path, task: str) -> Path:
    """The folder of ``task`` under ``data_dir``, trying its canonical name and then each alias."""
    data_dir = Path(data_dir)
    spec = get_task(task)
    candidates = [task, spec.name, *spec.aliases]
    for name in dict.fromkeys(candidates):
        if (data_dir / name).is_dir():
            return data_dir / name
    missing = "" if data_dir.is_dir() else " (that VTAB data folder does not exist)"
    raise FileNotFoundError(
        f"no folder for task {spec.name!r} under {data_dir}{missing}; tried {list(dict.fromkeys(candidates))}"
    )


def read_file_list(path: str | Path) -> list[tuple[str, int]]:
    """Parse a VTAB file list: one ``relative/path <integer label>`` per line (blank lines skipped).

    The path may contain spaces; the label is the last whitespace-separated field, written in ASCII digits.
    Whitespace (spaces, tabs) around the path and the label is ignored; the file is read by
    :func:`~pyro_ibdr.experiments.data.textfile.read_lines` (UTF-8 with or without a byte-order mark, UTF-16/32
    with one; ``\n``, ``\r\n`` or ``\r`` line endings). Errors name the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file list not found: {path}")
    entries = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<image path> <label>', got {line!r}")
        label = parts[1]
        if not _DIGITS.fullmatch(label.removeprefix("-")):  # int() would also take '+1', '1_000' and '١'
            raise ValueError(f"{path}:{number}: label {label!r} is not an integer")
        if label.startswith("-"):
            raise ValueError(f"{path}:{number}: negative label {label}")
        entries.append((parts[0].strip(), int(label)))
    if not entries:
        raise ValueError(f"file list {path} is empty")
    return entries


#: Pillow modes of 16-bit grey levels; Pillow also opens some 16-bit files (PGM, TIFF) as 32-bit ``I``.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image, source: str | Path) -> Image.Image:
    """The 8-bit RGB picture of an image in any Pillow mode.

    - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and ``I`` with values in [0, 65535]): each level v
      becomes round(v / 257), so 0 ↦ 0 and 65535 ↦ 255 (Pillow's own conversion clips at 255: a 16-bit
      photo would read as almost pure white).
    - Alpha is dropped and the stored colour kept (``LA``, ``RGBA``, ``PA``, palette transparency), as the
      torchvision and timm loaders do; premultiplied ``La`` / ``RGBa`` are un-premultiplied first.
    - ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion. 16-bit RGB(A)
      PNGs are already opened by Pillow as 8-bit ``RGB``/``RGBA`` (the high byte of each sample).

    :param source: the file the image came from, for error messages.
    :raises ValueError: naming ``source`` and the mode for 32-bit float (``F``) images, which have no fixed
        range of values, for ``I`` images with values outside [0, 65535], and for modes Pillow cannot convert.
    """
    mode = image.mode
    if mode == "F":
        raise ValueError(
            f"{source}: image mode 'F' (32-bit float pixels) has no fixed range of values; save the images as 8- or "
            "16-bit PNG/JPEG/TIFF"
        )
    if mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.int64)
        if levels.size and (levels.min() < 0 or levels.max() > 65535):
            raise ValueError(
                f"{source}: image mode {mode!r} holds values in [{levels.min()}, {levels.max()}], outside the 16-bit "
                "range [0, 65535] that is read as grey levels; save the images as 8- or 16-bit PNG/TIFF"
            )
        return Image.fromarray(np.rint(levels / 257).astype(np.uint8)).convert("RGB")
    if mode == "La":  # Pillow converts premultiplied grey only to LA
        image = image.convert("LA")
    elif mode == "P" and "transparency" in image.info:  # Pillow warns on P -> RGB with a transparency table
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"{source}: cannot convert image mode {mode!r} to RGB: {err}") from err


def load_image(path: Path) -> Image.Image:
    """Open an image file as its 8-bit RGB picture (:func:`to_rgb8`, any Pillow mode); a missing, unreadable or
    unsupported file raises an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"image listed in the file list not found: {path}")
    try:
        with Image.open(path) as image:
            return to_rgb8(image, path)
    except OSError as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


class ImageListDataset(Dataset):
    """Images listed as ``(path relative to root, label)``; items are ``(image tensor (3, H, W), label)``.

    Args:
        root: the folder the paths are relative to.
        samples: ``[(relative path, label), ...]``; every label must be in ``[0, num_classes)``.
        num_classes: classes of the task.
        preprocess: deterministic preprocessing (default: :class:`ImagePreprocess`'s VTAB-1k ViT-B/16 protocol).
        transform: replaces the preprocessing (PIL image -> tensor) when given, e.g. for augmentation.
    """

    def __init__(self, root: str | Path, samples: Sequence[tuple[str, int]], num_classes: int, *,
                 preprocess: ImagePreprocess | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        bad = [(p, y) for p, y in samples if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"{root}: labels must be < {num_classes} (and >= 0); found e.g. {bad[0]}")
        self.root = Path(root)
        self.samples = list(samples)
        self.num_classes = num_classes
        self.preprocess = preprocess or ImagePreprocess()
        self.geometric = self.preprocess.geometric()
        self.normalize = self.preprocess.normalize()
        self.transform = transform

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        relative, label = self.samples[index]
        image = load_image(self.root / relative)
        if self.transform is not None:
            return self.transform(image), label
        return self.normalize(self.geometric(image)), label

    def decode_all(self) -> torch.Tensor:
        """Every image, resized and cropped, as one uint8 tensor (N, 3, H, W)."""
        return torch.stack([self.geometric(load_image(self.root / p)) for p, _ in self.samples])


class VTABDataset(ImageListDataset):
    """One split of a VTAB-1k task folder (a task of :data:`TASKS`, found by name or alias).

    Args:
        data_dir: the VTAB root (task folders below it).
        task: task name or alias (see :data:`TASKS`).
        split: one of ``"train800"``, ``"val200"``, ``"train800val200"``, ``"test"``.
        preprocess, transform: as in :class:`ImageListDataset`.

    Every label is checked against the task's number of classes when the list is read.
    """

    def __init__(self, data_dir: str | Path, task: str, split: Split = "train800val200", *,
                 preprocess: ImagePreprocess | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.spec = get_task(task)
        self.split = split
        root = resolve_task_dir(data_dir, task)
        super().__init__(root, read_file_list(root / f"{split}.txt"), self.spec.num_classes, preprocess=preprocess,
                         transform=transform)


class PreloadedDataset(Dataset):
    """A split decoded once into uint8 memory; items are normalised on access.

    On few CPU cores decoding and resizing JPEG/PNG files every epoch costs more than small models' steps.
    Memory is N * 3 * H * W bytes (1,000 images at 224 px: 150 MB). Only the deterministic part of the
    preprocessing (resize and crop, :meth:`ImagePreprocess.geometric`) is cached; a dataset with a custom
    ``transform`` is refused. ``augment`` (e.g.
    :func:`randaugment_flip`) is applied to the cached uint8 image on every access, before normalisation.
    """

    def __init__(self, dataset: ImageListDataset,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if dataset.transform is not None:
            raise ValueError("cannot preload a dataset with a custom transform (it may be random per epoch)")
        self.images = dataset.decode_all()
        self.targets = dataset.targets
        self.normalize = dataset.normalize
        self.num_classes = dataset.num_classes
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image), int(self.targets[index])


def randaugment_flip() -> Callable[[torch.Tensor], torch.Tensor]:
    """Random horizontal flip then RandAugment (2 ops, magnitude 9) on uint8 images: the authors' augmentation."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)])
