"""The benchmark scripts run end to end (tiny settings on the CPU); their numbers are not tested."""

import re

from click.testing import CliRunner

from benchmarks import gpu_check


def test_gpu_check_smoke_run_prints_every_ratio():
    result = CliRunner().invoke(gpu_check.main, ["--smoke"])
    assert result.exit_code == 0, result.output
    for precision in ("fp32", "bf16"):
        assert f"K=2, B=2, {precision}, device=cpu" in result.output
    for mode in ("fused", "loop", "vmap"):
        assert len(re.findall(rf"{mode} IBDR step +\d+\.\d+ s +peak +\S+ MB", result.output)) == 2
        assert len(re.findall(rf"{mode} / reference = \d+\.\d\d", result.output)) == 2
    assert len(re.findall(r"fused / loop = \d+\.\d\d", result.output)) == 2
