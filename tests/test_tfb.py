"""TFB: the low-rank form keeps every particle's function and puts isotropic noise σ·U Z on each full weight
update; the searched σ satisfies the tolerance and the search's next step up does not."""

import warnings

import pytest
import torch

from pyro_ibdr import BayesianLoRA, ParticlePosterior
from pyro_ibdr.methods import OptimSettings, create_method
from pyro_ibdr.params import is_lora_a
from pyro_ibdr.posterior import GaussianPosterior
from pyro_ibdr.tfb import bayesianize, bisect, lora_pairs, low_rank_form
from tests._dummies.nets import lora_mlp
from tests.test_methods import digits_model, train


@pytest.fixture(scope="module")
def trained_ibdr():
    """IBDR with K = 3 point-mass particles trained on digits, and an anchor set of 300 training examples."""
    model, (x, y, x_test, y_test) = digits_model()
    method = create_method("ibdr", model, optim=OptimSettings(lr=0.02), seed=0, num_particles=3, alpha=0.0)
    train(method, x, y, 60)
    anchor = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)]
    return model, method.posterior(), anchor, (x_test, y_test)


def test_the_low_rank_form_keeps_each_function_and_scales_a_rows_by_inverse_singular_values(trained_ibdr):
    model, posterior, _, (x_test, _) = trained_ibdr
    rotated, scale = low_rank_form(model.spec, posterior.particles)
    assert not torch.allclose(rotated, posterior.particles)
    torch.testing.assert_close(model.logits(rotated, x_test), model.logits(posterior.particles, x_test),
                               rtol=1e-4, atol=1e-4)
    on_a = model.spec.entry_mask(is_lora_a)
    assert (scale[:, ~on_a] == 0).all() and (scale[:, on_a] > 0).all()
    views, weights = model.spec.unflatten(rotated), model.spec.unflatten(scale)
    for a_name, b_name in lora_pairs(model.spec):
        b = views[b_name]  # (K, out, r): B' = U diag(d) has orthogonal columns of norms d_i
        gram = b.transpose(1, 2) @ b
        singular = gram.diagonal(dim1=1, dim2=2).sqrt()
        torch.testing.assert_close(gram, torch.diag_embed(singular**2), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(weights[a_name], (1 / singular).unsqueeze(-1).expand_as(weights[a_name]))


def test_the_full_weight_noise_is_isotropic_in_the_column_space_of_b(trained_ibdr):
    model, posterior, _, _ = trained_ibdr
    rotated, scale = low_rank_form(model.spec, posterior.particles[:1])
    tfb = ParticlePosterior(rotated, torch.tensor([0.3]), relative_scale=scale)
    draws = tfb.sample(4000, generator=torch.Generator().manual_seed(0))["theta"]
    views, means = model.spec.unflatten(draws), model.spec.unflatten(rotated[0])
    for a_name, b_name in lora_pairs(model.spec):
        b = means[b_name]
        noise = b @ (views[a_name] - means[a_name])  # (S, out, in): B'(A' − E A') = σ U Z
        u, _, _ = torch.linalg.svd(b, full_matrices=False)
        inside = u.T @ noise
        assert float(inside.std()) == pytest.approx(0.3, rel=0.05)
        assert float((noise - u @ inside).abs().max()) < 1e-4  # nothing outside span(U)
        assert (views[b_name] == b).all()  # B' is not sampled


def test_bisection_returns_the_largest_admissible_sigma_and_the_violating_next_step():
    sigma, following, history = bisect(lambda s: s**2, tolerance=0.25, upper=0.2, iterations=12)
    assert sigma**2 <= 0.25 < following**2 and following - sigma == pytest.approx((0.8 - 0.4) / 2**12)
    assert [s for s, _ in history[:3]] == [0.2, 0.4, 0.8]  # the upper end doubles until the tolerance fails
    with pytest.warns(UserWarning, match="still holds"):
        sigma, following, _ = bisect(lambda s: 0.0, tolerance=0.1, upper=1.0, iterations=3, max_doublings=4)
    assert (sigma, following) == (8.0, None)


def test_each_particles_sigma_satisfies_the_tolerance_and_the_next_step_does_not(trained_ibdr):
    model, posterior, anchor, _ = trained_ibdr
    result = bayesianize(model, posterior, anchor, tolerance=0.02, num_samples=4, iterations=6, seed=1)
    assert result.sigma.shape == (3,) and (result.sigma > 0).all()
    assert result.posterior.sigma.shape == (3,) and not result.posterior.is_point_mass
    x = torch.cat([xb for xb, _ in anchor])
    y = torch.cat([yb for _, yb in anchor])
    rotated, scale = low_rank_form(model.spec, posterior.particles)
    generator = torch.Generator().manual_seed(1)  # rebuild the search's common random numbers, particle by particle

    def accuracy(thetas):
        return float((model.logits(thetas, x).softmax(-1).mean(0).argmax(-1) == y).float().mean())

    for k, (sigma, following) in enumerate(result.brackets):
        noise = torch.randn((4, model.dim), generator=generator)
        baseline = accuracy(rotated[k:k + 1])
        assert result.baseline[k] == pytest.approx(baseline)
        assert baseline - accuracy(rotated[k] + sigma * scale[k] * noise) <= 0.02
        assert baseline - accuracy(rotated[k] + following * scale[k] * noise) > 0.02
        # the bisection started from [0, upper] when the first upper end failed, else from [upper/2, upper]
        upper = max(s for s, _ in result.history[k])
        start = 0.0 if len(result.history[k]) == 6 + 1 else upper / 2
        assert following - sigma == pytest.approx((upper - start) / 2**6)


def test_a_shared_sigma_for_the_mixture_keeps_the_functions_and_draws_fresh_noise(trained_ibdr):
    model, posterior, anchor, (x_test, _) = trained_ibdr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the search must end on a violated tolerance, not at the upper end
        shared = bayesianize(model, posterior, anchor, tolerance=0.02, per_particle=False, num_samples=6,
                             iterations=5)
    assert shared.sigma.shape == () and len(shared.brackets) == 1 and shared.brackets[0][1] is not None
    draws = shared.posterior.sample(6, generator=torch.Generator().manual_seed(0))["theta"]
    assert not torch.allclose(draws[0], draws[3])  # same particle (0 = 3 mod K), different noise
    torch.testing.assert_close(model.logits(shared.posterior.particles, x_test),
                               model.logits(posterior.particles, x_test), rtol=1e-4, atol=1e-4)


def test_tfb_refuses_what_it_cannot_bayesianize(trained_ibdr):
    model, posterior, anchor, _ = trained_ibdr
    with pytest.raises(ValueError, match="point estimates"):
        bayesianize(model, ParticlePosterior(posterior.particles, 0.1), anchor)
    with pytest.raises(ValueError, match="point estimates"):
        bayesianize(model, GaussianPosterior(posterior.particles[0], torch.ones(model.dim)), anchor)
    with pytest.raises(ValueError, match="metric"):
        bayesianize(model, posterior, anchor, metric="f1")
    heads_only = BayesianLoRA(lora_mlp(), num_data=10, select=lambda name, p: p.requires_grad and "head" in name)
    with pytest.raises(ValueError, match="LoRA A and B factors"):
        bayesianize(heads_only, ParticlePosterior(heads_only.theta0.unsqueeze(0)), anchor)
