"""Presets as library objects: what they carry, how fit applies them, and the official preset end to end."""

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import OFFICIAL, PAPER, BayesianLoRA, IBDRSettings, OptimSettings, evaluate, fit
from pyro_ibdr.checkpoint import load_checkpoint, save_checkpoint
from pyro_ibdr.methods import create_method
from pyro_ibdr.schedules import WarmupCosine
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp, lora_vit


@pytest.fixture(scope="module")
def images():
    x, y, x_test, y_test = digits(n_train=1000)
    return x.reshape(-1, 1, 8, 8), y, x_test.reshape(-1, 1, 8, 8), y_test


def loader_of(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def test_the_presets_differ_where_their_sources_do():
    assert PAPER.loss == IBDRSettings()  # the paper's objective is the loss's default: one place to change it
    official = OFFICIAL.loss
    assert (official.data_loss, official.diversity, official.cost, official.kl) == (
        "ensemble", "log_volume", "output", "none")
    assert (official.lambda_init, official.lambda_bounds, official.clip_norm) == (3.0, (0.5, 5.0), 0.2)
    assert official.dual_lr is None and official.dual_schedule  # λ steps with the weights' scheduled rate
    assert (OFFICIAL.optim.optimizer, OFFICIAL.optim.momentum, OFFICIAL.optim.objective_scale) == (
        "sgd", 0.9, "per_example")
    assert (OFFICIAL.schedule, OFFICIAL.warmup_steps, OFFICIAL.batch_size, OFFICIAL.epochs) == (
        "warmup_cosine", 500, 64, 150)
    assert (OFFICIAL.shared_head, OFFICIAL.prediction, PAPER.shared_head, PAPER.prediction) == (
        True, "mean_logits", False, "mean_probs")


def test_replace_routes_optimiser_and_loss_fields():
    preset = OFFICIAL.replace(lr=0.5, rho=0.1, clip_norm=0.15, num_particles=3, augment=True)
    assert (preset.optim.lr, preset.optim.optimizer) == (0.5, "sgd")
    assert (preset.loss.rho, preset.loss.clip_norm, preset.loss.cost) == (0.1, 0.15, "output")
    assert (preset.num_particles, preset.augment, preset.name) == (3, True, "official")
    with pytest.raises(TypeError, match=r"no setting\(s\) \['learning_rate'\]"):
        OFFICIAL.replace(learning_rate=0.1)
    with pytest.raises(ValueError, match="prediction must be"):
        dataclasses.replace(PAPER, prediction="median")
    assert OFFICIAL.method_options("ibdr")["shared_head"] and OFFICIAL.method_options("ibdr")["loss"] == OFFICIAL.loss
    assert OFFICIAL.method_options("bbb") == {"num_samples": 4} and OFFICIAL.method_options("sam") == {}


@pytest.mark.parametrize("lr", [0.1, 0.5])
def test_the_official_preset_learns_with_the_authors_sgd_rates(images, lr):
    """SGD at the authors' rates, 500 → 10 warm-up steps then cosine, in per-example units: the weights learn
    and λ moves inside [0.5, 5]."""
    x, y, x_test, y_test = images
    model = BayesianLoRA(lora_vit().eval(), num_data=len(y))
    preset = OFFICIAL.replace(lr=lr, warmup_steps=10, num_particles=2)
    result = fit("ibdr", model, loader_of(x, y, preset.batch_size), steps=60, preset=preset, progress=False)
    assert result.preset == "official" and result.passes_per_step == 4
    assert result.history[0]["lr"] < lr and result.history[-1]["lr"] < 0.1 * lr  # warm-up, then cosine to 0
    lam = result.state["lambda"]
    assert 0.5 <= lam <= 5.0 and abs(lam - 3.0) > 1e-3, lam
    posterior = result.posterior
    assert posterior.prediction == "mean_logits"
    head = model.spec.head_mask()
    assert torch.equal(posterior.particles[0, head], posterior.particles[1, head])  # one shared head
    metrics = evaluate(model, posterior, [(x_test, y_test)])
    assert metrics["ensemble"] == "mean_logits" and metrics["num_samples"] == 2
    assert metrics["accuracy"] > 0.5, metrics["accuracy"]  # chance is 0.1


def test_elbo_units_make_the_authors_rates_diverge(images):
    """The same preset in Pyro's ELBO units: the gradient is N times larger and SGD at lr 0.1 blows up."""
    x, y, _, _ = images
    model = BayesianLoRA(lora_vit().eval(), num_data=len(y))
    preset = OFFICIAL.replace(objective_scale="elbo", warmup_steps=5, num_particles=2)
    with pytest.raises(FloatingPointError, match="training failed at step"):
        fit("ibdr", model, loader_of(x, y, 64), steps=12, preset=preset, progress=False)


def test_a_run_shorter_than_the_warmup_is_refused_before_training():
    x, y, _, _ = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    with pytest.raises(ValueError, match=r"run of 100 steps is not longer than its warm-up of 500 steps.*warmup_steps"):
        fit("ibdr", model, loader_of(x, y, 16), steps=100, preset="official", progress=False)
    with pytest.raises(ValueError, match="unknown preset 'fancy'"):
        fit("ibdr", model, loader_of(x, y, 16), steps=1, preset="fancy", progress=False)


def test_fit_takes_what_the_preset_has_and_explicit_arguments_win():
    x, y, _, _ = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    preset = OFFICIAL.replace(warmup_steps=2, lr=0.05)
    result = fit("map", model, loader_of(x, y, 16), steps=8, preset=preset, progress=False)
    assert result.preset == "official"
    assert [r["lr"] for r in result.history] == [pytest.approx(0.05 * WarmupCosine(8, 2)(3)),
                                                 pytest.approx(0.05 * WarmupCosine(8, 2)(7))]
    explicit = fit("ibdr", model, loader_of(x, y, 16), steps=4, preset=preset, optim=OptimSettings(lr=0.01),
                   schedule="constant", num_particles=3, alpha=0.0, progress=False)
    assert [r["lr"] for r in explicit.history] == [0.01]
    assert explicit.config["num_particles"] == 3 and explicit.config["loss"]["alpha"] == 0.0
    assert explicit.config["loss"]["cost"] == "output" and explicit.config["shared_head"]  # the rest: the preset's


def test_a_methods_own_rate_reaches_its_optimiser_and_an_explicit_rate_clears_it():
    x, y, _, _ = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    preset = PAPER.replace(method_lr=(("ivon", 0.3),))
    assert preset.optim_for("ivon").lr == 0.3 and preset.optim_for("map") == PAPER.optim
    rates = {m: [r["lr"] for r in fit(m, model, loader_of(x, y, 16), steps=4, preset=preset,
                                      progress=False).history] for m in ("ivon", "map")}
    assert rates == {"ivon": [0.3], "map": [PAPER.optim.lr]}
    assert preset.replace(lr=0.01).method_lr == () and preset.replace(lr=0.01).optim_for("ivon").lr == 0.01
    assert preset.replace(epochs=3).method_lr == (("ivon", 0.3),)  # only a new rate clears them
    with pytest.raises(ValueError, match="registered methods once each"):
        PAPER.replace(method_lr=(("ivon", 0.1), ("mystery", 0.1)))
    with pytest.raises(ValueError, match="registered methods once each"):
        PAPER.replace(method_lr=(("ivon", 0.1), ("ivon", 0.2)))
    with pytest.raises(ValueError, match="must be positive"):
        PAPER.replace(method_lr=(("ivon", 0.0),))


def test_the_ibdr_method_steps_lambda_with_the_scheduled_weights_rate():
    """dual_lr=None is the weights' base rate (0.2); set_lr(0.05) makes the multiplier m(t) = 1/4."""
    x, y, _, _ = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    method = create_method("ibdr", model, optim=OFFICIAL.replace(lr=0.2).optim, **OFFICIAL.method_options("ibdr"))
    assert method.loss.settings.dual_lr == 0.2
    method.set_lr(0.05)
    terms = method.step(x[:16], y[:16])
    assert 3.0 - method.loss.lam == pytest.approx(0.25 * 0.2 * (OFFICIAL.loss.rho - terms["cost"]), rel=1e-6)


def test_the_prediction_mode_survives_a_checkpoint(tmp_path):
    x, y, x_test, y_test = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    result = fit("ibdr", model, loader_of(x, y, 16), steps=2, preset=OFFICIAL.replace(warmup_steps=1),
                 num_particles=2, progress=False)
    path = save_checkpoint(tmp_path / "run.pt", result.posterior, spec=model.spec, method="ibdr", config={}, seed=0)
    loaded = load_checkpoint(path).posterior
    assert loaded.prediction == "mean_logits"
    assert evaluate(model, loaded, [(x_test, y_test)]) == evaluate(model, result.posterior, [(x_test, y_test)])
    assert evaluate(model, loaded, [(x_test, y_test)], ensemble="mean_probs")["ensemble"] == "mean_probs"
