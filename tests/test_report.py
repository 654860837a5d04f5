"""report.md from stored records: tables with units, pooled reliability bins, curves, and clear errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from pyro_ibdr.experiments.report import _pooled_bins, write_report

ACCURACY = {("a", "map", 0): 0.50, ("a", "map", 1): 0.70, ("a", "ibdr", 0): 0.60, ("a", "ibdr", 1): 0.80,
            ("b", "map", 0): 0.90, ("b", "ibdr", 0): 0.85}
ECE = {("a", "map", 0): 0.0456, ("a", "map", 1): 0.0544, ("a", "ibdr", 0): 0.0300, ("a", "ibdr", 1): 0.0400,
       ("b", "map", 0): 0.0100, ("b", "ibdr", 0): 0.0200}


def _record(task: str, method: str, seed: int) -> dict:
    lam = {"lambda": 1.0 + seed} if method == "ibdr" else {}
    return {
        "task": task, "method": method, "seed": seed,
        "metrics": {"accuracy": ACCURACY[task, method, seed], "ece": ECE[task, method, seed], "nll": 0.5,
                    "brier": 0.25, "ensemble": "mean_probs", "num_samples": 2 if method == "ibdr" else 1,
                    "n_bins": 3, "calibration": {"count": [2, 0, 1, 1], "accuracy": [1.0, 0.0, 0.0, 1.0],
                                                 "confidence": [0.2, 0.0, 0.8, 1.0]}},
        "cost": {"time_per_step_s": 0.5 + seed, "passes_per_step": 4, "num_particles_or_samples": 2,
                 "test_samples": 2, "steps": 10, "wall_time_s": 5.0, "eval_time_s": 1.0, "peak_memory_mb": 900.0,
                 "trainable_parameters": 1234},
        "history": [{"epoch": e, "loss": 10.0 / (e + 1) + seed, "lr": 0.002, **lam} for e in range(3)],
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    runs = [_record(*key) for key in ACCURACY]
    config = {"tasks": ["a", "b"], "methods": ["map", "ibdr"], "device": "cpu", "settings": {"a": {"lr": 1}},
              "versions": {"torch": "2.x"}}
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "runs": runs, "summary": []}))
    return tmp_path


def _row(text: str, heading: str, task: str) -> list[str]:
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {task} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_tables_give_mean_and_std_over_seeds_with_units(folder: Path) -> None:
    text = write_report(folder).read_text()
    acc = [50.0, 70.0]
    assert _row(text, "Accuracy (%", "a") == [
        "a", f"{statistics.fmean(acc):.1f} ± {statistics.stdev(acc):.1f}", "**70.0 ± 14.1**"]
    assert _row(text, "Accuracy (%", "b") == ["b", "**90.0**", "85.0"]  # one seed: no ±
    assert _row(text, "Accuracy (%", "mean over tasks") == ["mean over tasks", "75.0", "77.5"]
    ece = _row(text, "ECE (a fraction in [0, 1], not ×100; top-label L1 over 3 equal-width", "a")
    assert ece == ["a", "0.050 ± 0.006", "**0.035 ± 0.007**"]  # lower is better; a fraction, not ×100
    assert _row(text, "ECE", "b") == ["b", "**0.010**", "0.020"]
    cost = _row(text, "Cost", "a")
    assert cost[:4] == ["a", "map", "2", "1.000"]  # mean s/step of seeds 0 and 1
    assert "| device | cpu |" in text and "| versions | torch 2.x |" in text and "settings" not in text.split(
        "## Setup")[1].split("##")[0]
    assert "S = 1, 2" in text and "mean_probs" in text


def test_figures_are_written_and_stale_ones_removed(folder: Path) -> None:
    (folder / "report").mkdir()
    (folder / "report" / "reliability_gone.png").write_bytes(b"old")
    text = write_report(folder).read_text()
    names = sorted(p.name for p in (folder / "report").iterdir())
    assert names == ["accuracy_vs_ece.png", "reliability_a.png", "reliability_b.png", "training_a.png",
                     "training_b.png"]
    assert all((folder / "report" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert all(f"(report/{n})" in text for n in names)
    assert "Constant during training on a: `lr` = 0.002." in text  # not drawn: it never moved
    assert sorted(p.name for p in folder.iterdir()) == ["report", "report.md", "results.json"]


def test_pooled_bins_weight_each_seed_by_its_counts() -> None:
    first = {"metrics": {"calibration": {"count": [2, 0, 1, 1], "accuracy": [1.0, 0.0, 0.0, 1.0],
                                         "confidence": [0.2, 0.0, 0.8, 1.0]}}}
    second = {"metrics": {"calibration": {"count": [0, 2, 2, 0], "accuracy": [0.0, 0.5, 1.0, 0.0],
                                          "confidence": [0.0, 0.5, 0.7, 0.0]}}}
    count, accuracy, confidence = _pooled_bins([first, second])
    np.testing.assert_allclose(count, [2, 2, 3, 1])
    np.testing.assert_allclose(accuracy, [1.0, 0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(confidence, [0.2, 0.5, (0.8 + 1.4) / 3, 1.0])
    assert _pooled_bins([{"metrics": {}}]) is None  # records without bins draw no diagram


def test_bad_folders_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no results.json in .*run an experiment into this folder first"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match=r"results.json is not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text('{"runs": []}')
    with pytest.raises(ValueError, match="holds no runs"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()
