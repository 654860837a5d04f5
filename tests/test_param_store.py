"""Pyro's global param store: a guide that finds a stored parameter of another shape says so and how to fix it."""

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide, create_method, predictive_probs
from tests._dummies.nets import lora_mlp

X, Y = torch.rand(8, 64), torch.randint(0, 10, (8,))


@pytest.fixture
def model():
    return BayesianLoRA(lora_mlp().eval(), num_data=32)


def _readme_loop(model, num_particles):
    guide = ParticleGuide(model, num_particles=num_particles, sigma=0.1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=IBDRLoss())
    svi.step(X, Y)
    return guide


@pytest.mark.parametrize(("first", "second"), [(4, 2), (2, 4)])
def test_readme_loop_with_another_k_without_clearing_the_store(model, first, second):
    """The issue's instance: K = 4 then K = 2 silently kept 4 particles; K = 2 then K = 4 gave an IndexError."""
    _readme_loop(model, first)
    with pytest.raises(ValueError, match=rf"'particle_guide\.loc' with shape \({first}, {model.dim}\).*needs "
                                         rf"\({second}, {model.dim}\).*pyro\.clear_param_store\(\)"):
        _readme_loop(model, second)
    pyro.clear_param_store()
    guide = _readme_loop(model, second)
    assert guide.loc.shape == (second, model.dim)
    assert predictive_probs(model, guide, X, num_samples=second).shape == (second, 8, 10)


def test_guides_of_one_name_and_shape_share_their_parameters(model):
    """Pyro's semantics, kept: a second guide of the same name and shape continues from the stored tensors;
    a guide of another name starts from its own initialisation."""
    trained = _readme_loop(model, 2).loc.detach().clone()
    same = ParticleGuide(model, 2, sigma=0.1, seed=5)
    torch.testing.assert_close(same.loc.detach(), trained)
    other = ParticleGuide(model, 2, sigma=0.1, seed=5, name="other")
    torch.testing.assert_close(other.loc.detach(), other._init_loc)


def test_learnable_sigma_of_another_shape_is_refused(model):
    pyro.param("particle_guide.scale", torch.ones(3))
    guide = ParticleGuide(model, 2, sigma=0.1, learn_sigma=True)
    with pytest.raises(ValueError, match=r"'particle_guide\.scale' with shape \(3,\).*needs \(\)"):
        _ = guide.scale


@pytest.mark.parametrize(("method", "options", "param"), [
    ("ibdr", {"num_particles": 2}, "ibdr.loc"),
    ("ensemble", {"num_particles": 2}, "ensemble.loc"),
    ("sam", {}, "sam.loc"),
    ("bbb", {"num_samples": 2}, "bbb.loc"),
    ("sa_bnn", {"num_samples": 2}, "sa_bnn.loc"),
    ("map", {}, "AutoDelta.theta"),
    ("mc_dropout", {}, "AutoDelta.theta"),
    ("svgd", {"num_particles": 2}, "svgd_particles"),
])
def test_methods_stepped_by_hand_on_two_models_name_the_stored_parameter(method, options, param):
    """Two models of different D stepped by hand in one process (``fit`` clears the store; a hand loop does not)."""
    small = BayesianLoRA(lora_mlp(rank=2, dropout=0.1).eval(), num_data=32)
    large = BayesianLoRA(lora_mlp(rank=4, dropout=0.1).eval(), num_data=32)
    first = create_method(method, large, **options)
    first.step(X, Y)
    with pytest.raises(ValueError, match=rf"'{param}' with shape .*pyro\.clear_param_store\(\)"):
        second = create_method(method, small, **options)
        second.step(X, Y)
        first.step(X, Y)  # SVGD's fixed parameter name: the second run overwrote the first's particles
