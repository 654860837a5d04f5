"""Write an offline image task as a VTAB-1k-format folder, once and atomically.

The folder follows the VTAB-1k file-list convention::

    <root>/<task>/images/<name>.png            the images (PNG bytes)
    <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt
                                               lines "images/<name>.png <label>"
    <root>/<task>/.complete.json               the settings, written last

It is built in a temporary sibling and renamed into place with the settings marker written last, so an
interrupted run leaves nothing that looks complete; a folder written with other settings is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

_MARKER = ".complete.json"
LIST_FILES = {"train800.txt": ("train",), "val200.txt": ("val",), "train800val200.txt": ("train", "val"),
              "test.txt": ("test",)}

# One split: (image name without ".png", label) per example, in file-list order.
Split = Sequence[tuple[str, int]]


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the example indices whose every prefix is as class-balanced as possible.

    Each class's indices are shuffled; the order then takes one example of every class per round (classes
    in a shuffled order each round), so the first ``n`` indices hold ``n / C`` of each class up to one.
    """
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []
    for round_ in range(max(len(p) for p in per_class)):
        for c in rng.permutation(len(per_class)):
            if round_ < len(per_class[c]):
                order.append(per_class[c][round_])
    return np.asarray(order, dtype=np.int64)


def check_split_sizes(sizes: Mapping[str, int], available: Mapping[str, int]) -> None:
    """Raise ``ValueError`` for a split size below 1, or sizes that need more images than a source holds.

    ``sizes`` maps split names (train, val, test) to sizes; ``available`` maps a group of split names joined
    by ``+`` (the splits drawn from one source, e.g. ``"train+val"``) to that source's number of images.
    """
    if min(sizes.values()) < 1:
        raise ValueError(f"split sizes must be positive, got {dict(sizes)}")
    for group, count in available.items():
        total = sum(sizes[name] for name in group.split("+"))
        if total > count:
            raise ValueError(f"asked for {total} images in all for {group}, but the source has only {count}")


def _complete_with(folder: Path, settings: dict) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found != settings:
        raise ValueError(
            f"{folder} was written with settings {found}, not {settings}; pass another root or delete it"
        )
    return True


def _write(folder: Path, splits: Mapping[str, Split], image: Callable[[str], bytes], settings: dict) -> None:
    (folder / "images").mkdir(parents=True)
    for split in splits.values():
        for name, _ in split:
            (folder / "images" / f"{name}.png").write_bytes(image(name))
    for file, parts in LIST_FILES.items():
        lines = (f"images/{name}.png {label}\n" for part in parts for name, label in splits[part])
        (folder / file).write_text("".join(lines))
    (folder / _MARKER).write_text(json.dumps(settings, indent=1))


def ensure_task_folder(root: Path, task: str, settings: dict,
                       build: Callable[[], tuple[Mapping[str, Split], Callable[[str], bytes]]]) -> Path:
    """Return ``root/task``, written first if absent.

    Args:
        root: the data root.
        task: the task folder's name.
        settings: everything the folder's contents depend on (source, seed, sizes); recorded in the marker.
        build: called only when the folder must be written; returns the splits ``train``, ``val`` and
            ``test`` (image name, label) and a function giving the PNG bytes of an image name.

    Raises:
        ValueError: the folder exists with other settings.
    """
    folder = root / task
    if _complete_with(folder, settings):
        return folder
    splits, image = build()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{task}-"))
    try:
        _write(tmp / task, splits, image, settings)
        try:
            os.replace(tmp / task, folder)
        except OSError:
            if not _complete_with(folder, settings):  # lost a race with a concurrent writer?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
