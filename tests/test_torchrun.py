"""The VTAB command launched by ``torchrun`` (2 gloo processes on CPU, a tiny random ViT): a data-parallel grid
equals the one-process run, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyro_ibdr.experiments import vtab
from tests.test_vtab_cli import TINY, data_dir  # noqa: F401  (fixture)

METRICS = ("accuracy", "ece", "nll", "brier")


def _runs(output: Path) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads((output / "results.json").read_text())["runs"]}


def test_a_torchrun_launch_trains_data_parallel_like_one_process(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ["--data-dir", str(data_dir), "--methods", "ibdr", *TINY, "--epochs", "2"]
    single = CliRunner().invoke(vtab.main, [*args, "--output", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pyro_ibdr.experiments.cli", "vtab", *args, "--output", str(tmp_path / "group"),
         "--distributed", "data"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    group, expected = _runs(tmp_path / "group"), _runs(tmp_path / "single")
    assert group.keys() == expected.keys() == {"ibdr"}
    for method, record in expected.items():
        # the 2 processes' shard sums round differently from one process's: equal to float tolerance
        got = {m: group[method]["metrics"][m] for m in METRICS}
        assert got == pytest.approx({m: record["metrics"][m] for m in METRICS}, rel=1e-3, abs=1e-4), method
        assert group[method]["history"][-1]["loss"] == pytest.approx(record["history"][-1]["loss"], rel=1e-3)
    assert launch.stdout.count("results:") == 1  # rank 1 is silent; rank 0 wrote the summary once
    assert [p.name for p in (tmp_path / "group" / "posteriors").iterdir()] == ["eurosat__ibdr__seed0.pt"]
    assert not list((tmp_path / "group").glob("resume/*"))  # no training snapshots under --distributed
