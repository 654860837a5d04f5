"""BLoB: the variational posterior lives on the LoRA A entries only, its KL is the closed form, and the KL
re-weighting follows the minibatch index."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr.methods import OptimSettings, create_method
from pyro_ibdr.params import is_lora_a
from tests._dummies.data import minibatches
from tests.test_methods import digits_model, train


def blob(**options):
    model, data = digits_model()
    return model, data, create_method("blob", model, optim=OptimSettings(lr=0.02), seed=0, **options)


def test_the_posterior_scale_starts_in_the_papers_range_on_a_only():
    model, _, method = blob(init_scale=0.05)
    scale = method.posterior().scale
    on_a = model.spec.entry_mask(is_lora_a)
    assert on_a.sum() == 8 * 64 + 8 * 32 and not on_a.all()  # rank 8 on fc1 (64 in) and fc2 (32 in)
    assert ((scale[on_a] >= 0.05**2 / 2) & (scale[on_a] <= 0.05**2)).all()  # σ = g², g ~ U(ε/√2, ε)
    assert (scale[~on_a] == 0).all()
    assert torch.equal(method.posterior().loc, model.theta0)


def test_kl_is_the_closed_form_over_the_a_entries_only():
    model, (x, y, _, _), method = blob(prior_scale=0.3)
    train(method, x, y, 5)
    loc, scale = method.posterior().loc, method.posterior().scale
    on_a = model.spec.entry_mask(is_lora_a)
    mu, sigma, beta = loc[on_a].double(), scale[on_a].double(), 0.3
    closed_form = (math.log(beta) - sigma.log() + (sigma**2 + mu**2) / (2 * beta**2) - 0.5).sum()
    assert float(method.kl().detach()) == pytest.approx(float(closed_form), rel=1e-5)
    # B and the head have no prior: moving them leaves the KL unchanged; moving an A mean changes it.
    store_loc = method.guide.loc
    with torch.no_grad():
        store_loc[~on_a] += 1.0
    assert float(method.kl().detach()) == pytest.approx(float(closed_form), rel=1e-5)
    with torch.no_grad():
        store_loc[on_a.nonzero()[0]] += 1.0
    assert float(method.kl().detach()) > float(closed_form) + 1.0


def test_b_and_the_head_stay_deterministic_across_posterior_samples():
    model, (x, y, _, _), method = blob()
    train(method, x, y, 20)
    draws = method.posterior().sample(200, generator=torch.Generator().manual_seed(0))["theta"]
    on_a = model.spec.entry_mask(is_lora_a)
    spread = draws.std(0)
    assert (spread[~on_a] == 0).all()  # every B and head entry is the same in all 200 draws
    scale = method.posterior().scale[on_a]
    assert (spread[on_a] > 0).float().mean() > 0.95  # (σ = g² may shrink below float32 resolution)
    torch.testing.assert_close(spread[on_a], scale, rtol=0.25, atol=1e-6)


def test_the_kl_weight_follows_the_minibatch_index_of_each_epoch():
    _, (x, y, _, _), method = blob()
    logs = [method.step(xb, yb) for xb, yb in minibatches(x, y, 250, 6)]  # N = 1000, B = 250: M = 4
    assert method.batches_per_epoch == 4
    weights = [log["kl_weight"] for log in logs]
    expected = [4 * 2**i / (2**5 - 1) for i in (1, 2, 3, 4, 1, 2)]  # M π_i, π_i = 2^i / (2^(M+1) − 1)
    assert weights == pytest.approx(expected)
    assert sum(expected[:4]) / 4 == pytest.approx(30 / 31)  # an epoch averages (almost) to the ELBO's weight 1
    for log in logs:  # the objective is the data term plus the weighted KL
        assert log["loss"] == pytest.approx(log["data"] + log["kl_weight"] * log["kl"], rel=1e-5)
    _, _, plain = blob(kl_reweighting=False)
    assert plain.step(x[:32], y[:32])["kl_weight"] == 1.0


def test_the_data_term_is_the_scaled_minibatch_nll_averaged_over_the_drawn_thetas():
    model, (x, y, _, _), method = blob(num_samples=3)
    train(method, x, y, 10)  # B ≠ 0: the A noise now changes the function
    xb, yb = x[:50], y[:50]
    pyro.set_rng_seed(7)
    with pyro.plate("draws", 3, dim=-2):
        thetas = method.guide(xb, yb).squeeze(-2).detach()
    nll = torch.stack([F.cross_entropy(model.logits(theta, xb), yb, reduction="sum") for theta in thetas])
    assert not torch.allclose(nll[0], nll[1])
    pyro.set_rng_seed(7)
    log = method.step(xb, yb)
    assert log["data"] == pytest.approx(float(model.num_data / 50 * nll.mean()), rel=1e-5)
    assert method.passes_per_step == 3


def test_bad_settings_and_models_without_lora_a_are_refused():
    with pytest.raises(ValueError, match="prior_scale must be positive"):
        blob(prior_scale=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        blob(num_samples=0)
    from pyro_ibdr import BayesianLoRA
    from pyro_ibdr.params import lora_only
    from tests._dummies.nets import lora_mlp

    heads_only = BayesianLoRA(lora_mlp(), num_data=10,
                              select=lambda name, p: p.requires_grad and not lora_only(name, p))
    with pytest.raises(ValueError, match="needs LoRA A factors"):
        create_method("blob", heads_only)


def test_per_example_units_divide_the_objective_by_n():
    model, (x, y, _, _) = digits_model()
    logs = {}
    for units in ("elbo", "per_example"):
        pyro.clear_param_store()  # the guide's parameters live in Pyro's global store
        method = create_method("blob", model, optim=OptimSettings(lr=0.02, objective_scale=units), seed=0)
        pyro.set_rng_seed(1)  # the same draw of A in both runs
        logs[units] = method.step(x[:32], y[:32])
    assert logs["per_example"]["loss"] == pytest.approx(logs["elbo"]["loss"] / model.num_data, rel=1e-5)
    assert logs["per_example"]["kl"] == pytest.approx(logs["elbo"]["kl"], rel=1e-6)
