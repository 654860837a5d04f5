"""The offline default's data: a Debian package read without installing it, IDX files, the Fashion-MNIST writer."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyro_ibdr.experiments.assets import debian, fashion_mnist
from pyro_ibdr.experiments.assets.fashion_mnist import FILES, ensure_fashion_mnist_vtab, read_idx

PER_CLASS = {"train": 5, "test": 3}


def _idx(array: np.ndarray) -> bytes:
    return gzip.compress(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                         + array.astype(np.uint8).tobytes())


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_deb(folder: Path, files: dict[str, bytes]) -> Path:
    """A .deb with the given installed files (paths as the real package's data.tar.xz spells them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tf:
        for path, data in files.items():
            info = tarfile.TarInfo(f"./{path}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    deb = folder / "fake.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": buffer.getvalue()}))
    return deb


def _fashion_deb(folder: Path) -> Path:
    """Each image is flat grey at a level that encodes its split, class and index; labels sorted by class."""
    files = {}
    for split, per_class in PER_CLASS.items():
        labels = np.repeat(np.arange(10), per_class)
        offset = 0 if split == "train" else 128
        images = np.stack([np.full((28, 28), offset + i, dtype=np.uint8) for i in range(len(labels))])
        files[f"usr/share/datasets/fashion-mnist/{FILES[split, 'images']}"] = _idx(images)
        files[f"usr/share/datasets/fashion-mnist/{FILES[split, 'labels']}"] = _idx(labels)
    return _fake_deb(folder, files)


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(p, int(y)) for p, y in (line.split() for line in path.read_text().splitlines())]


def test_read_idx_round_trip_and_errors() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(_idx(array)), array)
    assert np.array_equal(read_idx(gzip.decompress(_idx(array))), array)  # uncompressed too
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not unsigned byte"):
        read_idx(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"header says shape \(2, 3, 4\)"):
        read_idx(gzip.decompress(_idx(array))[:-1])


def test_deb_files_reads_the_data_archive(tmp_path: Path) -> None:
    deb = _fake_deb(tmp_path, {"usr/share/a.txt": b"odd", "usr/share/b.bin": b"even"})
    assert debian.deb_files(deb, ["usr/share/b.bin", "./usr/share/a.txt"]) == {
        "usr/share/b.bin": b"even", "./usr/share/a.txt": b"odd"}
    with pytest.raises(FileNotFoundError, match="usr/share/missing"):
        debian.deb_files(deb, ["usr/share/missing"])
    not_deb = tmp_path / "x.deb"
    not_deb.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not a Debian package"):
        debian.deb_files(not_deb, ["usr/share/a.txt"])
    no_data = tmp_path / "y.deb"
    no_data.write_bytes(_ar({"debian-binary": b"2.0\n"}))
    with pytest.raises(ValueError, match=r"no data\.tar member"):
        debian.deb_files(no_data, ["usr/share/a.txt"])


def test_fetch_deb_downloads_once_and_checks_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_IBDR_CACHE", str(tmp_path / "cache"))
    mirror = tmp_path / "mirror"
    (mirror / "pool/main/x").mkdir(parents=True)
    (mirror / "pool/main/x/x_1.0~git_all.deb").write_bytes(b"payload")
    monkeypatch.setenv("PYRO_IBDR_DEBIAN_MIRROR", mirror.as_uri())
    digest = hashlib.sha256(b"payload").hexdigest()
    path = debian.fetch_deb("pool/main/x/x_1.0~git_all.deb", digest)
    assert path.read_bytes() == b"payload" and path.parent == tmp_path / "cache" / "downloads"
    (mirror / "pool/main/x/x_1.0~git_all.deb").unlink()
    assert debian.fetch_deb("pool/main/x/x_1.0~git_all.deb", digest) == path  # cached: no second download
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        debian.fetch_deb("pool/main/x/x_1.0~git_all.deb", "0" * 64)
    with pytest.raises(RuntimeError, match="could not download"):
        debian.fetch_deb("pool/main/x/missing.deb", digest)
    assert not list((tmp_path / "cache" / "downloads").glob("*missing*"))  # nothing half-written


def test_fashion_mnist_writer_splits_labels_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = _fashion_deb(tmp_path)
    folder = ensure_fashion_mnist_vtab(tmp_path / "vtab", n_train=20, n_val=10, n_test=20, deb=deb)
    assert folder == tmp_path / "vtab" / "fashion_mnist"
    train, val = _lines(folder / "train800.txt"), _lines(folder / "val200.txt")
    both, test = _lines(folder / "train800val200.txt"), _lines(folder / "test.txt")
    assert (len(train), len(val), len(test), both) == (20, 10, 20, train + val)
    assert len({p for p, _ in train + val + test}) == 50  # disjoint
    for split, per_class in ((train, 2), (val, 1), (test, 2)):  # stratified
        assert np.bincount([y for _, y in split], minlength=10).tolist() == [per_class] * 10
    for relative, label in train + val + test:  # train/val from the training file, test from the test file
        with Image.open(folder / relative) as image:
            assert image.mode == "L" and image.size == (28, 28)
            level = int(np.asarray(image)[0, 0])
        source = "test" if level >= 128 else "train"
        index = level - (128 if source == "test" else 0)
        assert relative == f"images/{source}-{index:05d}.png" and (source == "test") == ((relative, label) in test)
        assert label == index // PER_CLASS[source]  # the fake files are sorted by class
    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", lambda deb=None: pytest.fail("rewritten"))
    assert ensure_fashion_mnist_vtab(tmp_path / "vtab", n_train=20, n_val=10, n_test=20, deb=deb) == folder
    with pytest.raises(ValueError, match="written with settings"):
        ensure_fashion_mnist_vtab(tmp_path / "vtab", seed=1, n_train=20, n_val=10, n_test=20, deb=deb)


def test_fashion_mnist_writer_refuses_bad_sizes_and_files(tmp_path: Path) -> None:
    deb = _fashion_deb(tmp_path)
    with pytest.raises(ValueError, match="for train\\+val, but the source has only 50"):
        ensure_fashion_mnist_vtab(tmp_path / "vtab", n_train=45, n_val=10, n_test=5, deb=deb)
    with pytest.raises(ValueError, match="must be positive"):
        ensure_fashion_mnist_vtab(tmp_path / "vtab", n_val=0, deb=deb)
    assert not (tmp_path / "vtab" / "fashion_mnist").exists()
    bad = _fake_deb(tmp_path, {f"usr/share/datasets/fashion-mnist/{FILES[key]}":
                               _idx(np.full(3, 11) if key[1] == "labels" else np.zeros((3, 28, 28)))
                               for key in FILES})
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, found 11"):
        ensure_fashion_mnist_vtab(tmp_path / "bad", n_train=1, n_val=1, n_test=1, deb=bad)
    assert not (tmp_path / "bad" / "fashion_mnist").exists()
