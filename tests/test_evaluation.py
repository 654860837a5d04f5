"""evaluate(): documented keys, valid ranges, agreement with the metric functions, OOD scores, diagrams."""

import pytest
import torch

from pyro_ibdr import BayesianLoRA, predictive_probs
from pyro_ibdr.evaluation import OOD_SCORES, evaluate, fixed_draws
from pyro_ibdr.metrics import evaluate_predictions, ood_metrics, uncertainty_scores
from pyro_ibdr.posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior
from tests._dummies.nets import lora_mlp

IN_KEYS = {
    "accuracy", "ece", "adaptive_ece", "nll", "brier", "disagreement", "pairwise_kl", "expected_entropy",
    "predictive_entropy", "mutual_information", "dpp_log_volume", "ensemble", "num_samples",
}


@pytest.fixture
def setup():
    """A tiny LoRA MLP, 4 distinct particles, 40 labelled inputs in batches of 16 and 24 OOD inputs."""
    model = BayesianLoRA(lora_mlp(num_classes=5).eval(), num_data=40)
    generator = torch.Generator().manual_seed(0)
    particles = model.init_particles(4, generator) + 0.3 * torch.randn(4, model.dim, generator=generator)
    x = torch.rand(40, 64, generator=generator)
    y = torch.randint(5, (40,), generator=generator)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)]
    x_ood = 4 * torch.rand(24, 64, generator=generator) - 2
    ood_loader = [(x_ood[:12], torch.zeros(12, dtype=torch.long)), (x_ood[12:], torch.zeros(12, dtype=torch.long))]
    return model, ParticlePosterior(particles), x, y, x_ood, loader, ood_loader


def test_evaluate_returns_the_documented_keys_in_range(setup):
    model, posterior, *_, loader, _ = setup
    results = evaluate(model, posterior, loader, num_samples=4)
    assert set(results) == IN_KEYS
    assert results["ensemble"] == "mean_probs" and results["num_samples"] == 4
    for key in ("accuracy", "ece", "adaptive_ece", "disagreement"):
        assert 0.0 <= results[key] <= 1.0, key
    assert 0.0 <= results["brier"] <= 2.0
    assert results["nll"] > 0 and results["pairwise_kl"] >= 0 and results["mutual_information"] >= 0
    assert results["predictive_entropy"] >= results["expected_entropy"]
    assert results["disagreement"] > 0  # the particles are different functions


def test_evaluate_agrees_with_the_metric_functions(setup):
    model, posterior, x, y, _, loader, _ = setup
    for mode in ("mean_probs", "mean_logits"):
        results = evaluate(model, posterior, loader, num_samples=4, n_bins=10, ensemble=mode)
        expected = evaluate_predictions(predictive_probs(model, posterior, x, 4), y, n_bins=10, mode=mode)
        assert results["ensemble"] == mode
        for key, value in expected.items():
            assert results[key] == pytest.approx(value, abs=1e-6), (mode, key)


def test_evaluate_reports_ood_detection(setup):
    model, posterior, x, _, x_ood, loader, ood_loader = setup
    results = evaluate(model, posterior, loader, num_samples=4, ood_loader=ood_loader)
    ood_keys = {f"ood_{s}_{m}" for s in OOD_SCORES for m in ("auroc", "aupr", "fpr95")}
    assert set(results) == IN_KEYS | ood_keys
    assert all(0.0 <= results[k] <= 1.0 for k in ood_keys)
    in_scores = uncertainty_scores(predictive_probs(model, posterior, x, 4))
    out_scores = uncertainty_scores(predictive_probs(model, posterior, x_ood, 4))
    for score in OOD_SCORES:
        expected = ood_metrics(in_scores[score], out_scores[score])
        assert results[f"ood_{score}_auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
        assert results[f"ood_{score}_fpr95"] == pytest.approx(expected["fpr95"], abs=1e-6)


def test_a_sampled_posterior_uses_the_same_draws_for_every_loader(setup):
    model, _, x, y, _, loader, _ = setup
    gaussian = GaussianPosterior(model.theta0, torch.full((model.dim,), 0.05))
    first = evaluate(model, gaussian, loader, num_samples=3, seed=5)
    assert evaluate(model, gaussian, loader, num_samples=3, seed=5) == first
    draws = fixed_draws(gaussian, 3, seed=5).sample(3)
    expected = evaluate_predictions(predictive_probs(model, draws, x), y)
    assert first["nll"] == pytest.approx(expected["nll"], abs=1e-6)
    assert evaluate(model, gaussian, loader, num_samples=3, seed=6)["nll"] != first["nll"]


def test_evaluate_rejects_bad_input(setup):
    model, posterior, _, _, _, loader, _ = setup
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        evaluate(model, posterior, loader, num_samples=0)
    with pytest.raises(ValueError, match="yielded no batches"):
        evaluate(model, posterior, [])
    with pytest.raises(ValueError, match="mode must be"):
        evaluate(model, posterior, loader, ensemble="median")


@pytest.mark.filterwarnings("ignore:S = 8 draws exceed C − 1:UserWarning")  # the doubled DPP volume below
def test_point_masses_are_evaluated_on_each_particle_once(setup):
    model, posterior, x, y, _, loader, _ = setup
    results = evaluate(model, posterior, loader)
    assert results["num_samples"] == 4
    expected = evaluate_predictions(predictive_probs(model, posterior, x), y)
    assert results["disagreement"] == pytest.approx(expected["disagreement"], abs=1e-6)
    with pytest.raises(ValueError, match=r"4 point masses: predict with num_samples=4 .* 8 draws would repeat"):
        evaluate(model, posterior, loader, num_samples=8)
    # what the refusal prevents: a particle paired with its own copy looks like agreement
    once = predictive_probs(model, posterior, x)
    twice = evaluate_predictions(once.repeat(2, 1, 1), y)
    assert twice["disagreement"] < expected["disagreement"]


def test_mixture_draws_are_stratified_exactly(setup):
    model, posterior, *_ = setup
    mixture = ParticlePosterior(posterior.particles[:3], sigma=1e-3)
    assert mixture.num_draws() == 9  # the smallest multiple of K = 3 that is at least 8
    draws = mixture.sample(9, generator=torch.Generator().manual_seed(0))["theta"]
    nearest = torch.cdist(draws, mixture.particles).argmin(1)
    assert torch.bincount(nearest, minlength=3).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="8 draws cannot be stratified exactly over K = 3"):
        mixture.sample(8)
    with pytest.raises(ValueError, match="cannot be stratified exactly over K = 3"):
        evaluate(model, mixture, setup[5], num_samples=10)


def test_stored_samples_are_used_each_once(setup):
    model, posterior, _, _, _, loader, _ = setup
    chain = EmpiricalPosterior(posterior.particles)
    assert evaluate(model, chain, loader)["num_samples"] == 4
    assert evaluate(model, chain, loader, num_samples=2)["num_samples"] == 2  # a thinner chain
    with pytest.raises(ValueError, match="holds 4 samples; 5 draws would repeat"):
        evaluate(model, chain, loader, num_samples=5)
