"""fit(): every method through one loop, with schedules, logging, callbacks and cost accounting."""

import math
from itertools import pairwise

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import BayesianLoRA, predictive_probs
from pyro_ibdr.methods import METHODS, Method, OptimSettings, create_method
from pyro_ibdr.posterior import ParticlePosterior
from pyro_ibdr.schedules import Constant, WarmupCosine, make_schedule
from pyro_ibdr.train import FitResult, fit
from tests._dummies.data import digits
from tests._dummies.nets import TinyMLP, lora_mlp


@pytest.fixture(scope="module")
def data():
    return digits(n_train=1000)


def loader_of(x, y, batch_size=32, seed=0):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def accuracy(model, result, x, y):
    probs = predictive_probs(model, result.posterior, x, num_samples=result.num_particles_or_samples or 4)
    return float((probs.mean(0).argmax(-1) == y).float().mean())


def test_fit_ibdr_with_steps_learns_and_logs_lambda(data):
    x, y, x_test, y_test = data
    model = BayesianLoRA(lora_mlp(rank=8).eval(), num_data=len(y))
    records = []
    result = fit("ibdr", model, loader_of(x, y), steps=80, optim=OptimSettings(lr=0.02), progress=False,
                 callbacks=[lambda epoch, record: records.append((epoch, record))], num_particles=2, sigma=0.005)
    assert isinstance(result, FitResult) and result.method == "ibdr"
    assert accuracy(model, result, x_test, y_test) > 0.7  # chance is 0.1
    # 1000 examples in batches of 32 = 32 batches per pass: 80 steps are passes of 32, 32 and 16.
    assert [r["steps"] for r in result.history] == [32, 64, 80]
    assert records == list(enumerate(result.history))
    for record in result.history:
        assert {"loss", "data", "diversity", "kl", "cost", "lambda", "sigma", "lr"} <= set(record)
        assert record["sigma"] == pytest.approx(0.005) and record["lambda"] > 0
    assert result.history[-1]["data"] < result.history[0]["data"]
    assert result.state["lambda"] > 0 and "settings" in result.state
    assert result.num_particles_or_samples == 2 and result.passes_per_step == 4 and result.steps == 80


def test_fit_map_with_epochs_learns(data):
    x, y, x_test, y_test = data
    model = BayesianLoRA(lora_mlp(rank=8).eval(), num_data=len(y))
    result = fit("map", model, loader_of(x, y), epochs=3, optim=OptimSettings(lr=0.02), progress=False)
    assert result.steps == 3 * 32 and len(result.history) == 3
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert accuracy(model, result, x_test, y_test) > 0.7
    assert result.num_particles_or_samples == 1 and result.passes_per_step == 1


@pytest.mark.parametrize("name, options, expected_k", [
    ("ibdr", {"num_particles": 2}, 2),
    ("svgd", {"num_particles": 3}, 3),
    ("bbb", {"num_samples": 2}, 2),
    ("map", {}, 1),
])
def test_fit_records_the_cost_of_a_comparison_run(data, name, options, expected_k):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    result = fit(name, model, loader_of(x[:64], y[:64]), steps=3, progress=False, **options)
    assert result.method == name and result.steps == 3
    assert result.num_particles_or_samples == expected_k
    assert result.passes_per_step >= 1
    assert result.wall_time_s > 0 and result.time_per_step_s == pytest.approx(result.wall_time_s / 3)
    assert result.peak_memory_mb > 10  # a Python process with torch loaded holds far more than 10 MB
    assert result.posterior.dim == model.dim


def test_fit_applies_the_schedule_at_every_step(data):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    seen = []

    def halve(step: int) -> float:
        seen.append(step)
        return 0.5

    result = fit("map", model, loader_of(x[:64], y[:64]), steps=5, optim=OptimSettings(lr=0.01), schedule=halve,
                 progress=False)
    assert seen == [0, 1, 2, 3, 4]
    assert all(record["lr"] == pytest.approx(0.005) for record in result.history)


def test_fit_with_a_named_schedule_decays_the_rate(data):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    loader = loader_of(x[:64], y[:64], batch_size=16)
    with pytest.raises(ValueError, match="run of 20 steps is not longer than its warm-up of 500 steps"):
        fit("map", model, loader, steps=20, schedule="warmup_cosine", progress=False)
    result = fit("map", model, loader, steps=20, optim=OptimSettings(lr=0.01), schedule=WarmupCosine(20, 2),
                 progress=False)
    # Warm-up of 2 steps, cosine to 0 at step 20: the rate of step 19 is small, that of step 3 near the base.
    assert result.history[0]["lr"] == pytest.approx(0.01 * WarmupCosine(20, 2)(3))
    assert result.history[-1]["lr"] < 1e-4


def test_fit_is_reproducible_and_clears_the_param_store(data):
    x, y, _, _ = data
    runs = []
    for _ in range(2):
        model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
        runs.append(fit("ibdr", model, loader_of(x[:64], y[:64]), steps=4, seed=3, progress=False, num_particles=2))
    assert torch.equal(runs[0].posterior.particles, runs[1].posterior.particles)
    assert [r["loss"] for r in runs[0].history] == [r["loss"] for r in runs[1].history]


class PixelMLP(TinyMLP):
    """Takes its input by keyword, as Hugging Face models do."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().forward(pixels)


def test_fit_moves_dict_inputs_and_accepts_a_method_instance(data):
    import peft

    x, y, _, _ = data
    torch.manual_seed(0)
    net = peft.get_peft_model(PixelMLP(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"]))
    model = BayesianLoRA(net.eval(), num_data=len(y))
    method = create_method("map", model, optim=OptimSettings(lr=0.01))
    batches = [({"pixels": x[i:i + 16]}, y[i:i + 16]) for i in range(0, 64, 16)]
    result = fit(method, model, batches, epochs=2, device="cpu", progress=False)
    assert result.steps == 8 and all(math.isfinite(r["loss"]) for r in result.history)
    assert not torch.equal(result.posterior.particles[0], model.theta0)


def test_fit_rejects_bad_arguments(data):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    loader = loader_of(x[:64], y[:64])
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        fit("map", model, loader, epochs=1, steps=10)
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        fit("map", model, loader)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        fit("map", model, loader, steps=0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fit("nope", model, loader, steps=1)
    with pytest.raises(ValueError, match="unknown schedule"):
        fit("map", model, loader, steps=1, schedule="linear")
    with pytest.raises(ValueError, match="preset and method options apply only when the method is given by name"):
        fit(create_method("map", model), model, loader, steps=1, num_particles=2)
    with pytest.raises(ValueError, match="yielded no batches in pass 1: the training data is empty"):
        fit("map", model, (b for b in []), steps=1)
    with pytest.raises(ValueError, match="yielded no batches in pass 2; a generator can be iterated only once"):
        fit("map", model, (b for b in [(x[:8], y[:8])]), steps=2, progress=False)
    assert "map" in METHODS


def test_an_empty_loader_is_refused_before_any_step(data, monkeypatch):
    """Both lengths (epochs and steps), an empty dataset and drop_last with too few examples: error, no step."""
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    steps_taken = []
    real_step = METHODS["map"].step
    monkeypatch.setattr(METHODS["map"], "step", lambda self, *a: steps_taken.append(1) or real_step(self, *a))
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8)
    short = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=8, drop_last=True)
    for loader in (empty, short):
        for length in ({"epochs": 1}, {"steps": 3}):
            with pytest.raises(ValueError, match=r"the training loader is empty \(len 0\)"):
                fit("map", model, loader, progress=False, **length)
    assert steps_taken == []
    fit("map", model, loader_of(x[:16], y[:16]), steps=1, progress=False)
    assert steps_taken == [1]  # the spy does see steps


def test_a_nan_input_names_the_step(data):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    bad = x[:16].clone()
    bad[0, 0] = float("nan")
    batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (bad, y[:16])]
    with pytest.raises(FloatingPointError, match="at step 2"):
        fit("map", model, batches, epochs=1, progress=False)


class NaNLoss(Method):
    """Returns a NaN loss from its third step on; no class-level ``name``, so it stays out of the registry."""

    passes_per_step = 1

    def __init__(self, model: BayesianLoRA) -> None:
        super().__init__(model)
        self.name = "nan_loss"
        self.calls = 0

    def step(self, x, y) -> dict[str, float]:
        self.calls += 1
        return {"loss": float("nan") if self.calls >= 3 else 1.0}

    def posterior(self) -> ParticlePosterior:
        return ParticlePosterior(self.model.theta0[None])


def test_a_nan_loss_names_the_step(data):
    x, y, _, _ = data
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    with pytest.raises(FloatingPointError, match="not finite at step 2"):
        fit(NaNLoss(model), model, [(x[:8], y[:8])], steps=5, progress=False)
    assert "nan_loss" not in METHODS


def test_schedules_warm_up_then_decay():
    assert Constant()(0) == Constant()(10_000) == 1.0
    schedule = WarmupCosine(total_steps=1500, warmup_steps=500)
    assert schedule(0) == pytest.approx(1 / 500)
    assert schedule(249) == pytest.approx(0.5)
    assert schedule(499) == schedule(500) == pytest.approx(1.0)
    assert schedule(1000) == pytest.approx(0.5)
    assert schedule(1500) == pytest.approx(0.0) and schedule(3000) == pytest.approx(0.0)
    decay = [schedule(t) for t in range(500, 1501, 50)]
    assert all(a > b for a, b in pairwise(decay))
    assert WarmupCosine(100, 0, min_factor=0.1)(100) == pytest.approx(0.1)
    assert make_schedule("warmup_cosine", 10_000) == WarmupCosine(10_000, 500)
    assert make_schedule("warmup_cosine", 200, warmup_steps=20) == WarmupCosine(200, 20)
    with pytest.raises(ValueError, match="run of 200 steps is not longer than its warm-up of 500 steps"):
        make_schedule("warmup_cosine", 200)


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 500, "warmup_steps": 500}, "run of 500 steps is not longer than its warm-up of 500 steps"),
    ({"total_steps": 10, "warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"total_steps": 10, "warmup_steps": 0, "min_factor": 1.5}, "min_factor"),
])
def test_schedule_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosine(**kwargs)


def test_schedule_steps_are_validated():
    with pytest.raises(ValueError, match="integer >= 0"):
        WarmupCosine(10, 2)(-1)
    with pytest.raises(ValueError, match="integer >= 0"):
        Constant()(1.5)


def test_the_frozen_backbone_is_untouched_by_fit(data):
    x, y, _, _ = data
    net = lora_mlp().eval()
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    model = BayesianLoRA(net, num_data=len(y))
    fit("ibdr", model, loader_of(x[:64], y[:64]), steps=3, progress=False, num_particles=2)
    for name, param in net.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]) and not param.requires_grad
