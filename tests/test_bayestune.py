"""BayesTune: the SGLD step on (θ, λ) against a hand-written one, the top-k selection, and a stage 2 that
moves only the selected entries."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr import fit
from pyro_ibdr.methods import OptimSettings, create_method
from tests._dummies.data import minibatches
from tests.test_methods import digits_model, train

SGD = OptimSettings(lr=0.05, optimizer="sgd", momentum=0.0)


def mean_nll_grad(model, theta, x, y):
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.logits(theta, x), y), theta)
    return grad


def test_stage_one_steps_are_the_papers_langevin_update_without_noise():
    model, (x, y, _, _) = digits_model()
    n_hat, alpha, beta, scale_lr = 1e5, 0.01, 100.0, 1e-5
    method = create_method("bayestune", model, optim=SGD, selection_steps=10, temperature=0.0,
                           effective_num_data=n_hat, shape=alpha, rate=beta, scale_lr=scale_lr)
    theta0, lam = model.theta0.clone(), torch.full_like(model.theta0, 1e-4)
    theta = theta0.clone()
    for xb, yb in minibatches(x, y, 32, 3):
        # U/N̂ = −[log Gamma(λ; α, β) + log Laplace(θ; θ0, λ)]/N̂ + mean NLL
        grad_theta = torch.sign(theta - theta0) / lam / n_hat + mean_nll_grad(model, theta, xb, yb)
        grad_lam = ((1 - alpha) / lam + beta + 1 / lam - (theta - theta0).abs() / lam**2) / n_hat
        theta, lam = theta - 0.05 * grad_theta, (lam - scale_lr * grad_lam).clamp_min(1e-8)
        method.step(xb, yb)
        torch.testing.assert_close(method.theta(), theta, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(method._scale().detach(), lam, rtol=1e-4, atol=1e-10)
    assert method.stage == 1 and (method.theta() != theta0).any()


def test_langevin_noise_has_the_step_sizes_standard_deviation(monkeypatch):
    model, (x, y, _, _) = digits_model()
    method = create_method("bayestune", model, optim=SGD, selection_steps=10, effective_num_data=2e4, init_scale=1.0)
    monkeypatch.setattr(method, "potential", lambda theta, scale, x, y: 0.0 * (theta.sum() + scale.sum()))
    before = method.theta()
    method.step(x[:8], y[:8])
    # SGD on g + √(2/(N̂·lr)) ξ moves θ by lr·√(2/(N̂·lr)) ξ = √(2·lr/N̂) ξ: SGLD with step size 2·lr/N̂.
    assert float((method.theta() - before).std()) == pytest.approx(math.sqrt(2 * 0.05 / 2e4), rel=0.1)


def test_the_selected_entries_are_the_top_k_of_the_posterior_mean_scales():
    model, (x, y, _, _) = digits_model()
    method = create_method("bayestune", model, optim=OptimSettings(lr=0.02), selection_steps=20,
                           burn_in_fraction=0.5, keep_fraction=0.05, effective_num_data=1e5)
    scales = []
    for xb, yb in minibatches(x, y, 32, 20):
        method.step(xb, yb)
        scales.append(method._scale().detach().clone())
    assert method.stage == 2 and method.burn_in == 10
    mean = torch.stack(scales[10:]).mean(0)  # λ̂: the running mean of the 10 post-burn-in samples
    torch.testing.assert_close(method.scale_mean, mean)
    head = model.spec.head_mask()
    assert 0 < int(head.sum()) < model.dim  # the TinyMLP's new head, a peft modules_to_save copy
    k = round(0.05 * int((~head).sum()))  # p of the entries outside the head
    assert k == method.state()["num_selected"] and len(method.selected) == k + int(head.sum())
    top = set(torch.topk(mean.masked_fill(head, -math.inf), k).indices.tolist())
    assert set(method.selected.tolist()) == top | set(head.nonzero().squeeze(1).tolist())  # and the whole head
    outside = ~head
    outside[method.selected] = False
    chosen = torch.zeros_like(head)
    chosen[list(top)] = True
    assert float(mean[chosen].min()) >= float(mean[outside].max())
    assert method.state()["scale_threshold"] == pytest.approx(float(mean[chosen].min()))


def test_stage_two_moves_only_the_selected_entries_from_theta0():
    model, (x, y, _, _) = digits_model()
    method = create_method("bayestune", model, optim=OptimSettings(lr=0.02), selection_steps=10, keep_fraction=0.1,
                           effective_num_data=1e5)
    train(method, x, y, 10)
    assert method.stage == 2
    torch.testing.assert_close(method.theta(), model.theta0)  # stage 2 restarts from θ0
    logs = train(method, x, y, 30)
    assert all(log["stage"] == 2.0 for log in logs)
    theta = method.theta()
    unselected = torch.ones(model.dim, dtype=torch.bool)
    unselected[method.selected] = False
    assert torch.equal(theta[unselected], model.theta0[unselected])
    # (a selected A entry whose B column stayed 0 gets no gradient, so not every selected entry moves)
    assert (theta[method.selected] != model.theta0[method.selected]).float().mean() > 0.5
    assert logs[-1]["loss"] < logs[0]["loss"]
    head = model.spec.head_mask()
    # the head is always fine-tuned (entries fed by a hidden unit that is 0 on every input get no gradient)
    assert (theta[head] != model.theta0[head]).float().mean() > 0.5


def test_fit_plans_the_two_stages():
    model, (x, y, _, _) = digits_model()
    batches = list(minibatches(x, y, 32, 6))
    result = fit("bayestune", model, batches, steps=12, optim=OptimSettings(lr=0.02), progress=False,
                 selection_fraction=0.25, effective_num_data=1e5)
    assert result.state["selection_steps"] == 3 and result.state["stage"] == 2 and result.passes_per_step == 1
    assert result.state["scale_threshold"] > 0
    unplanned = create_method("bayestune", model)
    with pytest.raises(ValueError, match="selection_steps"):
        unplanned.step(x[:8], y[:8])
    with pytest.raises(ValueError, match="keep_fraction"):
        create_method("bayestune", model, keep_fraction=0.0)
