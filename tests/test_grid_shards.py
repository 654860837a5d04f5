"""Grid units spread over shards and processes: one result folder, every unit run once, claims recoverable."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pyro_ibdr.experiments import vtab
from pyro_ibdr.experiments.grid import ResultStore, Shard, Unit, grid_processes, run_grid, summary_writer
from pyro_ibdr.methods import OptimSettings
from pyro_ibdr.model import BayesianLoRA
from pyro_ibdr.train import fit
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp

UNITS = [Unit(task, method, seed) for task in ("a", "b") for seed in (0, 1) for method in ("map", "ensemble")]


def _config(unit: Unit) -> dict:
    """Every unit's configuration: the same settings, so stored records are reused."""
    return {"settings": "fixed"}


def _train(unit: Unit) -> dict:
    """A real (tiny) training run whose record depends on the unit: two steps on digits."""
    x, y, _, _ = digits(n_train=64, seed=unit.seed)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])] if unit.task == "a" else [(x[32:], y[32:]), (x[:32], y[:32])]
    model = BayesianLoRA(lora_mlp(seed=unit.seed, rank=2).eval(), num_data=64)
    options = {"num_particles": 2} if unit.method == "ensemble" else {}
    result = fit(unit.method, model, batches, epochs=1, optim=OptimSettings(lr=0.1), seed=unit.seed,
                 progress=False, **options)
    return {"history": result.history, "norm": float(result.posterior.tensors()["particles"].norm())}


def test_sharded_grid_produces_the_unsharded_results(tmp_path: Path) -> None:
    calls: list[Unit] = []

    def counted(unit: Unit) -> dict:
        calls.append(unit)
        return _train(unit)

    whole = run_grid(UNITS, counted, ResultStore(tmp_path / "whole"), unit_config=_config, echo=lambda _: None)
    calls.clear()
    messages: list[str] = []
    shared = ResultStore(tmp_path / "shared")
    first = run_grid(UNITS, counted, shared, shard=Shard(0, 3), unit_config=_config, echo=messages.append)
    assert calls == UNITS[0::3] and len(first) == 3
    assert messages[-1].startswith("5 of 8 units are not finished")
    for index in (1, 2, 0):  # the last shards finish the grid; rerunning shard 0 reuses its units
        records = run_grid(UNITS, counted, shared, shard=Shard(index, 3), unit_config=_config,
                           echo=messages.append)
    assert sorted(calls, key=UNITS.index) == UNITS  # every unit ran exactly once over the shards
    assert records == whole
    assert not list(shared.runs.glob("*.claim"))  # claims are removed once the records are saved


def test_claims_are_exclusive_released_on_failure_and_recoverable(tmp_path: Path) -> None:
    store, unit = ResultStore(tmp_path), UNITS[0]
    assert store.claim(unit) and not store.claim(unit)
    assert json.loads(store.claim_path(unit).read_text()).keys() == {"host", "pid", "time"}
    messages: list[str] = []
    ran: list[Unit] = []
    records = run_grid([unit], lambda u: ran.append(u) or {"x": 1}, store, unit_config=_config, echo=messages.append)
    assert records == [] and ran == [] and "claimed by another process" in messages[0]  # a crashed claimant
    records = run_grid([unit], lambda u: ran.append(u) or {"x": 1}, store, unit_config=_config,
                       echo=messages.append, reclaim=True)
    assert ran == [unit] and records[0]["x"] == 1 and not store.claim_path(unit).exists()

    def failing(_: Unit) -> dict:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_grid([UNITS[1]], failing, store, unit_config=_config, echo=messages.append)
    assert not store.claim_path(UNITS[1]).exists() and not store.done(UNITS[1])


def test_shards_are_parsed_and_checked() -> None:
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    assert Shard(1, 3).select(UNITS) == [UNITS[1], UNITS[4], UNITS[7]]
    for text in ("4/4", "-1/2", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(text)
    result = CliRunner().invoke(vtab.main, ["--shard", "2/2"])
    assert result.exit_code == 2 and "--shard" in result.output and "0 <= i < n" in result.output


def test_torchrun_without_distributed_makes_each_rank_a_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with grid_processes(None, None, "cpu") as shard:
        assert shard == Shard(1, 3)
    with pytest.raises(click.UsageError, match="--shard and a torchrun launch"), \
            grid_processes(None, Shard(0, 2), "cpu"):
        pass
    # under --distributed only rank 0 writes the summary; shards each write theirs
    assert not summary_writer("data") and summary_writer(None)
    monkeypatch.setenv("RANK", "0")
    assert summary_writer("particle")
