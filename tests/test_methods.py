"""The baseline inference methods: each learns digits, and each one's defining mechanism does what it says."""

import math
from functools import partial

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_ibdr import BayesianLoRA, predictive_probs
from pyro_ibdr.initialisation import seeded_particles
from pyro_ibdr.kernels import FlooredRBFSteinKernel, ScalarRBFKernel
from pyro_ibdr.methods import METHODS, LaplacePosterior, OptimSettings, create_method
from pyro_ibdr.methods.base import Adapter
from pyro_ibdr.posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp, plain_mlp, pvera_mlp

BASELINES = ("map", "ensemble", "sam", "bbb", "svgd", "sa_bnn", "sgld", "mc_dropout",
             "mle", "fft", "laplace", "ivon", "pvera")
# PVeRA's adapters are vectors over shared random projections: at rank 8 they learn digits slowly (0.65 after 150
# steps), at its recommended larger ranks they learn (r = 64: 0.79).
NETWORKS = {"lora": partial(lora_mlp, rank=8), "full": plain_mlp, "pvera": partial(pvera_mlp, rank=64)}


def digits_model(dropout: float = 0.0, prior_scale: float = 1.0,
                 adapter: Adapter = "lora") -> tuple[BayesianLoRA, tuple]:
    """A TinyMLP on digits with the adapter a method expects (LoRA rank 8, none, or PVeRA r = 64)."""
    data = digits(n_train=1000)
    net = NETWORKS[adapter](dropout=dropout).eval()
    return BayesianLoRA(net, num_data=len(data[1]), prior_scale=prior_scale), data


def train(method, x, y, steps: int) -> list[dict[str, float]]:
    return [method.step(xb, yb) for xb, yb in minibatches(x, y, 32, steps)]


# Plain SGD drift (SGLD) is slower than Adam and unstable on this net above lr ≈ 0.3. IVON's rate is an SGD-sized
# step; with ess = N = 1000 its weight noise (std ≈ 0.03) slows it down, so it runs with ess = 10 N.
LEARNING = {
    "map": ({}, 0.02, 150, ParticlePosterior),
    "ensemble": ({"num_particles": 3}, 0.02, 150, ParticlePosterior),
    "sam": ({"rho": 0.05}, 0.02, 150, ParticlePosterior),
    "bbb": ({"num_samples": 3, "kl_anneal_steps": 50}, 0.02, 150, GaussianPosterior),
    "svgd": ({"num_particles": 3}, 0.02, 150, ParticlePosterior),
    "sa_bnn": ({"num_samples": 3}, 0.02, 150, GaussianPosterior),
    "sgld": ({"burn_in": 100, "thin": 10, "num_samples": 8}, 0.2, 200, EmpiricalPosterior),
    "mc_dropout": ({}, 0.02, 150, ParticlePosterior),
    "mle": ({}, 0.02, 150, ParticlePosterior),
    "fft": ({}, 0.01, 150, ParticlePosterior),
    "laplace": ({"jacobian_batch_size": 16}, 0.02, 150, LaplacePosterior),
    "ivon": ({"ess": 10_000.0}, 1.0, 150, GaussianPosterior),
    "pvera": ({}, 0.05, 150, ParticlePosterior),
}


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_learns_digits(name):
    options, lr, steps, posterior_type = LEARNING[name]
    model, (x, y, x_test, y_test) = digits_model(dropout=0.2 if name == "mc_dropout" else 0.0,
                                                 adapter=METHODS[name].adapter)
    theta0 = model.theta0.clone()
    method = create_method(name, model, optim=OptimSettings(lr=lr), seed=0, **options)
    logs = train(method, x, y, steps)
    method.finalize([(x[i : i + 100], y[i : i + 100]) for i in range(0, len(y), 100)])
    assert all(math.isfinite(log["loss"]) for log in logs)
    assert torch.equal(model.theta0, theta0), "the LoRA initialisation was modified in place"
    posterior = method.posterior()
    assert isinstance(posterior, posterior_type)
    probs = predictive_probs(model, posterior, x_test)
    assert probs.shape == (posterior.num_draws(), len(y_test), 10)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    accuracy = float((probs.mean(0).argmax(-1) == y_test).float().mean())
    assert accuracy > 0.7, accuracy  # chance is 0.1


def test_passes_per_step_count_forward_backward_passes():
    models = {adapter: digits_model(dropout=0.1, adapter=adapter)[0] for adapter in NETWORKS}
    expected = {
        ("map", ()): 1,
        ("mle", ()): 1,
        ("fft", ()): 1,
        ("laplace", ()): 1,
        ("mc_dropout", ()): 1,
        ("pvera", ()): 1,
        ("sgld", ()): 1,
        ("ivon", ()): 1,
        ("ivon", (("mc_samples", 3),)): 3,
        ("sam", ()): 2,
        ("ensemble", (("num_particles", 3),)): 3,
        ("svgd", (("num_particles", 5),)): 5,
        ("bbb", (("num_samples", 3),)): 3,
        ("sa_bnn", (("num_samples", 3),)): 6,
    }
    for (name, options), passes in expected.items():
        model = models[METHODS[name].adapter]
        assert create_method(name, model, **dict(options)).passes_per_step == passes, name


def point(posterior):
    """The posterior's location: particles (K, D) or the Gaussian mean (D,)."""
    return posterior.particles if isinstance(posterior, ParticlePosterior) else posterior.loc


@pytest.mark.parametrize("name, options", [
    ("map", {}), ("ensemble", {"num_particles": 2}), ("sam", {}), ("bbb", {"num_samples": 2}),
    ("sa_bnn", {"num_samples": 2}), ("svgd", {"num_particles": 2}),
    ("ibdr", {"num_particles": 2, "sigma": 0.01, "alpha": 0.1, "diversity": "log_volume"}),
])
def test_per_example_units_are_elbo_units_divided_by_n(name, options):
    """A step at rate lr in per-example units equals a step at lr/N in ELBO units (plain SGD)."""
    model, (x, y, _, _) = digits_model()
    steps = {}
    for scale, lr in (("elbo", 0.05 / model.num_data), ("per_example", 0.05)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = OptimSettings(lr=lr, optimizer="sgd", momentum=0.0, objective_scale=scale)
        method = create_method(name, model, optim=optim, seed=0, **options)
        before = point(method.posterior())
        method.step(x[:32], y[:32])
        steps[scale] = point(method.posterior()) - before
    assert steps["elbo"].abs().max() > 1e-4
    torch.testing.assert_close(steps["per_example"], steps["elbo"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale, lr", [("per_example", 0.05), ("elbo", 5e-5)])
def test_ensemble_members_equal_separate_map_runs_with_matching_seeds(scale, lr):
    model, (x, y, _, _) = digits_model()
    optim = OptimSettings(lr=lr, optimizer="sgd", momentum=0.9, objective_scale=scale)
    batches = list(minibatches(x, y, 32, 6))
    ensemble = create_method("ensemble", model, optim=optim, seed=4, num_particles=3)
    for xb, yb in batches:
        ensemble.step(xb, yb)
    members = ensemble.posterior().particles
    assert ensemble.passes_per_step == 3
    for k in range(3):
        pyro.clear_param_store()
        single = create_method("map", model, optim=optim, seed=4 + k)
        torch.testing.assert_close(single.theta(), seeded_particles(model, 3, 4)[k])
        for xb, yb in batches:
            single.step(xb, yb)
        assert not torch.allclose(single.theta(), seeded_particles(model, 3, 4)[k])
        torch.testing.assert_close(members[k], single.theta(), rtol=1e-4, atol=1e-6)


def test_unknown_method_names_the_known_ones():
    model, _ = digits_model()
    with pytest.raises(ValueError, match="unknown method 'nope'") as info:
        create_method("nope", model)
    assert all(name in str(info.value) for name in (*BASELINES, "ibdr"))
    assert set(BASELINES) <= set(METHODS)


def test_scalar_rbf_kernel_is_the_median_heuristic_with_pyros_gradient_convention():
    particles = torch.randn(5, 7, dtype=torch.float64)
    kernel = ScalarRBFKernel()
    log_kernel, grad = kernel.log_kernel_and_grad(particles)
    sq_dist = torch.cdist(particles, particles).pow(2)
    upper = sq_dist[torch.triu_indices(5, 5, offset=1).unbind()]
    h = upper.median() / math.log(6)
    torch.testing.assert_close(log_kernel.sum(-1).exp(), torch.exp(-sq_dist / h))
    torch.testing.assert_close(kernel.kernel_matrix(particles), torch.exp(-sq_dist / h))
    # the median pair of particles has k = 1/(K + 1)
    assert float(torch.exp(-upper.median() / h)) == pytest.approx(1 / 6)
    # SVGD adds Σ_m k(x_n, x_m) grad[n, m] to the descent direction: it must be −Σ_m ∇_{x_m} k(x_m, x_n).
    x = particles.clone().requires_grad_(True)
    k = torch.exp(-torch.cdist(x, x.detach()).pow(2) / h)  # k[m, n] as a function of x_m only
    repulsive = torch.einsum("nm,nmd->nd", log_kernel.sum(-1).exp(), grad)
    for n in range(5):
        (grad_k,) = torch.autograd.grad(k[:, n].sum(), x, retain_graph=True)
        torch.testing.assert_close(repulsive[n], -grad_k.sum(0))
    with pytest.raises(ValueError, match="K >= 2"):
        kernel.bandwidth(particles[:1])


def test_svgd_particles_interact_through_the_scalar_kernel():
    model, (x, y, _, _) = digits_model()
    runs = {}
    for kernel in ("scalar_rbf", "pyro_rbf"):
        method = create_method("svgd", model, optim=OptimSettings(lr=0.02), num_particles=3, kernel=kernel)
        start = method.particles()
        train(method, x, y, 25)
        runs[kernel] = method.particles()
        assert method.state()["kernel"] == kernel
    assert torch.allclose(start, seeded_particles(model, 3, 0))
    particles = runs["scalar_rbf"]
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    # The scalar kernel couples the particles (median pair: 1/(K+1) = 0.25); Pyro's per-dimension RBF
    # multiplies D = 1610 factors and underflows, so its run is K independent MAP fits from the same start.
    assert ScalarRBFKernel().kernel_matrix(particles)[off_diagonal].min() > 0.05
    log_kernel, _ = FlooredRBFSteinKernel().log_kernel_and_grad(runs["pyro_rbf"])
    assert log_kernel.sum(-1).exp()[off_diagonal].max() < 1e-6
    difference = (particles - runs["pyro_rbf"]).norm(dim=1)
    movement = (runs["pyro_rbf"] - start).norm(dim=1)
    assert (difference > 0.05 * movement).all(), (difference, movement)


def test_bbb_kl_is_the_closed_form_gaussian_kl_and_is_annealed():
    model, (x, y, _, _) = digits_model(prior_scale=0.5)
    method = create_method("bbb", model, optim=OptimSettings(lr=0.02), num_samples=2, kl_anneal_steps=4)
    loc, scale = method.posterior().loc, method.posterior().scale
    assert torch.equal(loc, model.theta0) and torch.allclose(scale, torch.full_like(scale, 1e-3))
    logs = train(method, x, y, 2)
    assert [log["kl_weight"] for log in logs] == [0.25, 0.5]
    loc, scale = method.loc_scale()
    s2 = 0.25
    closed_form = 0.5 * ((scale**2 + loc**2) / s2 - 1 - torch.log(scale**2 / s2)).sum()
    torch.testing.assert_close(method.kl(), closed_form)
    # With the likelihood hidden, the negative ELBO the method optimises is w_t · KL(q ‖ p).
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    kl_only = poutine.block(method.svi.model, hide=["obs"])
    assert elbo.loss(kl_only, method.svi.guide, x[:8], y[:8]) == pytest.approx(0.75 * float(closed_form), rel=1e-4)
    train(method, x, y, 2)
    assert elbo.loss(kl_only, method.svi.guide, x[:8], y[:8]) == pytest.approx(float(method.kl()), rel=1e-4)


def test_sgld_noise_and_drift_follow_the_step_size(monkeypatch):
    model, (x, y, _, _) = digits_model()
    for lr, temperature in ((0.1, 1.0), (0.4, 0.5)):
        method = create_method("sgld", model, optim=OptimSettings(lr=lr), temperature=temperature)
        monkeypatch.setattr(method, "potential_and_grad", lambda x, y: (torch.tensor(0.0), torch.zeros(model.dim)))
        before = method.theta.clone()
        method.step(x[:8], y[:8])
        eps = 2 * lr / model.num_data
        assert method.step_size == pytest.approx(eps)
        assert float((method.theta - before).std()) == pytest.approx(math.sqrt(eps * temperature), rel=0.1)
    gradient = torch.randn(model.dim)
    method = create_method("sgld", model, optim=OptimSettings(lr=0.1), temperature=0.0)
    monkeypatch.setattr(method, "potential_and_grad", lambda x, y: (torch.tensor(0.0), gradient))
    method.set_lr(0.3)
    before = method.theta.clone()
    method.step(x[:8], y[:8])
    torch.testing.assert_close(method.theta, before - 0.5 * (0.6 / model.num_data) * gradient)


def test_sgld_keeps_a_thinned_fifo_buffer_after_burn_in(monkeypatch):
    model, (x, y, _, _) = digits_model()
    method = create_method("sgld", model, burn_in=5, thin=2, num_samples=3)
    monkeypatch.setattr(method, "potential_and_grad", lambda x, y: (torch.tensor(0.0), torch.zeros(model.dim)))
    states = []
    for _ in range(15):
        method.step(x[:8], y[:8])
        states.append(method.theta.clone())
    kept = method.posterior().samples
    torch.testing.assert_close(kept, torch.stack([states[10], states[12], states[14]]))


def test_mc_dropout_samples_masks_for_one_theta():
    model, (x, y, x_test, _) = digits_model(dropout=0.3)
    method = create_method("mc_dropout", model, optim=OptimSettings(lr=0.02))
    train(method, x, y, 5)
    assert not model.net.training, "the network's mode was not restored after a training step"
    posterior = method.posterior()
    assert posterior.dropout_at_test and posterior.num_particles == 1
    probs = predictive_probs(model, posterior, x_test[:50], num_samples=4)
    assert not torch.allclose(probs[0], probs[1])
    assert not model.net.training
    without_dropout, _ = digits_model(dropout=0.0)
    with pytest.raises(ValueError, match="dropout module"):
        create_method("mc_dropout", without_dropout)
