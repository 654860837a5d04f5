"""fit(checkpoint=...): a run interrupted between epochs and run again ends with the numbers of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.methods import IVON, METHODS, OptimSettings
from pyro_ibdr.methods.base import Method
from pyro_ibdr.resume import (
    load_param_store_state,
    load_training_state,
    loader_generators,
    param_store_state,
    rng_state,
    set_rng_state,
)
from pyro_ibdr.schedules import WarmupCosine
from pyro_ibdr.train import FitResult, fit
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp, plain_mlp, pvera_mlp

EPOCHS = 4
#: Small settings that make every method's state move within 16 steps (SGLD keeps samples from step 4 on).
OPTIONS = {"ibdr": {"num_particles": 2, "sigma": 0.01, "learn_sigma": True}, "sgld": {"burn_in": 3, "thin": 2},
           "laplace": {"stochastic": True, "marglik_steps": 5}}  # finalize draws random numbers after the snapshot
NETWORKS = {"lora": lora_mlp, "full": plain_mlp, "pvera": pvera_mlp}
SCHEDULE = WarmupCosine(total_steps=16, warmup_steps=4)  # 4 epochs of 4 batches; the rate moves across epochs
ROOT = Path(__file__).resolve().parent.parent


class Interrupt(Exception):
    """Stands for a kill between epochs (KeyboardInterrupt would stop pytest itself)."""


def options(name: str) -> dict:
    size_field = METHODS[name].config_class.size_field
    return {**({size_field: 2} if size_field else {}), **OPTIONS.get(name, {})}


def loader(seed: int = 5) -> DataLoader:
    x, y, _, _ = digits(n_train=64)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def run(name: str, checkpoint: Path | None = None, stop_after: int | None = None, **overrides) -> FitResult:
    """A fresh model and loader, as a rerun of a script builds them; ``stop_after`` epochs then an interruption."""
    dropout = 0.3 if name == "mc_dropout" else 0.0
    model = BayesianLoRA(NETWORKS[METHODS[name].adapter](seed=0, dropout=dropout).eval(), num_data=64)

    def interrupt(epoch: int, record: dict) -> None:
        if stop_after is not None and epoch + 1 == stop_after:
            raise Interrupt

    settings = {"optim": OptimSettings(lr=0.01), "schedule": SCHEDULE, "seed": 3, **options(name), **overrides}
    return fit(name, model, loader(), epochs=EPOCHS, progress=False, callbacks=[interrupt], checkpoint=checkpoint,
               **settings)


def assert_same_values(got: object, expected: object, where: str) -> None:
    """Equal tensors (bit for bit), dicts, lists and plain values, recursively."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key, value in expected.items():
            assert_same_values(got[key], value, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for k, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_values(a, b, f"{where}[{k}]")
    else:
        assert got == expected, where


def assert_same_run(resumed: FitResult, reference: FitResult) -> None:
    assert type(resumed.posterior) is type(reference.posterior)
    assert_same_values(resumed.posterior.tensors(), reference.posterior.tensors(), "posterior")
    assert resumed.history == reference.history
    assert resumed.steps == reference.steps and resumed.config == reference.config
    untimed = [{k: v for k, v in r.state.items() if not k.endswith("_s")} for r in (resumed, reference)]
    assert str(untimed[0]) == str(untimed[1])  # Laplace's state times its fit (laplace_fit_s)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_interrupted_run_continues_to_the_uninterrupted_numbers(tmp_path: Path, name: str) -> None:
    reference = run(name)
    path = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run(name, path, stop_after=2)
    assert load_training_state(path)["step"] == 8  # two epochs of 4 batches
    resumed = run(name, path)
    assert resumed.resumed_at_step == 8 and reference.resumed_at_step == 0
    assert_same_run(resumed, reference)
    assert [r["epoch"] for r in resumed.history] == list(range(EPOCHS))
    assert resumed.history[-1]["lr"] != resumed.history[1]["lr"]  # the schedule moved across the interruption


def test_without_the_snapshot_the_rerun_would_differ(tmp_path: Path) -> None:
    """The comparison above can fail: restarting after two epochs from the first snapshot's epoch gives other
    numbers, and so does a snapshot continued with the loader's shuffling generator left unrestored."""
    reference = run("ibdr")
    path = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run("ibdr", path, stop_after=2)
    snapshot = load_training_state(path)
    snapshot["rng"]["generators"] = [torch.Generator().manual_seed(5).get_state()]  # the loader's seed state
    torch.save(snapshot, path)
    resumed = run("ibdr", path)
    assert not torch.equal(resumed.posterior.particles, reference.posterior.particles)


def test_snapshots_every_n_epochs_and_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    seen = []

    def look(epoch: int, record: dict) -> None:
        state = load_training_state(path)
        seen.append(None if state is None else state["epoch"])

    model = BayesianLoRA(lora_mlp().eval(), num_data=64)
    fit("map", model, loader(), epochs=5, progress=False, callbacks=[look], checkpoint=path, checkpoint_every=2)
    assert seen == [None, 2, 2, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary files left


def test_a_finished_snapshot_returns_the_result_without_training(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    reference = run("map", path)
    calls = []
    model = BayesianLoRA(lora_mlp(seed=0).eval(), num_data=64)
    again = fit("map", model, loader(), epochs=EPOCHS, optim=OptimSettings(lr=0.01), schedule=SCHEDULE, seed=3,
                progress=False, checkpoint=path, callbacks=[lambda e, r: calls.append(e)])
    assert calls == [] and again.resumed_at_step == again.steps == 16
    assert_same_run(again, reference)
    trained = load_training_state(path)["wall_time_s"]  # plus only the set-up and finalize of this call
    assert trained <= again.wall_time_s < trained + 5.0


def test_a_snapshot_of_other_settings_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run("ibdr", path, stop_after=1)
    with pytest.raises(ValueError, match=r"other settings \(optim: .*'lr': 0\.01.*'lr': 0\.02.*delete it"):
        run("ibdr", path, optim=OptimSettings(lr=0.02))
    with pytest.raises(ValueError, match=r"config: .*'num_particles': 2.*'num_particles': 3"):
        run("ibdr", path, num_particles=3)
    with pytest.raises(ValueError, match=r"other settings.*method: 'ibdr' → 'map'"):
        run("map", path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable training snapshot"):
        run("ibdr", path)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of epochs"):
        fit("map", BayesianLoRA(lora_mlp(), num_data=64), loader(), epochs=1, checkpoint=path, checkpoint_every=0)


def test_a_method_with_state_the_default_does_not_save_is_refused(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """IVON keeps θ and its optimiser outside Pyro's param store: without its own state_dict it cannot resume."""
    monkeypatch.setattr(IVON, "state_dict", Method.state_dict)
    with pytest.raises(NotImplementedError, match=r"IVON \('ivon'\) keeps training state in optimizer, theta.*"
                                                  r"overrides state_dict/load_state_dict"):
        run("ivon", tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()
    assert run("ivon").steps == 16  # without snapshots it trains


def test_rng_and_param_store_states_round_trip() -> None:
    generator = torch.Generator().manual_seed(1)
    state = rng_state([generator])
    draws = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    set_rng_state(state, [generator])
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    assert torch.equal(draws[0], again[0]) and draws[1:3] == again[1:3] and torch.equal(draws[3], again[3])
    with pytest.raises(ValueError, match=r"1 data-loader generator.*has 0"):
        set_rng_state(state, [])
    data = loader()
    assert data.sampler.generator is data.generator and loader_generators(data) == [data.generator]
    assert loader_generators([(torch.zeros(1), torch.zeros(1))]) == []

    pyro.param("a", torch.ones(2))
    pyro.param("b", torch.full((3,), 2.0), constraint=pyro.distributions.constraints.positive)
    pyro.param("d", torch.zeros(2), constraint=pyro.distributions.constraints.independent(
        pyro.distributions.constraints.real, 1))
    saved = param_store_state()
    assert saved["constraints"] == {"a": "real", "b": "positive", "d": ["independent", "real", 1]}
    pyro.clear_param_store()
    load_param_store_state(saved)
    assert torch.equal(pyro.param("b"), torch.full((3,), 2.0))
    assert param_store_state()["constraints"] == saved["constraints"]
    pyro.param("c", torch.ones(1), constraint=pyro.distributions.constraints.interval(0.0, 2.0))
    with pytest.raises(ValueError, match=r"'c' has a constraint .* not one of the named constraints"):
        param_store_state()


def test_a_process_killed_with_sigkill_resumes_to_the_same_numbers(tmp_path: Path) -> None:
    """The snapshot survives a kill that runs no cleanup at all (no finally blocks, no atexit)."""
    path = tmp_path / "state.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from tests.test_resume import run
        from pyro_ibdr import train
        real_fit = train.fit

        def killed_fit(*args, callbacks=(), **kwargs):
            def kill(epoch, record):
                if epoch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_fit(*args, callbacks=[*callbacks, kill], **kwargs)

        import tests.test_resume as module
        module.fit = killed_fit
        run("ibdr", {str(path)!r})
        raise SystemExit("not killed")
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert load_training_state(path)["step"] == 8
    assert_same_run(run("ibdr", path), run("ibdr"))
