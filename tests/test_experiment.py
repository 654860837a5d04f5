"""The grid runner: summary tables over seeds and tasks, test-time S, resumable records."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr.checkpoint import load_checkpoint
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
from pyro_ibdr.experiments.store import canonical_config, config_differences, config_hash
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

    same = {"unit_config": lambda unit: {"lr": 0.1}, "echo": messages.append}
    first = run_grid(units[:1], run_unit, store, **same)
    assert first == [{"task": "a", "method": "map", "seed": 0, "metrics": {"accuracy": 0.5}, "config": {"lr": 0.1},
                      "config_hash": config_hash({"lr": 0.1})}]
    stamp = store.path(units[0]).stat().st_mtime_ns
    records = run_grid(units, run_unit, store, **same)
    assert calls == units and [r["method"] for r in records] == ["map", "ibdr"]
    assert store.path(units[0]).stat().st_mtime_ns == stamp
    assert messages == ["[a__map__seed0] running",
                        "[a__map__seed0] finished earlier with the same configuration: reusing its result",
                        "[a__ibdr__seed0] running"]
    store.path(units[1]).write_text('{"metrics": ')
    with pytest.raises(ValueError, match=r"a__ibdr__seed0\.json is corrupted.*delete it"):
        run_grid(units, run_unit, store, **same)
    assert len(calls) == 2


def test_run_grid_reuses_a_record_only_under_the_same_configuration(tmp_path: Path) -> None:
    """K 2 → 3 and lr 1e-3 → 5e-3 between two runs into one folder: both units train again, the old records and
    files are kept aside, and every record carries the configuration its numbers came from."""
    store, units = ResultStore(tmp_path), [Unit("a", "map", 0), Unit("a", "ibdr", 0)]
    settings, calls, messages, kept = {"particles": 2, "lr": 1e-3}, [], [], []

    def unit_config(unit: Unit) -> dict:
        return {"options": dict(settings), "data_dir": tmp_path / "data", "task": unit.task}

    def run_unit(unit: Unit) -> dict:
        calls.append(unit)
        snapshot = store.resume_path(unit, unit_config(unit))
        assert {p.name for p in snapshot.parent.glob(f"{unit.key}-*")} <= {snapshot.name}  # a stale one is gone
        kept.append(snapshot.is_file())
        store.reliability_path(unit).parent.mkdir(exist_ok=True)
        store.reliability_path(unit).write_bytes(b"diagram")
        return {"metrics": {"accuracy": settings["lr"] * 100}}  # numbers that follow the configuration

    first = run_grid(units, run_unit, store, unit_config=unit_config, echo=messages.append)
    assert first[0]["config"] == {"options": {"particles": 2, "lr": 0.001}, "data_dir": str(tmp_path / "data"),
                                  "task": "a"}
    old_hash = first[0]["config_hash"]
    settings.update(particles=3, lr=5e-3)
    for unit in units:  # a snapshot of the old configuration, and one of the new, as a killed run leaves them
        for config in ({"stale": True}, unit_config(unit)):
            store.resume_path(unit, config).parent.mkdir(exist_ok=True)
            store.resume_path(unit, config).write_bytes(b"snapshot")
    messages.clear()
    second = run_grid(units, run_unit, store, unit_config=unit_config, echo=messages.append)
    assert calls == units + units and kept == [False, False, True, True]  # the current snapshot stays to resume
    assert [r["metrics"]["accuracy"] for r in second] == [0.5, 0.5]
    assert all(r["config"]["options"] == {"particles": 3, "lr": 0.005} for r in second)
    aside = tmp_path / "runs" / "old" / f"a__map__seed0-{old_hash}.json"
    assert json.loads(aside.read_text())["metrics"]["accuracy"] == pytest.approx(0.1)
    assert aside.with_suffix(".png").read_bytes() == b"diagram"
    assert messages[0] == (f"[a__map__seed0] the stored result has another configuration (options.lr: 0.001 → 0.005; "
                           f"options.particles: 2 → 3): moved to {aside}; training again")
    assert not list((tmp_path / "resume").iterdir())  # finished units keep no snapshot

    messages.clear()
    third = run_grid(units, run_unit, store, unit_config=unit_config, echo=messages.append)
    assert len(calls) == 4 and third == second and all("reusing" in m for m in messages)
    record = json.loads(store.path(units[0]).read_text())
    del record["config_hash"]  # a record of an older version, without a configuration
    store.path(units[0]).write_text(json.dumps(record))
    run_grid(units[:1], run_unit, store, unit_config=unit_config, echo=messages.append)
    assert len(calls) == 5 and (tmp_path / "runs" / "old" / "a__map__seed0-unhashed.json").is_file()


def test_unit_configurations_are_canonical() -> None:
    assert canonical_config({"b": (1, 2), "a": Path("x") / "y"}) == {"a": "x/y", "b": [1, 2]}
    assert config_hash({"a": 1, "b": [1.0, "s"]}) == config_hash({"b": (1.0, "s"), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2}) and len(config_hash({})) == 16
    with pytest.raises(TypeError, match="plain JSON values only, got a OptimSettings"):
        config_hash({"optim": OptimSettings()})
    assert config_differences({"o": {"k": 2, "gone": 1}}, {"o": {"k": 3}, "new": None}) == [
        "new: '(absent)' → None", "o.gone: 1 → '(absent)'", "o.k: 2 → 3"]


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
                                output=tmp_path, rebuild={"experiment": "digits"})
    assert events == ["fit returned", "test loader"]
    metrics, cost = record["metrics"], record["cost"]
    assert metrics["accuracy"] > 0.7  # 10 classes: chance is 0.1
    assert 0 <= metrics["ece"] <= 1 and metrics["num_samples"] == cost["test_samples"] == 2  # K point masses
    assert cost["steps"] == 3 * 19 and cost["passes_per_step"] >= 2 and cost["time_per_step_s"] > 0
    assert cost["trainable_parameters"] > 0 and len(record["history"]) == 3
    assert (tmp_path / "reliability" / "digits__ibdr__seed0.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(record, allow_nan=False)  # JSON-ready

    # The per-bin statistics of the ensemble reproduce its ECE; the saved posterior records how to use it again.
    bins = metrics["calibration"]
    assert sum(bins["count"]) == len(y_test) and len(bins["count"]) == metrics["n_bins"] + 1 == 16
    gaps = [n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)]
    assert sum(gaps) / len(y_test) == pytest.approx(metrics["ece"], abs=1e-6)
    saved = load_checkpoint(tmp_path / record["posterior"])
    assert record["posterior"] == "posteriors/digits__ibdr__seed0.pt" and saved.method == "ibdr" and saved.seed == 0
    assert saved.config["prediction"] == {"ensemble": "mean_probs", "num_samples": 2, "n_bins": 15, "precision": "fp32"}
    assert saved.config["rebuild"] == {"experiment": "digits"} and saved.config["num_data"] == len(y)
    assert saved.config["method_config"]["num_particles"] == 2 and saved.config["optim"]["lr"] == 0.02
    assert saved.state["lambda"] == record["state"]["lambda"]
    assert len(saved.posterior.particles) == 2
