"""ParticlePosterior: a shared σ or one per particle, and per-entry multipliers that shape each component's noise."""

import pytest
import torch

from pyro_ibdr import ParticlePosterior, Posterior

PARTICLES = torch.arange(12.0).reshape(3, 4)


def spread(posterior: ParticlePosterior, particle: int) -> torch.Tensor:
    draws = posterior.sample(3 * 6000, generator=torch.Generator().manual_seed(0))["theta"]
    return draws[particle::3].std(0)  # draw s comes from particle s mod K


def test_a_shared_sigma_is_isotropic_and_zero_is_point_masses():
    torch.testing.assert_close(spread(ParticlePosterior(PARTICLES, 0.5), 1), torch.full((4,), 0.5), rtol=0.05, atol=0)
    points = ParticlePosterior(PARTICLES)
    assert points.is_point_mass and torch.equal(points.sample(6)["theta"], PARTICLES.repeat(2, 1))


def test_one_sigma_per_particle_times_per_entry_multipliers():
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    posterior = ParticlePosterior(PARTICLES, torch.tensor([0.1, 0.2, 0.0]), relative_scale=weights)
    for particle, sigma in enumerate((0.1, 0.2, 0.0)):
        torch.testing.assert_close(spread(posterior, particle), sigma * weights, rtol=0.05, atol=0)
    assert not posterior.is_point_mass
    torch.testing.assert_close(posterior.scales(), torch.tensor([0.1, 0.2, 0.0]).unsqueeze(1) * weights)
    per_entry = ParticlePosterior(PARTICLES, 0.3, relative_scale=torch.eye(3, 4))  # (K, D) multipliers
    torch.testing.assert_close(spread(per_entry, 2), torch.tensor([0.0, 0.0, 0.3, 0.0]), rtol=0.05, atol=0)
    assert ParticlePosterior(PARTICLES, 0.3, relative_scale=torch.zeros(4)).is_point_mass


def test_state_dicts_round_trip_old_and_new_layouts():
    posterior = ParticlePosterior(PARTICLES, torch.tensor([0.1, 0.2, 0.3]), relative_scale=torch.ones(4))
    loaded = Posterior.from_state_dict(posterior.state_dict())
    assert torch.equal(loaded.sigma, posterior.sigma) and torch.equal(loaded.relative_scale, posterior.relative_scale)
    old = {"kind": "particles", "tensors": {"particles": PARTICLES, "sigma": torch.tensor(0.1)}}
    assert Posterior.from_state_dict(old).relative_scale is None  # a checkpoint from before the extension


@pytest.mark.parametrize(("sigma", "scale", "message"), [
    (torch.tensor([0.1, 0.2]), None, "one value per particle"),
    (-0.1, None, ">= 0"),
    (float("nan"), None, "finite"),
    (0.1, torch.ones(5), "relative_scale must have shape"),
    (0.1, -torch.ones(4), "relative_scale must have shape"),
])
def test_bad_scales_are_refused(sigma, scale, message):
    with pytest.raises(ValueError, match=message):
        ParticlePosterior(PARTICLES, sigma, relative_scale=scale)
