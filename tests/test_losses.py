"""IBDRLoss against plain-PyTorch reference steps: every switch, the units, the site contract, Pyro's interfaces."""

import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI

from pyro_ibdr import OFFICIAL, BayesianLoRA, IBDRLoss, IBDRSettings, ParticleGuide
from pyro_ibdr.methods.bbb import MeanFieldGuide
from tests._dummies.nets import lora_mlp
from tests.test_objective import reference_gram_det

N, LR = 64, 0.01


def setup(num_particles, sigma=0.0, loss=None, num_classes=10):
    model = BayesianLoRA(lora_mlp(num_classes=num_classes).eval(), num_data=N)
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


def reference_nets(model, thetas):
    return [reference_net(model, theta) for theta in thetas]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def shift(params, steps):
    with torch.no_grad():
        for p, step in zip(params, steps, strict=True):
            p.add_(step)


def batch(classes=10):
    generator = torch.Generator().manual_seed(7)
    return torch.rand(16, 64, generator=generator), torch.randint(0, classes, (16,), generator=generator)


def descent_step(model, mu, nets, x, y, ensemble=False):
    """μ − LR · ∇ of the ELBO-units data term at the (already shifted) reference nets."""
    logits = torch.stack([net(x) for net, _ in nets])
    data = F.cross_entropy(logits.mean(0), y) if ensemble else torch.stack(
        [F.cross_entropy(z, y) for z in logits]).mean()
    (N * data).backward()
    return torch.stack([row - LR * flat(p.grad for p in params) for row, (_, params) in zip(mu, nets, strict=True)])


# ------------------------------------------------------------------------------------------- the steps
def test_one_particle_no_noise_no_diversity_is_a_sam_step():
    radius = 0.05
    model, guide, svi = setup(1, loss=IBDRLoss(alpha=0.0, ascent="sam", sam_radius=radius, kl="none"))
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    nets = reference_nets(model, mu0)
    params = nets[0][1]
    grads = torch.autograd.grad(F.cross_entropy(nets[0][0](x), y), params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    shift(params, [radius * g / norm for g in grads])
    expected = descent_step(model, mu0, nets, x, y)
    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-5, atol=1e-6)


def test_no_ascent_no_noise_no_diversity_is_independent_lora_steps():
    model, guide, svi = setup(3, loss=IBDRLoss(alpha=0.0, ascent="none", kl="none"))
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    expected = descent_step(model, mu0, reference_nets(model, mu0), x, y)  # the loss averages the K particles
    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-5, atol=1e-6)


def test_closed_form_ascent_and_projected_dual_step():
    loss = IBDRLoss(alpha=0.0, kl="none", lambda_init=2.0, rho=0.5, dual_lr=0.1)
    model, guide, svi = setup(1, loss=loss)
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    nets = reference_nets(model, mu0)
    grads = torch.autograd.grad(F.cross_entropy(nets[0][0](x), y), nets[0][1])
    cost = float(sum(g.pow(2).sum() for g in grads)) / (2 * 2.0) ** 2  # ||g/(2λ)||²
    shift(nets[0][1], [g / (2 * 2.0) for g in grads])
    expected = descent_step(model, mu0, nets, x, y)
    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-5, atol=1e-6)
    assert loss.terms["cost"] == pytest.approx(cost, rel=1e-4)
    assert loss.terms["step_norm"] == pytest.approx(math.sqrt(cost), rel=1e-4)
    assert loss.terms["theta_norm"] == pytest.approx(float(mu0[0].norm()), rel=1e-5)
    assert loss.lam == pytest.approx(2.0 - 0.1 * (0.5 - cost), rel=1e-6)


def test_the_official_pieces_against_a_reference_step():
    """Ensemble CE of mean logits, the joint clipped ascent, the output cost with its barrier, λ stepped with its
    own rate: one step checked entry by entry."""
    lam, clip, rho, rate = 3.0, 0.05, 0.001, 0.3
    settings = IBDRSettings(alpha=0.0, data_loss="ensemble", clip_norm=clip, cost="output", rho=rho, lambda_init=lam,
                            lambda_bounds=(0.5, 5.0), dual_lr=rate, kl="none")
    loss = IBDRLoss(settings)
    model, guide, svi = setup(2, loss=loss)
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    nets = reference_nets(model, mu0)
    before = torch.stack([net(x) for net, _ in nets]).detach()
    mean_logits = torch.stack([net(x) for net, _ in nets]).mean(0)
    grads = torch.autograd.grad(F.cross_entropy(mean_logits, y), [p for _, ps in nets for p in ps])
    joint = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert joint > clip  # the clip is active
    steps = [g * (clip / joint) / (2 * lam) for g in grads]
    count = len(nets[0][1])
    shift(nets[0][1], steps[:count])
    shift(nets[1][1], steps[count:])
    after = torch.stack([net(x) for net, _ in nets]).detach()
    distance = float((after.mean(0).softmax(-1) - before.mean(0).softmax(-1)).norm(dim=-1).mean())
    cost = distance * math.exp(max(0.0, distance - rho) / 0.01)
    expected = descent_step(model, mu0, nets, x, y, ensemble=True)

    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-5, atol=1e-6)
    assert loss.terms["step_norm"] == pytest.approx(
        (float(flat(steps[:count]).norm()) + float(flat(steps[count:]).norm())) / 2, rel=1e-4)
    assert loss.terms["cost"] == pytest.approx(cost, rel=1e-4)
    assert loss.lam == pytest.approx(lam - rate * (rho - cost), rel=1e-6)


def test_the_volume_diversity_in_the_descent_gradient():
    alpha = 0.5
    model, guide, svi = setup(3, loss=IBDRLoss(alpha=alpha, diversity="volume", jitter=1e-3, ascent="none",
                                                 kl="none"))
    x, y = batch()
    mu0 = guide.loc.detach().clone()
    nets = reference_nets(model, mu0)
    logits = torch.stack([net(x) for net, _ in nets])
    data = torch.stack([F.cross_entropy(z, y) for z in logits]).mean()
    diversity = -reference_gram_det(logits.softmax(-1), y, 1e-3).mean()
    (N * (data + alpha * diversity)).backward()
    expected = torch.stack([row - LR * flat(p.grad for p in ps) for row, (_, ps) in zip(mu0, nets, strict=True)])
    svi.step(x, y)
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-4, atol=1e-6)


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


def test_a_dual_rate_that_follows_the_schedule():
    settings = dict(alpha=0.0, kl="none", lambda_init=2.0, rho=0.5, dual_lr=0.2)
    for follow, factor in ((False, 1.0), (True, 0.25)):
        pyro.clear_param_store()
        loss = IBDRLoss(**settings, dual_schedule=follow)
        _, _, svi = setup(1, loss=loss)
        loss.schedule_factor = 0.25
        svi.step(*batch())
        assert 2.0 - loss.lam == pytest.approx(factor * 0.2 * (0.5 - loss.terms["cost"]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- units
def test_per_example_units_divide_every_term_and_gradient_by_n():
    settings = dict(alpha=0.1, diversity="log_volume", kl="paper", lambda_init=2.0, rho=0.0, dual_lr=0.1)
    x, y = batch()
    results = {}
    for scale in (1.0, 1.0 / N):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = IBDRLoss(**settings)
        model, guide, _ = setup(2, sigma=0.05, loss=loss)
        loc = dict(pyro.get_param_store().named_parameters())["particle_guide.loc"]
        pyro.set_rng_seed(1)
        with poutine.scale(scale=scale):
            (grad,) = torch.autograd.grad(loss.differentiable_loss(model, guide, x, y), loc)
        results[scale] = (grad, dict(loss.terms), loss.lam)
    (grad_elbo, terms_elbo, lam_elbo), (grad_mean, terms_mean, lam_mean) = results[1.0], results[1.0 / N]
    torch.testing.assert_close(grad_mean, grad_elbo / N, rtol=1e-4, atol=1e-8)
    for name in ("loss", "data", "diversity", "kl"):
        assert terms_mean[name] == pytest.approx(terms_elbo[name] / N, rel=1e-5), name
    assert lam_mean == pytest.approx(lam_elbo) and terms_mean["step_norm"] == pytest.approx(terms_elbo["step_norm"])


def test_the_kl_term_in_the_loss_is_the_papers():
    loss = IBDRLoss(alpha=0.0, ascent="none", kl="paper", kl_weight=0.5)
    model, guide, _ = setup(2, sigma=0.2, loss=loss)
    loss.loss(model, guide, *batch())
    mu, d, s = guide.loc.detach(), model.dim, 0.2
    expected = 0.5 / 2 * (float(mu.pow(2).sum()) + d * (s - math.log(s)))
    assert loss.terms["kl"] == pytest.approx(expected, rel=1e-5)


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


# ------------------------------------------------------------------------------------ K > C − 1, errors
def test_more_particles_than_wrong_classes_gives_a_constant_term_and_one_warning():
    loss = IBDRLoss(alpha=0.1, diversity="log_volume")
    _, _, svi = setup(4, loss=loss, num_classes=2)
    x, y = batch(classes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert math.isfinite(svi.step(x, y))
            assert loss.terms["diversity"] == 0.0
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "K = 4 particles exceed C − 1 = 1" in messages[0]


def test_evaluate_loss_runs_under_no_grad_and_keeps_lambda():
    loss = IBDRLoss()
    _, _, svi = setup(2, loss=loss)
    value = svi.evaluate_loss(*batch())
    assert math.isfinite(value) and loss.lam == loss.settings.lambda_init
    assert pyro.param("particle_guide.loc").grad is None


def test_official_loss_settings_need_a_dual_rate():
    with pytest.raises(ValueError, match="dual_lr=None stands for the weights' learning rate"):
        IBDRLoss(OFFICIAL.loss)
    loss = IBDRLoss(OFFICIAL.loss, dual_lr=0.5)
    _, _, svi = setup(4, loss=loss)
    svi.step(*batch())
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


def test_training_without_labels_is_refused():
    _, _, svi = setup(2)
    x, _ = batch()
    with pytest.raises(ValueError, match=r"sampled its 'obs' site: pass the labels, e.g. svi.step\(x, y\)"):
        svi.step(x)


def test_a_missing_site_is_named():
    model, guide, _ = setup(2)

    def no_logits(x, y):
        theta = pyro.sample("theta", model.prior())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=model.logits(theta, x)), obs=y)

    def other_name(x, y):
        return pyro.sample("weights", dist.Normal(torch.zeros(model.dim), 1.0).to_event(1))

    x, y = batch()
    with pytest.raises(ValueError, match=r"needs a model site named 'logits'.*sites are \['theta', 'obs'\]"):
        IBDRLoss().loss(no_logits, guide, x, y)
    with pytest.raises(ValueError, match=r"needs a guide that samples a site named 'theta'.*\['weights'\]"):
        IBDRLoss().loss(model, other_name, x, y)


# --------------------------------------------------------------------------------- Pyro's ELBOModule path
def test_differentiable_loss_through_the_elbo_module_path():
    x, y = batch()
    loss = IBDRLoss(alpha=0.1, diversity="log_volume", lambda_init=2.0, rho=0.0, dual_lr=0.1)
    pyro.set_rng_seed(0)
    model, guide, svi = setup(2, loss=loss)
    mu0 = guide.loc.detach().clone()
    svi.step(x, y)
    expected, expected_lam = guide.loc.detach().clone(), loss.lam

    pyro.clear_param_store()
    module_loss = IBDRLoss(alpha=0.1, diversity="log_volume", lambda_init=2.0, rho=0.0, dual_lr=0.1)
    pyro.set_rng_seed(0)
    model, guide, _ = setup(2, loss=module_loss)
    torch.testing.assert_close(guide.loc.detach(), mu0)
    loss_fn = module_loss(model, guide)  # pyro.infer.elbo.ELBOModule
    assert isinstance(loss_fn, torch.nn.Module)
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    optimizer = torch.optim.SGD(params, lr=LR)
    optimizer.zero_grad()
    loss_fn(x, y).backward()
    optimizer.step()
    torch.testing.assert_close(guide.loc.detach(), expected, rtol=1e-5, atol=1e-7)
    assert module_loss.lam == pytest.approx(expected_lam)
