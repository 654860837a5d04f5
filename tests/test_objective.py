"""Each piece of the IBDR objective against a reference written out independently in the test."""

import math
import warnings

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_ibdr import BayesianLoRA, ParticleGuide
from pyro_ibdr.objective import (
    ClosedFormAscent,
    EnsembleCrossEntropy,
    ExactKL,
    LogVolume,
    MonteCarloKL,
    NormalisedAscent,
    OutputCost,
    PaperKL,
    ParameterCost,
    ParticleCrossEntropy,
    ProjectedDualStep,
    Volume,
    clip_global_norm,
    tie_shared,
)
from tests._dummies.nets import lora_mlp


def random_logits(k=3, b=5, c=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(k, b, c, generator=generator), torch.randint(c, (b,), generator=generator)


# ------------------------------------------------------------------------------------------------ data
def test_particle_cross_entropy_is_the_mean_of_each_particles_own_loss():
    logits, y = random_logits()
    per_particle = torch.stack([
        torch.stack([-torch.log_softmax(logits[i, b], -1)[y[b]] for b in range(5)]) for i in range(3)
    ])
    torch.testing.assert_close(ParticleCrossEntropy()(logits, y), per_particle.mean(0))
    torch.testing.assert_close(ParticleCrossEntropy().ascent(logits, y), per_particle.sum(0))


def test_ensemble_cross_entropy_is_the_loss_of_the_mean_of_logits():
    logits, y = random_logits()
    mean = (logits[0] + logits[1] + logits[2]) / 3
    expected = torch.stack([-torch.log_softmax(mean[b], -1)[y[b]] for b in range(5)])
    torch.testing.assert_close(EnsembleCrossEntropy()(logits, y), expected)
    torch.testing.assert_close(EnsembleCrossEntropy().ascent(logits, y), expected)
    assert not torch.allclose(expected, ParticleCrossEntropy()(logits, y))


# ------------------------------------------------------------------------------------------- diversity
def reference_gram_det(probs, y, jitter):
    """det(G + jI) per example by an explicit loop: drop the true class, normalise, Gram, determinant."""
    k, b, c = probs.shape
    values = []
    for n in range(b):
        keep = [j for j in range(c) if j != int(y[n])]
        vectors = [probs[i, n, keep].double() for i in range(k)]
        unit = torch.stack([v / v.norm() for v in vectors])
        values.append(torch.det(unit @ unit.T + jitter * torch.eye(k, dtype=torch.float64)))
    return torch.stack(values)


def test_volume_and_log_volume_against_an_explicit_determinant():
    logits, y = random_logits(k=3, c=6)
    probs = logits.softmax(-1)
    det = reference_gram_det(probs, y, 1e-3)
    torch.testing.assert_close(Volume(1e-3)(probs, y).double(), -det, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(LogVolume(1e-3)(probs, y).double(), -det.log(), rtol=1e-5, atol=1e-6)
    # orthogonal wrong-class vectors span the unit volume; coinciding ones none
    orthogonal = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[0.5, 0.0, 0.5, 0.0]], [[0.5, 0.0, 0.0, 0.5]]])
    assert float(Volume(0.0)(orthogonal, torch.tensor([0]))) == pytest.approx(-1.0)
    same = orthogonal[[0, 0, 1]]
    assert float(Volume(1e-9)(same, torch.tensor([0]))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k, c", [(4, 2), (3, 3), (1, 5)])
def test_no_signal_cases_give_zero_and_warn_once(k, c):
    logits, y = random_logits(k=k, c=c)
    term = LogVolume()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = term(logits.softmax(-1), y)
        second = term(logits.softmax(-1), y)
    assert torch.equal(first, torch.zeros(5)) and torch.equal(second, torch.zeros(5))
    assert len(caught) == 1
    assert ("exceed C − 1" if k > 1 else "K = 1") in str(caught[0].message)


# ---------------------------------------------------------------------------------------------- ascent
def test_closed_form_and_normalised_ascent_steps():
    grad = torch.randn(3, 1, 7)
    torch.testing.assert_close(ClosedFormAscent()(grad, 2.5), grad / 5.0)
    step = NormalisedAscent(0.3)(grad, 2.5)
    for i in range(3):
        assert float(step[i].norm()) == pytest.approx(0.3, rel=1e-6)
        torch.testing.assert_close(step[i], 0.3 * grad[i] / grad[i].norm())


def test_global_clip_scales_all_particles_jointly():
    grad = torch.tensor([[[3.0, 0.0]], [[0.0, 4.0]]])  # joint norm 5
    torch.testing.assert_close(clip_global_norm(grad, 1.0), grad / 5.0)
    torch.testing.assert_close(clip_global_norm(grad, 10.0), grad)  # below the threshold: unchanged


def test_a_shared_head_is_tied_and_counted_once():
    shared = torch.tensor([False, True])
    grad = torch.tensor([[[3.0, 1.0]], [[4.0, 2.0]]])
    tied = tie_shared(grad, shared)
    torch.testing.assert_close(tied, torch.tensor([[[3.0, 3.0]], [[4.0, 3.0]]]))
    # the joint norm counts the shared entry once: sqrt(3² + 4² + 3²)
    clipped = clip_global_norm(tied, 1.0, shared)
    torch.testing.assert_close(clipped, tied / math.sqrt(34.0))


# ----------------------------------------------------------------------------------------- cost, dual
def test_parameter_cost_is_the_mean_squared_step():
    step = torch.tensor([[[1.0, 2.0]], [[0.0, 3.0]]])
    assert ParameterCost()(step, None, None) == pytest.approx((5.0 + 9.0) / 2)


def test_output_cost_with_its_exponential_barrier():
    before = torch.zeros(2, 1, 2)  # mean logits 0: probabilities (0.5, 0.5)
    after = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    p = torch.tensor([1.0, 0.0]).softmax(-1)
    d = float((p - 0.5).norm())
    assert OutputCost(epsilon=1.0)(None, before, after) == pytest.approx(d)  # below ε: no barrier
    assert OutputCost(epsilon=0.1)(None, before, after) == pytest.approx(d * math.exp((d - 0.1) / 0.01))


def test_projected_dual_step_sign_clamp_and_schedule():
    rule = ProjectedDualStep(rho=0.5, step_size=0.1, bounds=(0.5, 5.0))
    assert rule(3.0, cost=0.9) == pytest.approx(3.0 + 0.1 * 0.4)  # cost above budget: λ rises
    assert rule(3.0, cost=0.1) == pytest.approx(3.0 - 0.1 * 0.4)  # below: λ falls
    assert rule(0.51, cost=0.0) == 0.5 and rule(4.99, cost=10.0) == 5.0
    assert rule(3.0, cost=0.9, schedule_factor=0.25) == pytest.approx(3.04)  # a constant rate ignores m(t)
    scheduled = ProjectedDualStep(rho=0.5, step_size=0.1, bounds=(0.5, 5.0), follow_schedule=True)
    assert scheduled(3.0, cost=0.9, schedule_factor=0.25) == pytest.approx(3.0 + 0.25 * 0.1 * 0.4)


# ------------------------------------------------------------------------------------------------- KL
class Stub:
    def __init__(self, loc, sigma, prior_scale):
        self.loc, self.scale, self.prior_scale = loc, torch.tensor(sigma), prior_scale


@pytest.mark.parametrize("k", [1, 2, 4])
def test_paper_kl_is_the_papers_formula(k):
    loc, sigma, s, beta = torch.randn(k, 9), 0.3, 1.7, 0.5
    stub = Stub(loc, sigma, s)
    d = loc.shape[1]
    written_out = beta / k * (sum(float(mu @ mu) for mu in loc) / s**2 + d * (sigma / s - math.log(sigma / s)))
    assert float(PaperKL(beta)(stub, stub, None, None)) == pytest.approx(written_out, rel=1e-5)
    # point masses: the σ part (infinite, constant) is left out
    stub0 = Stub(loc, 0.0, s)
    assert float(PaperKL(beta)(stub0, stub0, None, None)) == pytest.approx(
        beta / k * float(loc.pow(2).sum()) / s**2, rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exact_kl_is_the_mean_of_the_component_kls(k):
    loc, sigma, s, beta = torch.randn(k, 9), 0.3, 1.7, 0.5
    stub = Stub(loc, sigma, s)
    per_component = [kl_divergence(Normal(mu, sigma), Normal(torch.zeros(9), s)).sum() for mu in loc]
    expected = beta / k * float(sum(per_component))
    assert float(ExactKL(beta)(stub, stub, None, None)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="infinite for point-mass"):
        ExactKL()(Stub(loc, 0.0, s), Stub(loc, 0.0, s), None, None)


def test_monte_carlo_kl_of_point_masses_is_the_map_prior_term():
    import pyro
    from pyro import poutine

    model = BayesianLoRA(lora_mlp().eval(), num_data=32, prior_scale=0.7)
    guide = ParticleGuide(model, 2, seed=0)
    x, y = torch.rand(4, 64), torch.randint(10, (4,))
    with pyro.plate("particles", 2, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, y)
    with pyro.plate("particles", 2, dim=-2):
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(x, y)
    theta = guide.loc.detach()
    log_prior = Normal(torch.zeros_like(theta), 0.7).log_prob(theta).sum(-1)
    value = MonteCarloKL(2.0)(guide, model, model_trace, guide_trace)
    assert float(value.detach()) == pytest.approx(float(-2.0 * log_prior.mean()), rel=1e-5)


def test_pieces_reject_bad_settings():
    with pytest.raises(ValueError, match="SAM radius must be >= 0"):
        NormalisedAscent(-1.0)
    with pytest.raises(ValueError, match="KL weight must be >= 0"):
        PaperKL(-1.0)
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        Volume(-1e-3)
    with pytest.raises(ValueError, match="temperature must be positive"):
        OutputCost(0.1, temperature=0.0)
