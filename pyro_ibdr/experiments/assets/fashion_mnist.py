"""Real Fashion-MNIST photos as an offline VTAB-1k-format task folder (the offline default's data).

Provenance: Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv 1708.07747; MIT licence) holds 70,000
28x28 greyscale photographs of Zalando articles in ten classes ``CLASSES``: 60,000 for training and 10,000
for test, as four gzip-compressed IDX files. Debian packages them as ``dataset-fashion-mnist``
(``DEB_POOL_PATH``, checked by SHA-256); the files are read out of the ``.deb`` (never installed), or from
``/usr/share/datasets/fashion-mnist`` where the package is installed.

:func:`ensure_fashion_mnist_vtab` writes a VTAB-1k-format folder
(:mod:`pyro_ibdr.experiments.assets.vtab_folder`): train800 and val200 are drawn from the training set,
test from the test set, each stratified (equal counts per class) with a seeded shuffle; images are the
original 28x28 greyscale pixels as PNG files ``train-<index>.png`` / ``test-<index>.png`` (index in the
IDX file). The image reader turns them into RGB.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pyro_ibdr.experiments.assets.debian import deb_files, fetch_deb
from pyro_ibdr.experiments.assets.fetch import cache_dir
from pyro_ibdr.experiments.assets.vtab_folder import Split, check_split_sizes, ensure_task_folder, stratified_order

CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TASK_NAME = "fashion_mnist"
DEB_POOL_PATH = "pool/main/d/dataset-fashion-mnist/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
INSTALLED = Path("/usr/share/datasets/fashion-mnist")
FILES = {("train", "images"): "train-images-idx3-ubyte.gz", ("train", "labels"): "train-labels-idx1-ubyte.gz",
         ("test", "images"): "t10k-images-idx3-ubyte.gz", ("test", "labels"): "t10k-labels-idx1-ubyte.gz"}
_IDX_UBYTE = 0x08


def read_idx(raw: bytes, name: str = "IDX file") -> np.ndarray:
    """An unsigned-byte IDX array (LeCun's MNIST format, gzip-compressed or not) as a NumPy array.

    The header is two zero bytes, the type code (0x08: unsigned byte), the number of dimensions ``n`` and
    ``n`` big-endian 32-bit sizes; the data follow.

    Raises:
        ValueError: a bad header, another element type, or a data size that does not match the header.
    """
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{name}: not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{name}: element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{name}: header says shape {shape} ({int(np.prod(shape))} values), found {data.size}")
    return data.reshape(shape)


def _source_files(deb: Path | None) -> dict[tuple[str, str], bytes]:
    if deb is None and all((INSTALLED / file).is_file() for file in FILES.values()):
        return {key: (INSTALLED / file).read_bytes() for key, file in FILES.items()}
    paths = {key: f"usr/share/datasets/fashion-mnist/{file}" for key, file in FILES.items()}
    found = deb_files(deb if deb is not None else fetch_deb(DEB_POOL_PATH, DEB_SHA256), paths.values())
    return {key: found[path] for key, path in paths.items()}


def load_fashion_mnist(deb: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}``: (N, 28, 28) and (N,) uint8 arrays.

    Args:
        deb: a local ``dataset-fashion-mnist`` ``.deb``; default: the installed package, else the pinned
            package from the Debian archive (downloaded once, :func:`pyro_ibdr.experiments.assets.debian.fetch_deb`).

    Raises:
        ValueError: malformed files, labels outside 0–9, or image and label counts that differ.
    """
    raw = _source_files(deb)
    out = {}
    for split in ("train", "test"):
        images = read_idx(raw[split, "images"], FILES[split, "images"])
        labels = read_idx(raw[split, "labels"], FILES[split, "labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) >= len(CLASSES):
            raise ValueError(f"{split}: labels must lie in 0..{len(CLASSES) - 1}, found {int(labels.max())}")
        out[split] = (images, labels.astype(np.int64))
    return out


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def ensure_fashion_mnist_vtab(root: Path | None = None, *, seed: int = 0, n_train: int = 800, n_val: int = 200,
                              n_test: int = 2000, deb: Path | None = None) -> Path:
    """Write (once) and return the VTAB-1k-format ``fashion_mnist`` task folder under ``root``.

    Args:
        root: the VTAB data root; default ``cache_dir()/"vtab-1k"``. The task folder is ``root/"fashion_mnist"``.
        seed: seed of the stratified draws and shuffles.
        n_train, n_val: train800 / val200 sizes, drawn from the 60,000 training images (train800val200 is
            their union).
        n_test: test size, drawn from the 10,000 test images.
        deb: a local ``.deb`` to read instead of the installed or downloaded package.

    Raises:
        ValueError: bad split sizes, malformed source files, or a folder written with other settings.
        RuntimeError: the package cannot be downloaded.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    check_split_sizes(sizes, {})
    settings = {"source": f"debian:{Path(DEB_POOL_PATH).name}", "seed": seed, "n_train": n_train, "n_val": n_val,
                "n_test": n_test}

    def build() -> tuple[dict[str, Split], Callable[[str], bytes]]:
        data = load_fashion_mnist(deb)
        check_split_sizes(sizes, {"train+val": len(data["train"][1]), "test": len(data["test"][1])})
        rng = np.random.default_rng(seed + 1)
        train_labels, test_labels = data["train"][1], data["test"][1]
        fit = stratified_order(train_labels, seed)[: n_train + n_val]
        drawn = {"train": rng.permutation(fit[:n_train]), "val": rng.permutation(fit[n_train:]),
                 "test": rng.permutation(stratified_order(test_labels, seed + 2)[:n_test])}
        splits = {name: [(f"{'test' if name == 'test' else 'train'}-{i:05d}",
                          int((test_labels if name == "test" else train_labels)[i])) for i in indices]
                  for name, indices in drawn.items()}

        def image(name: str) -> bytes:
            source, index = name.split("-")
            return _png(data[source][0][int(index)])

        return splits, image

    root = Path(root) if root is not None else cache_dir() / "vtab-1k"
    return ensure_task_folder(root, TASK_NAME, settings, build)
