"""``python -m examples.vtab`` end to end on a generated VTAB-1k task folder with a tiny random timm ViT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from pyro_ibdr.experiments import cli, vtab
from pyro_ibdr.experiments import grid as experiment
from pyro_ibdr.experiments.data import vtab as vtab_data
from tests._dummies.cli import assert_help_documents_every_option, error_message

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 210)]  # three flat-colour classes of the 10 EuroSAT labels
TINY = ["--task", "eurosat", "--model", "test_vit", "--random-init", "--img-size", "32", "--particles", "2",
        "--epochs", "1", "--batch-size", "16", "--threads", "1"]  # timm's 6-block, 64-wide test ViT, random weights


def _split(folder: Path, name: str, n: int, classes: int = len(COLOURS)) -> list[str]:
    lines = []
    for i in range(n):
        label = i % classes
        relative = f"images/{name}_{i}.png"
        Image.new("RGB", (8, 8), COLOURS[label]).save(folder / relative)
        lines.append(f"{relative} {label}\n")
    return lines


def _task_folder(root: Path, task: str, classes: int) -> None:
    """30 train800 + 12 val200 images and 18 test images of ``classes`` flat colours."""
    folder = root / task
    (folder / "images").mkdir(parents=True)
    train, val, test = (_split(folder, name, n, classes) for name, n in (("train", 30), ("val", 12), ("test", 18)))
    for split, lines in (("train800", train), ("val200", val), ("train800val200", train + val), ("test", test)):
        (folder / f"{split}.txt").write_text("".join(lines))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A VTAB-1k root with an ``eurosat`` folder (3 of its 10 classes) and a ``patch_camelyon`` one (2 classes)."""
    _task_folder(tmp_path / "vtab", "eurosat", len(COLOURS))
    _task_folder(tmp_path / "vtab", "patch_camelyon", 2)
    return tmp_path / "vtab"


def _invoke(data_dir: Path, output: Path, methods: str = "map,ibdr", *extra: str) -> Result:
    return CliRunner().invoke(vtab.main, ["--data-dir", str(data_dir), "--output", str(output),
                                          "--methods", methods, *TINY, *extra])


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, each file list read, each image decoded (by split) and each fit() call that returns."""
    log: list[tuple[str, str]] = []
    real_read, real_load, real_fit = vtab_data.read_file_list, vtab_data.load_image, experiment.fit

    def read_file_list(path: str | Path) -> list[tuple[str, int]]:
        log.append(("read", Path(path).name))
        return real_read(path)

    def load_image(path: Path) -> Image.Image:
        if not log or log[-1] != ("decode", path.name.split("_")[0]):
            log.append(("decode", path.name.split("_")[0]))  # images/<split>_<i>.png
        return real_load(path)

    def fit(method: str, *args: object, **kwargs: object) -> object:
        result = real_fit(method, *args, **kwargs)
        log.append(("fit returned", method))
        return result

    monkeypatch.setattr(vtab_data, "read_file_list", read_file_list)
    monkeypatch.setattr(vtab_data, "load_image", load_image)
    monkeypatch.setattr(experiment, "fit", fit)
    return log


def test_cli_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = _invoke(data_dir, output)
    assert result.exit_code == 0, result.output
    for metric in ("accuracy", "ece"):
        table = next(line for line in result.stdout.splitlines() if line.startswith(metric)).split()
        assert table == [metric, "map", "ibdr"]
    lines = result.stdout.splitlines()
    assert sum(line.split()[:1] == ["eurosat"] for line in lines) == 2  # the task row of each table
    assert sum(line.split()[:1] == ["mean"] for line in lines) == 2  # the mean row of each table
    for method in ("map", "ibdr"):  # and one cost line per run
        assert sum(line.split()[:2] == [method, "eurosat"] for line in lines) == 1

    saved = json.loads((output / "results.json").read_text())
    config = saved["config"]
    assert config["tasks"] == ["eurosat"] and config["methods"] == ["map", "ibdr"] and config["model"] == "test_vit"
    assert (config["img_size"], config["train_split"], config["eval_split"]) == (32, "train800val200", "test")
    assert {"pyro_ibdr", "torch", "pyro", "peft", "python"} <= set(config["versions"])
    assert config["weights"] == "random initialisation (--random-init)"
    assert config["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and config["device_name"]
    assert config["preprocess"] == {"protocol": "model", "timm_data_config": {  # test_vit's own timm configuration
        "input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
        "crop_pct": 0.95, "crop_mode": "center"}}
    assert config["data"]["eurosat"]["layout"] == "vtab_lists" and config["data"]["eurosat"]["num_classes"] == 10
    assert config["settings"]["eurosat"]["particles"] == 2 and config["settings"]["eurosat"]["epochs"] == 1
    assert [(r["task"], r["method"]) for r in saved["summary"]] == [
        ("eurosat", "map"), ("eurosat", "ibdr"), ("mean", "map"), ("mean", "ibdr")]
    runs = {r["method"]: r for r in saved["runs"]}
    for method, passes, samples in (("map", 1, 1), ("ibdr", 4, 2)):  # IBDR: K = 2 particles, 2 passes each
        record = runs[method]
        assert record == json.loads((output / "runs" / f"eurosat__{method}__seed0.json").read_text())
        assert 0 <= record["metrics"]["accuracy"] <= 1 and 0 <= record["metrics"]["ece"] <= 1
        cost = record["cost"]
        assert (cost["passes_per_step"], cost["test_samples"], cost["steps"]) == (passes, samples, 3)  # 42 / 16
        assert cost["time_per_step_s"] > 0 and cost["peak_memory_mb"] >= 0
        assert record["settings"]["eval_split"] == "test" and record["settings"]["batch_size"] == 16
        diagram = output / "reliability" / f"eurosat__{method}__seed0.png"
        assert diagram.read_bytes()[:4] == b"\x89PNG"
    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["task"], r["method"]) for r in rows] == [(r["task"], r["method"]) for r in saved["summary"]]
    assert float(rows[0]["accuracy"]) == pytest.approx(runs["map"]["metrics"]["accuracy"])


def test_rerun_reuses_finished_records(data_dir: Path, tmp_path: Path, events: list[tuple[str, str]]) -> None:
    output = tmp_path / "out"
    assert _invoke(data_dir, output, "map").exit_code == 0
    record = output / "runs" / "eurosat__map__seed0.json"
    content, stamp = record.read_bytes(), record.stat().st_mtime_ns
    events.clear()
    result = _invoke(data_dir, output, "map,ibdr")
    assert result.exit_code == 0, result.output
    assert "[eurosat__map__seed0] finished earlier with the same configuration: reusing its result" in result.stderr
    assert "[eurosat__map__seed0] running" not in result.stderr and "[eurosat__ibdr__seed0] running" in result.stderr
    assert [name for kind, name in events if kind == "fit returned"] == ["ibdr"]
    assert record.read_bytes() == content and record.stat().st_mtime_ns == stamp
    saved = json.loads((output / "results.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["map", "ibdr"]

    (output / "runs" / "eurosat__ibdr__seed0.json").write_text('{"metrics": {"accuracy": 0.')
    message = error_message(_invoke(data_dir, output, "map,ibdr"))
    assert "eurosat__ibdr__seed0.json is corrupted" in message and "delete it" in message


def test_test_images_are_decoded_only_after_training(data_dir: Path, tmp_path: Path,
                                                      events: list[tuple[str, str]]) -> None:
    """Every file list is read and checked before training; the test images are decoded only after it."""
    assert _invoke(data_dir, tmp_path / "out").exit_code == 0
    first_fit = events.index(("fit returned", "map"))
    assert events[:first_fit] == [("read", "train800val200.txt"), ("read", "test.txt"), ("decode", "train"),
                                  ("decode", "val")]
    assert events[first_fit + 1] == ("decode", "test")


def test_select_evaluates_on_val200_and_never_reads_test(data_dir: Path, tmp_path: Path,
                                                         events: list[tuple[str, str]]) -> None:
    output = tmp_path / "out"
    assert _invoke(data_dir, output, "map,ibdr", "--select").exit_code == 0
    assert [name for kind, name in events if kind == "read"] == ["train800.txt", "val200.txt"]
    assert ("decode", "test") not in events
    assert events.index(("decode", "val")) > events.index(("fit returned", "map"))
    saved = json.loads((output / "results.json").read_text())
    assert (saved["config"]["train_split"], saved["config"]["eval_split"]) == ("train800", "val200")
    assert all(r["settings"]["eval_split"] == "val200" for r in saved["runs"])
    assert all(r["cost"]["steps"] == 2 for r in saved["runs"])  # 30 train800 images in batches of 16


def test_bad_methods_and_tasks_are_refused(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download() -> Path:
        raise AssertionError("no offline task may be prepared for a refused command")

    monkeypatch.setattr(vtab, "OFFLINE_TASKS", dict.fromkeys(vtab.OFFLINE_TASKS, no_download))
    message = error_message(_invoke(data_dir, tmp_path / "out", "map,mystery"))
    assert "unknown methods ['mystery']" in message and "ibdr" in message and "--methods" in message
    result = CliRunner().invoke(vtab.main, ["--data-dir", str(data_dir), "--task", "imagenet", "--random-init"])
    message = error_message(result)
    assert "'imagenet'" in message and "known tasks" in message and "eurosat" in message and "dtd" in message
    assert "own task needs a folder" in message
    message = error_message(CliRunner().invoke(vtab.main, ["--task", "eurosat"]))
    assert "--task" in message and "one offline task runs at a time" in message and "fashion_mnist, cifar10" in message
    assert "--data-dir for any other task" in message
    assert not (tmp_path / "out").exists()


def test_missing_folders_and_file_lists_are_named(data_dir: Path, tmp_path: Path) -> None:
    message = error_message(_invoke(tmp_path / "absent", tmp_path / "out"))
    assert "no folder for task 'eurosat'" in message and "absent" in message
    (data_dir / "eurosat" / "test.txt").unlink()
    message = error_message(_invoke(data_dir, tmp_path / "out", "map"))
    assert "file list not found" in message and "test.txt" in message
    assert not list((tmp_path / "out").glob("runs/*.json"))  # an unevaluated run leaves no record
    (data_dir / "eurosat" / "train800val200.txt").unlink()  # still read as train800 + val200 ...
    (data_dir / "eurosat" / "train800.txt").unlink()  # ... until one of them is missing too
    message = error_message(_invoke(data_dir, tmp_path / "out", "map"))
    assert "train800val200.txt: file list not found (nor train800.txt and val200.txt)" in message


def test_random_weights_only_when_asked_for(data_dir: Path, tmp_path: Path, events: list[tuple[str, str]]) -> None:
    args = ["--data-dir", str(data_dir), "--output", str(tmp_path / "out"), "--task", "eurosat"]
    message = error_message(CliRunner().invoke(vtab.main, args))
    for part in ("random initialisation", "--checkpoint FILE", "--pretrained", "--random-init"):
        assert part in message
    message = error_message(CliRunner().invoke(vtab.main, [*args, "--random-init", "--pretrained"]))
    assert "--random-init contradicts --checkpoint/--pretrained" in message
    assert events == [] and not (tmp_path / "out").exists()


def test_an_empty_split_is_refused_before_training(data_dir: Path, tmp_path: Path,
                                                   events: list[tuple[str, str]]) -> None:
    (data_dir / "eurosat" / "test.txt").write_text("\n")
    message = error_message(_invoke(data_dir, tmp_path / "out", "map"))
    assert "eurosat" in message and "test.txt" in message and "empty" in message
    assert not [e for e in events if e[0] != "read"]  # no image decoded, nothing trained


def test_own_tasks_vtab_lists_and_class_folders(data_dir: Path, tmp_path: Path) -> None:
    """A VTAB-layout folder under a new name (3 classes read from the labels) and a class-per-folder directory."""
    (data_dir / "eurosat").rename(data_dir / "colours")
    (data_dir / "colours" / "train800val200.txt").unlink()  # read as train800 + val200
    photos = data_dir / "photos"
    for split, n in (("train", 6), ("test", 2)):
        for name, colour in zip(("blue", "green", "red"), COLOURS[::-1], strict=True):
            (photos / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 8), colour).save(photos / split / name / f"{i}.jpg")
    output = tmp_path / "out"
    result = _invoke(data_dir, output, "map", "--task", "colours,photos", "--preprocess", "vtab")
    assert result.exit_code == 0, result.output
    saved = json.loads((output / "results.json").read_text())
    data = saved["config"]["data"]
    assert (data["colours"]["layout"], data["colours"]["num_classes"]) == ("vtab_lists", 3)
    assert data["colours"]["split_sizes"] == {"train800val200": 42, "test": 18}
    assert data["photos"]["layout"] == "class_folders_split"
    assert data["photos"]["class_names"] == ["blue", "green", "red"]
    assert data["photos"]["split_sizes"] == {"train800val200": 18, "test": 6}
    assert saved["config"]["preprocess"]["timm_data_config"]["crop_mode"] == "squash"
    assert [(r["task"], r["method"]) for r in saved["runs"]] == [("colours", "map"), ("photos", "map")]
    assert all(0 <= r["metrics"]["accuracy"] <= 1 for r in saved["runs"])
    message = error_message(_invoke(data_dir, tmp_path / "o2", "map", "--task", "photos", "--num-classes", "2"))
    assert "num_classes=2 but" in message and "3 class folders" in message


def test_official_preset_comes_from_the_library(data_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    message = error_message(_invoke(data_dir, output, "ibdr", "--preset", "official"))
    assert "eurosat" in message and "run of 3 steps is not longer than its warm-up of 500 steps" in message
    assert "--warmup-steps" in message
    result = _invoke(data_dir, output, "ibdr", "--preset", "official", "--warmup-steps", "1")
    assert result.exit_code == 0, result.output
    record = json.loads((output / "runs" / "eurosat__ibdr__seed0.json").read_text())
    preset = record["settings"]["preset"]
    assert preset["name"] == "official" and preset["optim"]["optimizer"] == "sgd"
    assert preset["optim"]["lr"] == 0.5 and preset["loss"]["rho"] == 0.1  # eurosat's row of the authors' table
    assert preset["num_particles"] == 2 and preset["warmup_steps"] == 1  # the options given here win
    assert (record["settings"]["rank"], record["settings"]["lora_alpha"]) == (8, 8)
    assert record["metrics"]["ensemble"] == "mean_logits" and record["cost"]["test_samples"] == 2
    assert 0.5 <= record["state"]["lambda"] <= 5.0


@pytest.mark.filterwarnings("ignore:S = 4 draws exceed C − 1:UserWarning")  # the test-set DPP volume metric
def test_a_binary_task_with_more_particles_than_wrong_classes_runs(data_dir: Path, tmp_path: Path) -> None:
    args = ["--data-dir", str(data_dir), "--output", str(tmp_path / "out"), "--methods", "ibdr", "--task",
            "patch_camelyon", "--model", "test_vit", "--random-init", "--img-size", "32",
            "--particles", "4", "--epochs", "1",
            "--batch-size", "16", "--threads", "1", "--alpha", "0.5"]
    with pytest.warns(UserWarning, match="K = 4 particles exceed C − 1 = 1 .* set to 0"):
        result = CliRunner().invoke(vtab.main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "runs" / "patch_camelyon__ibdr__seed0.json").read_text())
    assert record["state"]["settings"]["alpha"] == 0.5 and record["history"][0]["diversity"] == 0.0
    assert record["cost"]["test_samples"] == 4


def test_help_documents_every_option() -> None:
    assert len([p for p in vtab.main.params if isinstance(p, click.Option)]) >= 25
    assert_help_documents_every_option(vtab.main)


@pytest.mark.parametrize(("method", "samples", "parameters"), [
    ("mle", 1, None), ("fft", 1, 300_746), ("laplace", 100, None), ("ivon", 2, None),  # laplace: its own S
    ("pvera", 2, 6 * 2 * (64 + 2 * 8) + 650),  # λ_b (64) and λ_d (2r) on q and v of 6 blocks, plus the head
])
def test_each_new_baseline_runs_from_the_cli(data_dir: Path, tmp_path: Path, method: str, samples: int,
                                              parameters: int | None) -> None:
    output = tmp_path / "out"
    result = _invoke(data_dir, output, method)
    assert result.exit_code == 0, result.output
    record = json.loads((output / "runs" / f"eurosat__{method}__seed0.json").read_text())
    assert 0 <= record["metrics"]["accuracy"] <= 1 and 0 <= record["metrics"]["ece"] <= 1
    cost = record["cost"]
    assert (cost["passes_per_step"], cost["steps"], cost["test_samples"]) == (1, 3, samples)
    # PAPER's own rates for ivon and fft reach the optimiser and the record (constant schedule)
    assert record["settings"]["lr"] == record["history"][-1]["lr"] == {"ivon": 1e-2, "fft": 1e-4}.get(method, 2e-3)
    lora = 6 * 2 * 8 * (64 + 64) + 650  # rank 8 on q and v (64 -> 64) of timm's 6-block test ViT, plus the head
    assert cost["trainable_parameters"] == (parameters or lora)  # fft: every weight of the ViT, no LoRA
    if method == "laplace":
        assert record["state"]["hessian_structure"] == "kron" and record["state"]["prior_precision"] != [1.0]

    # The saved posterior scores the test split again to the same numbers, and exports as peft adapters.
    result = CliRunner().invoke(cli.main, ["predict", str(output / record["posterior"])])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    expected = {m: record["metrics"][m] for m in ("accuracy", "ece", "nll", "brier")}
    # PVeRA's rebuilt network agrees to float32 rounding only (relative differences ~1e-5); the others bit for bit.
    assert {m: metrics[m] for m in expected} == (pytest.approx(expected, rel=1e-4) if method == "pvera" else expected)
    result = CliRunner().invoke(cli.main, ["export", str(output / record["posterior"]), str(tmp_path / "adapters")])
    if method == "fft":
        assert "cannot export" in error_message(result) and "is not a peft model" in error_message(result)
    else:
        assert result.exit_code == 0, result.output
        names = {"laplace": ["mean"], "ivon": ["mean"]}.get(method, ["particle_0"])
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == names
