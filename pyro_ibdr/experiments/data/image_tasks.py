"""Image-classification tasks from a folder: a VTAB-1k task, a user's own task in that layout, or images
stored one folder per class.

A task folder is read in the first layout that applies:

1. **VTAB-1k file lists** (:mod:`pyro_ibdr.experiments.data.vtab`): ``train800.txt``, ``val200.txt``,
   ``train800val200.txt``, ``test.txt``, each line ``relative/path <integer label>``. A subset is enough:
   ``train800val200`` missing is read as ``train800`` followed by ``val200``; a split whose list (or lists)
   is missing is an error naming the files, raised only if that split is used.
2. **Class-per-folder with split folders** (torchvision ``ImageFolder`` layout below each split):
   ``train/<class>/<image>``, ``test/<class>/<image>`` and optionally ``val/<class>/<image>``. The classes are
   the sub-folders of ``train/`` in sorted order; a class folder of ``val/`` or ``test/`` that ``train/`` lacks
   is an error. Splits: ``train800val200`` = train + val, ``train800`` = train, ``val200`` = val, ``test`` = test.
   Without ``val/``, ``val200`` is a seeded :data:`VAL_FRACTION` of every class of train and ``train800`` the
   rest (``train800val200`` is then all of train).
3. **Plain class-per-folder**: ``<class>/<image>``. A seeded split per class: :data:`TEST_FRACTION` of each
   class is ``test``; of the rest, :data:`VAL_FRACTION` is ``val200`` and the remainder ``train800``.

Seeded splits use :data:`SPLIT_SEED`, never the training seed, so every run of a task sees the same test set.
Images are files with torchvision's ``IMG_EXTENSIONS``. The split names are VTAB's roles: train800val200 trains
the final model, train800 -> val200 selects hyper-parameters, test is used once.

The number of classes is the VTAB table's for the 19 VTAB-1k tasks (and the offline ``fashion_mnist`` and
``cifar10``); for any other folder it is read from the data (the number of class folders, or the largest label + 1
over the lists in use), unless given. Every label must be below it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyro_ibdr.experiments.data import vtab

TEST_FRACTION = 0.2
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SPLIT_FOLDERS = ("train", "val", "test")
Samples = list[tuple[str, int]]


@dataclass(frozen=True)
class ImageTask:
    """The splits of one task folder, read and checked; images are decoded later by the datasets.

    :ivar name: the VTAB name for a known task, else the folder name.
    :ivar root: the task folder; sample paths are relative to it.
    :ivar layout: ``"vtab_lists"``, ``"class_folders_split"`` or ``"class_folders"``.
    :ivar num_classes: size of the classifier head.
    :ivar splits: split name -> ``[(relative image path, label), ...]``, never empty.
    :ivar class_names: the class folder names in label order (class-folder layouts only).
    """

    name: str
    root: Path
    layout: str
    num_classes: int
    splits: dict[str, Samples] = field(repr=False)
    class_names: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for a results file: layout, classes and split sizes."""
        return {"name": self.name, "folder": str(self.root), "layout": self.layout, "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None,
                "split_sizes": {split: len(samples) for split, samples in self.splits.items()}}


def find_task_dir(data_dir: str | Path, name: str) -> Path:
    """The folder of task ``name`` under ``data_dir``: a VTAB task by its name or an alias, else ``data_dir/name``."""
    data_dir = Path(data_dir)
    try:
        return vtab.resolve_task_dir(data_dir, name)
    except ValueError:  # not a VTAB task name: an own task folder
        if (data_dir / name).is_dir():
            return data_dir / name
        raise FileNotFoundError(
            f"no task folder {name!r} under {data_dir}: it is not one of the known tasks "
            f"({', '.join(sorted(vtab.TASKS))}), and an own task needs a folder of that name (VTAB file lists "
            "or class-per-folder images)") from None


def _seeded_part(samples: Samples, fraction: float) -> tuple[Samples, Samples]:
    """(part, rest): a seeded ``fraction`` of every class (at least one image of a class with 2 or more)."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    part, rest = [], []
    for label in sorted(by_class):
        items = by_class[label]
        random.Random(f"{SPLIT_SEED}-{label}").shuffle(items)
        n = min(max(round(fraction * len(items)), 1), len(items) - 1) if len(items) > 1 else 0
        part += items[:n]
        rest += items[n:]
    return part, rest


def _class_folder(folder: Path, root: Path, classes: Sequence[str] | None = None) -> tuple[list[str], Samples]:
    """(class names, samples with paths relative to ``root``) of one ``<class>/<image>`` folder; ``classes``
    fixes the label order (torchvision's ``find_classes`` and ``make_dataset``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    found, _ = find_classes(folder)
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{folder} has class folders {unknown} that the training folder lacks")
    index = {name: i for i, name in enumerate(classes)}
    present = {name: index[name] for name in found}
    try:
        items = make_dataset(str(folder), present, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise ValueError(f"{folder}: {err}") from err
    return list(classes), [(Path(path).relative_to(root).as_posix(), label) for path, label in items]


def _class_folder_splits(root: Path) -> tuple[str, list[str], dict[str, Samples]]:
    if (root / "train").is_dir():
        if not (root / "test").is_dir():
            raise FileNotFoundError(f"{root} has a train/ folder but no test/ folder")
        classes, train = _class_folder(root / "train", root)
        _, test = _class_folder(root / "test", root, classes)
        if (root / "val").is_dir():
            _, val = _class_folder(root / "val", root, classes)
            train800 = train
        else:
            val, train800 = _seeded_part(train, VAL_FRACTION)
        splits = {"train800": train800, "val200": val, "train800val200": train800 + val, "test": test}
        return "class_folders_split", classes, splits
    classes, samples = _class_folder(root, root)
    test, rest = _seeded_part(samples, TEST_FRACTION)
    val, train800 = _seeded_part(rest, VAL_FRACTION)
    return "class_folders", classes, {"train800": train800, "val200": val, "train800val200": rest, "test": test}


def _list_split(root: Path, split: str) -> Samples:
    if (root / f"{split}.txt").is_file():
        return vtab.read_file_list(root / f"{split}.txt")
    if split == "train800val200" and all((root / f"{s}.txt").is_file() for s in ("train800", "val200")):
        return vtab.read_file_list(root / "train800.txt") + vtab.read_file_list(root / "val200.txt")
    raise FileNotFoundError(f"{root / f'{split}.txt'}: file list not found"
                            + (" (nor train800.txt and val200.txt)" if split == "train800val200" else ""))


def open_task(data_dir: str | Path, name: str, splits: Sequence[str], *,
              num_classes: int | None = None) -> ImageTask:
    """Read and check the ``splits`` of task ``name`` under ``data_dir`` (layouts in the module docstring).

    ``num_classes`` overrides the number read from the data (a known VTAB task must agree with its table).
    Raises ``FileNotFoundError`` for a missing folder or file list, ``ValueError`` for an unknown split, an
    empty split (naming it and why), a label outside ``[0, num_classes)``, or a folder in no known layout.
    """
    unknown = [s for s in splits if s not in vtab.SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; use {vtab.SPLITS}")
    root = find_task_dir(data_dir, name)
    try:
        spec: vtab.VTABTask | None = vtab.get_task(name)
    except ValueError:
        spec = None
    if spec is not None and num_classes is not None and num_classes != spec.num_classes:
        raise ValueError(f"task {spec.name!r} has {spec.num_classes} classes, not num_classes={num_classes}")
    class_names: list[str] | None = None
    if any((root / f"{s}.txt").is_file() for s in vtab.SPLITS):
        layout, read = "vtab_lists", {split: _list_split(root, split) for split in splits}
    elif any(entry.is_dir() for entry in root.iterdir()):
        layout, class_names, every = _class_folder_splits(root)
        read = {split: every[split] for split in splits}
    else:
        raise ValueError(f"{root} holds neither VTAB file lists ({', '.join(f'{s}.txt' for s in vtab.SPLITS)}) "
                         "nor class folders (<class>/<image>, or train/<class>/<image> and test/<class>/<image>)")
    for split, samples in read.items():
        if not samples:
            raise ValueError(f"split {split!r} of task {name!r} is empty: {root} has no images for it"
                             + (" (too few images per class for a seeded split)" if layout != "vtab_lists" else ""))
    largest = max(label for samples in read.values() for _, label in samples)
    if spec is not None:
        classes = spec.num_classes
    elif num_classes is not None:
        classes = num_classes
    else:
        classes = len(class_names) if class_names else largest + 1
    if num_classes is not None and class_names and num_classes < len(class_names):
        raise ValueError(f"num_classes={num_classes} but {root} has {len(class_names)} class folders")
    for split, samples in read.items():
        bad = [(p, y) for p, y in samples if y >= classes]
        if bad:
            raise ValueError(f"split {split!r} of task {name!r}: labels must be < {classes}; found e.g. {bad[0]}")
    return ImageTask(spec.name if spec else name, root, layout, classes, read,
                     tuple(class_names) if class_names else None)
