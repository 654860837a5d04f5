"""What an experiment leaves behind, on the VTAB CLI with a tiny random ViT: saved posteriors that ``pyro-ibdr
predict`` and ``export`` use again, units that resume mid-training, records that never mix configurations, and
``report.md``."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import peft
import pyro
import pytest
import torch
from click.testing import CliRunner, Result

from pyro_ibdr.experiments import cli, vtab
from pyro_ibdr.experiments import grid as experiment
from pyro_ibdr.experiments.predict import load_unit
from pyro_ibdr.experiments.vision import create_vit, split_qkv
from tests._dummies.cli import error_message
from tests.test_vtab_cli import TINY, _split

METRICS = ("accuracy", "ece", "nll", "brier")


class Interrupt(Exception):
    """Stands for a kill between epochs."""


def _task_root(root: Path) -> Path:
    folder = root / "eurosat"
    (folder / "images").mkdir(parents=True)
    train, val, test = _split(folder, "train", 30), _split(folder, "val", 12), _split(folder, "test", 18)
    for split, lines in (("train800", train), ("val200", val), ("train800val200", train + val), ("test", test)):
        (folder / f"{split}.txt").write_text("".join(lines))
    return root


def _vtab(data_dir: Path, output: Path, *extra: str) -> Result:
    return CliRunner().invoke(vtab.main, ["--data-dir", str(data_dir), "--output", str(output), *TINY, *extra])


def _pyro_ibdr(*args: str | Path) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, results folder) of map and ibdr, seeds 0 and 1, 2 epochs."""
    root = tmp_path_factory.mktemp("saved")
    data_dir = _task_root(root / "vtab")
    output = root / "out"
    result = _vtab(data_dir, output, "--methods", "map,ibdr", "--seed", "0", "--seed", "1", "--epochs", "2")
    assert result.exit_code == 0, result.output
    return data_dir, output


def _records(output: Path) -> dict[str, dict]:
    return {r["method"] + str(r["seed"]): r for r in json.loads((output / "results.json").read_text())["runs"]}


def test_predict_scores_a_saved_posterior_as_the_run_did(finished: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, output = finished
    for key, record in _records(output).items():
        posterior = output / record["posterior"]
        scores = tmp_path / f"{key}.json"
        result = _pyro_ibdr("predict", posterior, "--output", scores)
        assert result.exit_code == 0, result.output
        saved = json.loads(scores.read_text())
        assert json.loads(result.stdout) == saved
        assert {m: saved["metrics"][m] for m in METRICS} == {m: record["metrics"][m] for m in METRICS}
        assert saved["data"] == {"data_dir": str(data_dir), "task": "eurosat", "split": "test", "examples": 18}
        assert saved["conventions"]["ece"].startswith("fraction in [0, 1]")
    assert not list((output / "resume").iterdir())  # finished units keep their posterior, not their snapshot
    ibdr = output / "posteriors" / "eurosat__ibdr__seed1.pt"
    result = _pyro_ibdr("predict", ibdr, "--split", "val200", "--max-examples", "5")
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["data"]["split"] == "val200" and saved["data"]["examples"] == 5
    assert saved["metrics"]["num_samples"] == 2 and saved["seed"] == 1 and saved["method"] == "ibdr"
    result = _pyro_ibdr("predict", ibdr, "--num-samples", "4")  # the paper preset's σ > 0: S = 2 draws per particle
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["num_samples"] == 4
    point_mass = output / "posteriors" / "eurosat__map__seed0.pt"
    message = error_message(_pyro_ibdr("predict", point_mass, "--num-samples", "4"))  # a point mass: S = K only
    assert "--num-samples" in message and "1 point mass:" in message


def test_predict_refuses_what_does_not_fit(finished: tuple[Path, Path], tmp_path: Path) -> None:
    _, output = finished
    posterior = output / "posteriors" / "eurosat__map__seed0.pt"
    message = error_message(_pyro_ibdr("predict", posterior, "--test-file", posterior))
    assert "--test-file do(es) not apply to a vtab posterior" in message
    other = _task_root(tmp_path / "other")
    (other / "eurosat").rename(other / "dtd")
    message = error_message(_pyro_ibdr("predict", posterior, "--data-dir", other, "--task", "dtd"))
    assert "'dtd' has 47 classes" in message and "'eurosat' with 10" in message
    broken = tmp_path / "broken.pt"
    broken.write_bytes(posterior.read_bytes()[:100])
    message = error_message(_pyro_ibdr("predict", broken))
    assert "broken.pt is not a readable checkpoint" in message


def test_export_writes_adapters_that_peft_loads(finished: tuple[Path, Path]) -> None:
    _, output = finished
    posterior = output / "posteriors" / "eurosat__ibdr__seed1.pt"
    folder = output / "adapters"
    result = _pyro_ibdr("export", posterior, folder)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["particle_0", "particle_1"]
    unit = load_unit(posterior, "cpu")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for k, theta in enumerate(unit.checkpoint.posterior.particles):
        pyro.set_rng_seed(1)  # the seed of the unit: the same random frozen backbone
        base = split_qkv(create_vit("test_vit", num_classes=10, img_size=32))
        loaded = peft.PeftModel.from_pretrained(base, folder / f"particle_{k}").eval()
        with torch.no_grad():
            assert torch.allclose(loaded(x), unit.model.logits(theta, x), atol=1e-5)


def test_report_is_regenerated_from_stored_results(finished: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    _, output = finished
    text = (output / "report.md").read_text()
    records = _records(output)
    accuracy = [100 * records[f"ibdr{s}"]["metrics"]["accuracy"] for s in (0, 1)]
    cell = f"{statistics.fmean(accuracy):.1f} ± {statistics.stdev(accuracy):.1f}"
    row = next(line for line in text.splitlines() if line.startswith("| eurosat |") and "±" in line)
    assert cell in row.split("|")[3]  # the table is tasks × (map, ibdr)
    assert "ECE (a fraction in [0, 1], not ×100; top-label L1 over 15 equal-width confidence bins" in text
    assert "S = 1, 2" in text and "mean_probs" in text and "NLL (nats per test example" in text
    images = re.findall(r"!\[[^]]*\]\((report/[^)]+)\)", text)
    assert images == ["report/accuracy_vs_ece.png", "report/reliability_eurosat.png", "report/training_eurosat.png"]
    assert all((output / image).read_bytes()[:4] == b"\x89PNG" for image in images)
    constant = next(line for line in text.splitlines() if line.startswith("Constant during training on eurosat"))
    assert "`lr` = 0.002" in constant and "`loss`" not in constant

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a report never trains")

    monkeypatch.setattr(experiment, "fit", no_training)
    (output / "report.md").unlink()
    for image in images:
        (output / image).unlink()
    result = _pyro_ibdr("report", output)
    assert result.exit_code == 0, result.output
    assert (output / "report.md").read_text() == text and all((output / image).is_file() for image in images)
    (tmp_path / "empty").mkdir()
    message = error_message(_pyro_ibdr("report", tmp_path / "empty"))
    assert "no results.json in" in message and "run an experiment into this folder first" in message


def test_an_interrupted_unit_resumes_to_the_numbers_of_an_uninterrupted_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = _task_root(tmp_path / "vtab")
    options = ("--methods", "ibdr", "--epochs", "3", "--seed", "2")
    reference = _vtab(data_dir, tmp_path / "reference", *options)
    assert reference.exit_code == 0, reference.output

    def interrupt_after_two(unit: experiment.Unit, epoch: int, record: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(vtab, "log_epoch", interrupt_after_two)
        interrupted = _vtab(data_dir, tmp_path / "out", *options)
    assert isinstance(interrupted.exception, Interrupt)
    assert len(list((tmp_path / "out" / "resume").glob("eurosat__ibdr__seed2-*.pt"))) == 1
    resumed = _vtab(data_dir, tmp_path / "out", *options)
    assert resumed.exit_code == 0, resumed.output
    assert "[eurosat__ibdr__seed2] epoch 3:" in resumed.stderr and "epoch 2:" not in resumed.stderr
    expected, got = (json.loads((folder / "runs" / "eurosat__ibdr__seed2.json").read_text())
                     for folder in (tmp_path / "reference", tmp_path / "out"))
    for key in ("metrics", "history", "state", "config", "config_hash"):
        assert got[key] == expected[key], key
    assert got["cost"]["resumed_at_step"] == 6 and expected["cost"]["resumed_at_step"] == 0  # 2 epochs of 3 steps
    assert not list((tmp_path / "out" / "resume").iterdir())


def test_other_settings_train_again_and_never_mix(tmp_path: Path) -> None:
    data_dir, output = _task_root(tmp_path / "vtab"), tmp_path / "out"
    assert _vtab(data_dir, output, "--methods", "map,ibdr", "--lr", "1e-3", "--particles", "2").exit_code == 0
    old = json.loads((output / "results.json").read_text())
    result = _vtab(data_dir, output, "--methods", "map,ibdr", "--lr", "5e-3", "--particles", "3")
    assert result.exit_code == 0, result.output
    for key in ("map", "ibdr"):
        message = next(line for line in result.stderr.splitlines() if line.startswith(f"[eurosat__{key}__seed0] the"))
        assert "another configuration (options.lr: 0.001 → 0.005; options.particles: 2 → 3;" in message
        assert f"runs/old/eurosat__{key}__seed0-" in message and message.endswith("training again")
    new = json.loads((output / "results.json").read_text())
    assert new["config"]["options"]["lr"] == 0.005 and new["config"]["options"]["particles"] == 3
    for record in new["runs"]:
        assert record["config"]["options"]["lr"] == 0.005 and record["config"]["settings"]["particles"] == 3
    assert {r["method"]: r["cost"]["passes_per_step"] for r in new["runs"]} == {"map": 1, "ibdr": 6}  # K = 3
    aside = sorted(p.name for p in (output / "runs" / "old").iterdir())
    hashes = {r["method"]: r["config_hash"] for r in old["runs"]}
    assert aside == sorted(f"eurosat__{m}__seed0-{hashes[m]}{suffix}" for m in ("map", "ibdr")
                           for suffix in (".json", ".png", ".pt"))
    kept = json.loads((output / "runs" / "old" / f"eurosat__ibdr__seed0-{hashes['ibdr']}.json").read_text())
    assert kept == next(r for r in old["runs"] if r["method"] == "ibdr")
    again = _vtab(data_dir, output, "--methods", "map,ibdr", "--lr", "5e-3", "--particles", "3", "--threads", "1",
                  "--checkpoint-every", "2")  # neither threads nor snapshots change a unit's numbers
    assert again.exit_code == 0 and again.stderr.count("finished earlier with the same configuration") == 2
