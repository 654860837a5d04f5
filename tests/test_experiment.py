"""The grid runner: summary tables over seeds and tasks, test-time S, resumable records."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr.experiments import grid as experiment
from pyro_ibdr.experiments.grid import (
    ResultStore,
    Unit,
    format_table,
    report,
    run_grid,
    summary_rows,
    train_and_evaluate,
    write_summary,
)
from pyro_ibdr.methods import OptimSettings
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp

ACCURACY = {("a", "map", 0): 0.50, ("a", "map", 1): 0.70, ("a", "ibdr", 0): 0.60, ("a", "ibdr", 1): 0.80,
            ("b", "map", 0): 0.90, ("b", "ibdr", 0): 0.95}


def _records() -> list[dict]:
    return [{"task": t, "method": m, "seed": s, "metrics": {"accuracy": acc, "ece": acc / 10}}
            for (t, m, s), acc in ACCURACY.items()]


def test_summary_rows_average_seeds_then_tasks() -> None:
    rows = summary_rows(_records(), ["accuracy", "ece"])
    assert [(r["task"], r["method"], r["seeds"]) for r in rows] == [
        ("a", "map", 2), ("a", "ibdr", 2), ("b", "map", 1), ("b", "ibdr", 1), ("mean", "map", 1), ("mean", "ibdr", 1)
    ]
    a_map, a_ibdr, b_map, b_ibdr, mean_map, mean_ibdr = rows
    assert a_map["accuracy"] == pytest.approx(0.6)
    assert a_map["accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert a_ibdr["ece"] == pytest.approx(0.07) and a_ibdr["ece_std"] == pytest.approx(statistics.stdev([.06, .08]))
    assert b_map["accuracy"] == 0.9 and b_map["accuracy_std"] == 0.0  # one seed: no spread
    assert b_ibdr["ece"] == pytest.approx(0.095)
    assert mean_map["accuracy"] == pytest.approx((0.6 + 0.9) / 2)  # the mean over tasks of the per-task means
    assert mean_ibdr["accuracy"] == pytest.approx((0.7 + 0.95) / 2)
    assert mean_ibdr["ece"] == pytest.approx((0.07 + 0.095) / 2)
    assert mean_map["accuracy_std"] is None and mean_map["ece_std"] is None


def test_format_table_layout() -> None:
    rows = summary_rows(_records(), ["accuracy"])
    rows = [r for r in rows if (r["task"], r["method"]) != ("b", "ibdr")]  # a missing cell prints as '-'
    rows.append({"task": "c", "method": "a_long_method_name", "accuracy": 0.123})
    table = format_table(rows, "accuracy", scale=100, digits=2)
    width = len("a_long_method_name") + 2
    assert table.splitlines() == [
        "accuracy".ljust(22) + "map".rjust(width) + "ibdr".rjust(width) + "a_long_method_name".rjust(width),
        "a".ljust(22) + "60.00".rjust(width) + "70.00".rjust(width) + "-".rjust(width),
        "b".ljust(22) + "90.00".rjust(width) + "-".rjust(width) + "-".rjust(width),
        "mean".ljust(22) + "75.00".rjust(width) + "82.50".rjust(width) + "-".rjust(width),
        "c".ljust(22) + "-".rjust(width) + "-".rjust(width) + "12.30".rjust(width),
    ]
    narrow = format_table([{"task": "t", "method": "m", "ece": 0.0456}], "ece", digits=3)
    assert narrow == "ece".ljust(22) + "m".rjust(10) + "\n" + "t".ljust(22) + "0.046".rjust(10)  # width >= 10


def test_report_prints_both_tables_and_one_cost_line_per_run() -> None:
    records = _records()
    for i, record in enumerate(records):
        record["cost"] = {"time_per_step_s": 0.25, "passes_per_step": 4, "test_samples": 2, "wall_time_s": 10.0 + i,
                          "eval_time_s": 1.0, "peak_memory_mb": 123.0}
    rows = summary_rows(records, ["accuracy", "ece"])
    text = report(rows, records)
    assert format_table(rows, "accuracy", scale=100) in text and format_table(rows, "ece", digits=3) in text
    cost_lines = [line.split() for line in text.splitlines() if line.split()[:1] in (["map"], ["ibdr"])]
    assert [line[:2] for line in cost_lines] == [[m, t] for t, m, _ in ACCURACY]
    assert cost_lines[0][2:] == ["0", "0.25", "4", "2", "10", "1", "123"]


def test_write_summary_writes_strict_json_and_csv(tmp_path: Path) -> None:
    rows = write_summary(tmp_path, _records(), {"note": "x"}, metrics=["accuracy"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"] == {"note": "x"} and len(saved["runs"]) == len(ACCURACY)
    assert saved["summary"] == rows
    with open(tmp_path / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["task"], r["method"]) for r in table] == [(r["task"], r["method"]) for r in rows]
    assert float(table[0]["accuracy"]) == pytest.approx(0.6) and table[-1]["accuracy_std"] == ""


def test_run_grid_resumes_and_rejects_corrupted_records(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    units = [Unit("a", "map", 0), Unit("a", "ibdr", 0)]
    assert units[1].key == "a__ibdr__seed0" and store.path(units[1]) == tmp_path / "runs" / "a__ibdr__seed0.json"
    calls, messages = [], []

    def run_unit(unit: Unit) -> dict:
        calls.append(unit)
        return {"metrics": {"accuracy": 0.5}}

    first = run_grid(units[:1], run_unit, store, echo=messages.append)
    assert first == [{"task": "a", "method": "map", "seed": 0, "metrics": {"accuracy": 0.5}}]
    stamp = store.path(units[0]).stat().st_mtime_ns
    records = run_grid(units, run_unit, store, echo=messages.append)
    assert calls == units and [r["method"] for r in records] == ["map", "ibdr"]
    assert store.path(units[0]).stat().st_mtime_ns == stamp
    assert messages == ["[a__map__seed0] running", "[a__map__seed0] finished earlier: reusing its result",
                        "[a__ibdr__seed0] running"]
    store.path(units[1]).write_text('{"metrics": ')
    with pytest.raises(ValueError, match=r"a__ibdr__seed0\.json is corrupted.*delete it"):
        run_grid(units, run_unit, store, echo=messages.append)
    assert len(calls) == 2


def test_train_and_evaluate_reads_the_test_loader_after_training(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, x_test, y_test = digits(n_train=600)
    events, real_fit = [], experiment.fit

    def recorded_fit(*args: object, **kwargs: object) -> object:
        result = real_fit(*args, **kwargs)
        events.append("fit returned")
        return result

    def test_loader() -> DataLoader:
        events.append("test loader")
        return DataLoader(TensorDataset(x_test, y_test), batch_size=256)

    monkeypatch.setattr(experiment, "fit", recorded_fit)
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    options = {"epochs": 3, "optim": OptimSettings(lr=0.02), "num_particles": 2, "progress": False}
    record = train_and_evaluate(Unit("digits", "ibdr", 0), build_net=lambda: lora_mlp(rank=8).eval(),
                                train_loader=train, test_loader=test_loader, num_data=len(y), num_samples=7,
                                fit_options=options,
                                output=tmp_path)
    assert events == ["fit returned", "test loader"]
    metrics, cost = record["metrics"], record["cost"]
    assert metrics["accuracy"] > 0.7  # 10 classes: chance is 0.1
    assert 0 <= metrics["ece"] <= 1 and metrics["num_samples"] == cost["test_samples"] == 2  # K point masses
    assert cost["steps"] == 3 * 19 and cost["passes_per_step"] >= 2 and cost["time_per_step_s"] > 0
    assert cost["trainable_parameters"] > 0 and len(record["history"]) == 3
    assert (tmp_path / "reliability" / "digits__ibdr__seed0.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(record, allow_nan=False)  # JSON-ready
