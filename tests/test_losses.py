"""IBDRLoss against plain-PyTorch reference steps, its switches and its errors."""

import copy
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide
from pyro_ibdr.methods.bbb import MeanFieldGuide
from tests._dummies.nets import lora_mlp

N, LR = 64, 0.01


def setup(num_particles, sigma=0.0, loss=None):
    model = BayesianLoRA(lora_mlp().eval(), num_data=N)
    guide = ParticleGuide(model, num_particles, sigma=sigma, seed=3)
    guide.loc.data += 0.1 * torch.randn_like(guide.loc)  # B ≠ 0, so LoRA factors get gradients
    loss = loss or IBDRLoss()
    return model, guide, SVI(model, guide, pyro.optim.SGD({"lr": LR}), loss=loss)


def reference_net(model, theta):
    """A plain copy of the peft network holding the particle θ as its own trainable parameters."""
    net = copy.deepcopy(model.net)
    with torch.no_grad():
        for name, value in model.spec.unflatten(theta).items():
            net.get_parameter(name).copy_(value)
    return net, [net.get_parameter(name) for name in model.spec.names]


def flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def batch():
    generator = torch.Generator().manual_seed(7)
    return torch.rand(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def test_one_particle_no_noise_no_diversity_is_a_sam_step():
    radius = 0.05
    model, guide, svi = setup(1, loss=IBDRLoss(alpha=0.0, ascent="sam", sam_radius=radius, kl="none"))
    x, y = batch()
    mu0 = guide.loc.detach()[0].clone()

    net, params = reference_net(model, mu0)
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(radius * g / norm)
    (N * F.cross_entropy(net(x), y)).backward()
    expected = mu0 - LR * flat_grad(params)

    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach()[0], expected, rtol=1e-5, atol=1e-6)


def test_no_ascent_no_noise_no_diversity_is_independent_lora_steps():
    model, guide, svi = setup(3, loss=IBDRLoss(alpha=0.0, ascent="none", kl="none"))
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    expected = []
    for row in mu0:
        net, params = reference_net(model, row)
        (N / 3 * F.cross_entropy(net(x), y)).backward()  # the loss averages the K particles
        expected.append(row - LR * flat_grad(params))
    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_closed_form_ascent_and_projected_dual_step():
    loss = IBDRLoss(alpha=0.0, kl="none", lambda_init=2.0, rho=0.5, dual_lr=0.1)
    model, guide, svi = setup(1, loss=loss)
    x, y = batch()
    mu0 = guide.loc.detach()[0].clone()

    net, params = reference_net(model, mu0)
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    cost = float(sum(g.pow(2).sum() for g in grads)) / (2 * 2.0) ** 2  # ||g/(2λ)||²
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g / (2 * 2.0))
    (N * F.cross_entropy(net(x), y)).backward()
    expected = mu0 - LR * flat_grad(params)

    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach()[0], expected, rtol=1e-5, atol=1e-6)
    assert loss.terms["cost"] == pytest.approx(cost, rel=1e-4)
    assert loss.lam == pytest.approx(2.0 - 0.1 * (0.5 - cost), rel=1e-6)


def test_diversity_gradient_pushes_particles_apart():
    loss = IBDRLoss(alpha=1.0, diversity="log_volume", ascent="none", kl="none")
    model, guide, _ = setup(3, loss=loss)
    x, y = batch()
    before = model.logits(guide.loc.detach(), x).softmax(-1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    diversity = []
    for _ in range(20):
        svi.step(x, y)
        diversity.append(loss.terms["diversity"])
    after = model.logits(guide.loc.detach(), x).softmax(-1)
    assert diversity[-1] < diversity[0]
    spread = lambda p: float((p - p.mean(0)).abs().mean())  # noqa: E731
    assert spread(after) > spread(before)


def test_kl_terms_match_closed_forms():
    x, y = batch()
    for kind in ("paper", "exact"):
        pyro.clear_param_store()
        loss = IBDRLoss(alpha=0.0, ascent="none", kl=kind, kl_weight=0.5)
        model, guide, _ = setup(2, sigma=0.2, loss=loss)
        loss.loss(model, guide, x, y)
        mu, d, s = guide.loc.detach(), model.dim, 0.2
        if kind == "paper":
            expected = 0.5 * (mu.pow(2).sum(-1).mean() + d * (s - math.log(s)))
        else:
            expected = 0.5 * 0.5 * (mu.pow(2).sum(-1).mean() + d * (s**2 - 1 - math.log(s**2)))
        assert loss.terms["kl"] == pytest.approx(float(expected), rel=1e-5)


def test_monte_carlo_kl_with_a_mean_field_guide_and_refused_for_auxiliary_sites():
    model = BayesianLoRA(lora_mlp().eval(), num_data=N)
    guide = MeanFieldGuide(model, init_scale=0.01, name="mf")
    loss = IBDRLoss(alpha=0.0, kl="mc", ascent="sam")
    loss.num_particles = 2
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    x, y = batch()
    assert math.isfinite(svi.step(x, y))
    assert loss.terms["kl"] != 0
    auto = pyro.infer.autoguide.AutoNormal(model)
    with pytest.raises(ValueError, match="samples θ directly"):
        IBDRLoss(alpha=0.0, kl="mc").loss(model, auto, x, y)


def test_evaluate_loss_runs_under_no_grad_and_keeps_lambda():
    loss = IBDRLoss()
    _, _, svi = setup(2, loss=loss)
    x, y = batch()
    value = svi.evaluate_loss(x, y)
    assert math.isfinite(value) and loss.lam == loss.settings.lambda_init
    assert pyro.param("particle_guide.loc").grad is None


def test_official_preset():
    loss = IBDRLoss.official(lr=0.5)
    s = loss.settings
    assert (s.data_loss, s.diversity, s.cost, s.kl) == ("ensemble", "log_volume", "output", "none")
    assert (loss.lam, s.lambda_bounds, s.clip_norm, s.alpha) == (3.0, (0.5, 5.0), 0.2, 0.02)
    _, _, svi = setup(4, loss=loss)
    x, y = batch()
    svi.step(x, y)
    assert 0.5 <= loss.lam <= 5.0 and loss.lam != 3.0
    assert loss.terms["diversity"] != 0


def test_clear_errors():
    x, y = batch()
    model, guide, svi = setup(4)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        svi.step(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="ascent must be one of"):
        IBDRLoss(ascent="uphill")
    with pytest.raises(ValueError, match="lambda floor > 0"):
        IBDRLoss(lambda_bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        IBDRLoss(alpha=-1.0)
    with pytest.raises(ValueError, match="infinite for point-mass"):
        IBDRLoss(kl="exact").loss(model, guide, x, y)


def test_more_particles_than_wrong_classes_is_refused_for_the_diversity_term():
    model = BayesianLoRA(lora_mlp(num_classes=3).eval(), num_data=N)
    guide = ParticleGuide(model, 3)
    x, y = batch()
    with pytest.raises(ValueError, match="K <= C − 1, got K = 3 particles and C = 3 classes"):
        IBDRLoss(alpha=0.1).loss(model, guide, x, y % 3)
    assert math.isfinite(IBDRLoss(alpha=0.0).loss(model, guide, x, y % 3))
