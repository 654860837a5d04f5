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


def test_ratios_pair_the_rounds_of_one_run():
    from benchmarks.ibdr_step import Timing

    fast, slow = Timing((1.0, 10.0, 12.0), 0.0), Timing((2.0, 20.0, 6.0), 0.0)
    assert fast.seconds == 10.0 and slow.seconds == 6.0  # the medians alone would say 1.67
    assert fast.ratio(slow) == (0.5, 0.5, 1.25)  # per-round ratios 0.5, 0.5, 2: median and quartiles
    assert Timing((3.0,), 0.0).ratio(Timing((2.0,), 0.0)) == (1.5, 1.5, 1.5)
