import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide, predictive_probs
from tests._dummies.nets import lora_mlp


@pytest.fixture
def model():
    return BayesianLoRA(lora_mlp().eval(), num_data=32)


def test_particles_start_as_independent_lora_inits(model):
    guide = ParticleGuide(model, 3, seed=1)
    params = [model.spec.unflatten(row) for row in guide.loc.detach()]
    a_name = next(n for n in model.spec.names if ".lora_A." in n)
    b_name = next(n for n in model.spec.names if ".lora_B." in n)
    head_name = next(n for n in model.spec.names if "modules_to_save" in n)
    assert not torch.allclose(params[0][a_name], params[1][a_name])
    fan_in = params[0][a_name].shape[1]
    assert params[0][a_name].abs().max() <= fan_in**-0.5
    assert all(torch.count_nonzero(p[b_name]) == 0 for p in params)
    head = model.net.get_parameter(head_name)
    assert all(torch.equal(p[head_name], head) for p in params)


def test_stratified_posterior_samples(model):
    guide = ParticleGuide(model, 4, sigma=0.0)
    samples = guide.posterior().sample(8)["theta"]
    torch.testing.assert_close(samples, guide.loc.detach().repeat(2, 1))
    noisy = ParticleGuide(model, 4, sigma=0.1, name="noisy").posterior().sample(4000)["theta"]
    assert abs(float((noisy[::4] - pyro.param("noisy.loc")[0].detach()).std()) - 0.1) < 0.01


def test_predictive_draws_follow_the_components(model):
    guide = ParticleGuide(model, 2, sigma=0.0)
    guide.loc.data += 0.3 * torch.randn_like(guide.loc)
    x = torch.rand(5, 64)
    probs = predictive_probs(model, guide, x, num_samples=4)
    per_particle = model.logits(guide.loc.detach(), x).softmax(-1)
    torch.testing.assert_close(probs, per_particle.repeat(2, 1, 1))
    samples = predictive_probs(model, {"theta": guide.loc.detach()}, x)
    torch.testing.assert_close(samples, per_particle)


def test_learnable_sigma_is_trained(model):
    guide = ParticleGuide(model, 2, sigma=0.05, learn_sigma=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=IBDRLoss(alpha=0.0, kl="exact"))
    svi.step(torch.rand(8, 64), torch.randint(0, 10, (8,)))
    assert float(pyro.param("particle_guide.scale")) != pytest.approx(0.05, abs=1e-6)


def test_mixture_density(model):
    guide = ParticleGuide(model, 2, sigma=0.1)
    theta = guide.loc.detach()[0]
    expected = torch.logsumexp(
        torch.stack([pyro.distributions.Normal(mu, 0.1).log_prob(theta).sum() for mu in guide.loc.detach()]), 0
    ) - torch.log(torch.tensor(2.0))
    torch.testing.assert_close(guide.mixture().log_prob(theta), expected)
    with pytest.raises(ValueError, match="point masses"):
        ParticleGuide(model, 2, sigma=0.0, name="delta").mixture()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="num_particles must be >= 1"):
        ParticleGuide(model, 0)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        ParticleGuide(model, 2, sigma=-0.1)
    with pytest.raises(ValueError, match="learnable sigma needs a positive"):
        ParticleGuide(model, 2, sigma=0.0, learn_sigma=True)
    with pytest.raises(ValueError, match="init_loc must have shape"):
        ParticleGuide(model, 2, init_loc=torch.zeros(3, model.dim))


def test_particles_are_seeded_one_generator_each(model):
    guide = ParticleGuide(model, 3, seed=5)
    for k in range(3):
        expected = model.init_particles(1, torch.Generator().manual_seed(5 + k))[0]
        torch.testing.assert_close(guide.loc.detach()[k], expected)


def test_draws_in_a_plate_must_stratify_exactly(model):
    guide = ParticleGuide(model, 2, sigma=0.1)
    x = torch.rand(5, 64)
    assert predictive_probs(model, guide, x).shape == (2, 5, 10)  # None: each component once
    with pytest.raises(ValueError, match=r"3 draws of the plate .* cannot be stratified exactly over K = 2"):
        predictive_probs(model, guide, x, num_samples=3)


def test_a_shared_head_is_one_parameter_that_gets_the_sum_of_the_particles_gradients(model):
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    head = model.spec.head_mask()
    assert 0 < int(head.sum()) < model.dim
    init = model.init_particles(3, torch.Generator().manual_seed(0))
    init[:, ~head] += 0.1 * torch.randn(3, int((~head).sum()))  # B ≠ 0
    loss = IBDRLoss(alpha=0.1, diversity="log_volume", ascent="none", kl="paper")

    free = ParticleGuide(model, 3, init_loc=init, name="free")
    loss.loss_and_grads(model, free, x, y)
    per_particle = pyro.get_param_store().get_param("free.loc").grad

    shared = ParticleGuide(model, 3, init_loc=init, shared_head=True, name="tied")
    torch.testing.assert_close(shared.loc.detach(), init)
    loss.loss_and_grads(model, shared, x, y)
    store = dict(pyro.get_param_store().named_parameters())
    assert set(store) >= {"tied.particle_loc", "tied.shared_loc"} and "tied.loc" not in store
    torch.testing.assert_close(store["tied.shared_loc"].grad, per_particle[:, head].sum(0))
    torch.testing.assert_close(store["tied.particle_loc"].grad, per_particle[:, ~head])

    svi = SVI(model, shared, pyro.optim.SGD({"lr": 0.05}), loss=IBDRLoss(alpha=0.1, diversity="log_volume"))
    for _ in range(3):
        svi.step(x, y)
    particles = shared.posterior().particles
    assert torch.equal(particles[0, head], particles[1, head]) and torch.equal(particles[0, head], particles[2, head])
    assert not torch.equal(particles[0, head], init[0, head])  # the head trained
    assert not torch.equal(particles[0, ~head], particles[1, ~head])


def test_a_shared_head_needs_equal_initial_heads(model):
    init = model.init_particles(2) + 0.1 * torch.randn(2, model.dim)
    with pytest.raises(ValueError, match="equal head"):
        ParticleGuide(model, 2, init_loc=init, shared_head=True)
