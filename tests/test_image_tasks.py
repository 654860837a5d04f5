"""Own image tasks (VTAB lists under any name, class-per-folder images) and the backbone's timm preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pyro_ibdr.experiments.data.image_tasks import TEST_FRACTION, VAL_FRACTION, open_task
from pyro_ibdr.experiments.data.preprocess import ImagePreprocess
from pyro_ibdr.experiments.data.vtab import ImageListDataset, PreloadedDataset

COLOURS = {"blue": (40, 40, 210), "green": (30, 200, 40), "red": (220, 30, 30)}


def _images(folder: Path, colour: tuple[int, int, int], n: int, size: tuple[int, int] = (8, 8)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")


def test_vtab_lists_under_any_name_read_the_number_of_classes(tmp_path: Path) -> None:
    folder = tmp_path / "my_colours"
    _images(folder / "img", (0, 0, 0), 6)
    (folder / "train800.txt").write_text("img/0.png 0\nimg/1.png 1\n")
    (folder / "val200.txt").write_text("img/2.png 2\n")
    (folder / "test.txt").write_text("img/3.png 0\nimg/4.png 4\n")
    task = open_task(tmp_path, "my_colours", ("train800val200", "test"))
    assert (task.name, task.layout, task.num_classes) == ("my_colours", "vtab_lists", 5)  # largest label + 1
    assert task.splits["train800val200"] == [("img/0.png", 0), ("img/1.png", 1), ("img/2.png", 2)]  # train + val
    assert open_task(tmp_path, "my_colours", ("train800", "val200"), num_classes=7).num_classes == 7
    with pytest.raises(ValueError, match=r"split 'test' of task 'my_colours': labels must be < 4"):
        open_task(tmp_path, "my_colours", ("train800", "test"), num_classes=4)
    (folder / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"train800val200\.txt: file list not found \(nor train800"):
        open_task(tmp_path, "my_colours", ("train800val200", "test"))
    with pytest.raises(FileNotFoundError, match=r"no task folder 'absent'.*known tasks.*own task needs a folder"):
        open_task(tmp_path, "absent", ("test",))
    with pytest.raises(ValueError, match="eurosat' has 10 classes, not num_classes=3"):
        _images(tmp_path / "eurosat", (0, 0, 0), 1)
        open_task(tmp_path, "eurosat", ("test",), num_classes=3)


def test_class_folders_with_train_and_test(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for name, colour in COLOURS.items():
        _images(root / "train" / name, colour, 10)
        _images(root / "test" / name, colour, 2)
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    task = open_task(tmp_path, "photos", ("train800", "val200", "train800val200", "test"))
    assert task.layout == "class_folders_split" and task.class_names == ("blue", "green", "red")
    assert task.num_classes == 3 and len(task.splits["test"]) == 6
    val, train = task.splits["val200"], task.splits["train800"]
    assert np.bincount([y for _, y in val]).tolist() == [round(VAL_FRACTION * 10)] * 3  # seeded, per class
    assert sorted(val + train) == sorted(task.splits["train800val200"]) and not set(val) & set(train)
    assert all(p.startswith("train/") for p, _ in task.splits["train800val200"])
    assert open_task(tmp_path, "photos", ("val200",)).splits["val200"] == val  # the same split every time
    data = ImageListDataset(task.root, task.splits["test"], task.num_classes, preprocess=ImagePreprocess(
        input_size=(3, 4, 4)))
    image, label = data[5]
    assert label == 2 and image[0].mean() > 0.5 > image[2].mean()  # red after (x - 0.5) / 0.5
    _images(root / "val" / "red", COLOURS["red"], 3)  # an explicit val/ folder replaces the seeded part
    task = open_task(tmp_path, "photos", ("train800", "val200"))
    assert len(task.splits["train800"]) == 30 and [y for _, y in task.splits["val200"]] == [2, 2, 2]
    _images(root / "test" / "purple", (90, 0, 90), 1)
    with pytest.raises(ValueError, match=r"class folders \['purple'\] that the training folder lacks"):
        open_task(tmp_path, "photos", ("test",))


def test_plain_class_folders_split_by_seed(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for name, colour in COLOURS.items():
        _images(root / name, colour, 10)
    task = open_task(tmp_path, "flat", ("train800", "val200", "train800val200", "test"), num_classes=4)
    assert task.layout == "class_folders" and task.num_classes == 4
    sizes = {split: np.bincount([y for _, y in s], minlength=3).tolist() for split, s in task.splits.items()}
    n_test = round(TEST_FRACTION * 10)
    n_val = round(VAL_FRACTION * (10 - n_test))
    assert sizes == {"test": [n_test] * 3, "val200": [n_val] * 3, "train800": [10 - n_test - n_val] * 3,
                     "train800val200": [10 - n_test] * 3}
    assert set(task.splits["test"]).isdisjoint(task.splits["train800val200"])
    assert task.describe()["split_sizes"]["test"] == 3 * n_test
    with pytest.raises(ValueError, match=r"num_classes=2 but .* has 3 class folders"):
        open_task(tmp_path, "flat", ("test",), num_classes=2)


def test_empty_splits_and_unknown_layouts_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    _images(folder, (0, 0, 0), 1)
    (folder / "train800val200.txt").write_text("0.png 0\n")
    (folder / "test.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        open_task(tmp_path, "lists", ("train800val200", "test"))
    single = tmp_path / "single"
    _images(single / "only", (0, 0, 0), 1)  # one image: nothing left for a test split
    with pytest.raises(ValueError, match=r"split 'test' of task 'single' is empty.*too few images per class"):
        open_task(tmp_path, "single", ("train800val200", "test"))
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"neither VTAB file lists .* nor class folders"):
        open_task(tmp_path, "loose", ("test",))
    _images(tmp_path / "hollow" / "cat", (0, 0, 0), 2)
    (tmp_path / "hollow" / "dog").mkdir()
    with pytest.raises(ValueError, match="Found no valid file for the classes dog"):
        open_task(tmp_path, "hollow", ("test",))
    with pytest.raises(ValueError, match="unknown splits"):
        open_task(tmp_path, "hollow", ("train",))


@pytest.mark.parametrize("name", ["vit_base_patch16_224.augreg_in21k", "vit_small_patch14_dinov2",
                                  "vit_base_patch16_clip_224.openai"])
def test_preprocessing_is_the_backbones_timm_eval_transform(name: str) -> None:
    preprocess = ImagePreprocess.from_timm(name, img_size=56)
    config = timm.data.resolve_data_config({"input_size": (3, 56, 56)}, pretrained_cfg=timm.models.get_pretrained_cfg(
        name).to_dict())
    assert preprocess.to_dict() == {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    reference = timm.data.create_transform(**config, is_training=False)(image)
    cached = preprocess.geometric()(image)
    assert cached.dtype == torch.uint8 and cached.shape == (3, 56, 56)
    torch.testing.assert_close(preprocess.normalize()(cached), reference, atol=1e-5, rtol=0)
    vtab = ImagePreprocess.from_timm(name, img_size=56, protocol="vtab")
    assert (vtab.crop_mode, vtab.crop_pct, vtab.mean) == ("squash", 1.0, preprocess.mean)
    with pytest.raises(ValueError, match="no pretrained configuration for 'no_such_vit'"):
        ImagePreprocess.from_timm("no_such_vit")
    with pytest.raises(ValueError, match="protocol"):
        ImagePreprocess.from_timm(name, protocol="imagenet")


def test_vtab_protocol_keeps_the_whole_image_and_the_cache_matches(tmp_path: Path) -> None:
    """A wide image with a red left edge: the model's centre crop loses it, the VTAB squash keeps it."""
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :10, 0] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    model = ImagePreprocess.from_timm("vit_base_patch16_224.augreg_in21k", img_size=20)
    vtab = ImagePreprocess.from_timm("vit_base_patch16_224.augreg_in21k", img_size=20, protocol="vtab")
    for preprocess, red_seen in ((model, False), (vtab, True)):
        data = ImageListDataset(tmp_path, [("wide.png", 0)], 2, preprocess=preprocess)
        assert (data.decode_all()[0, 0] > 128).any().item() is red_seen
        cached = PreloadedDataset(data)
        torch.testing.assert_close(cached[0][0], data[0][0])
