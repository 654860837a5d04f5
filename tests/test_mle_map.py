"""MLE and MAP as BLoB defines them: one plain cross-entropy step, and the same step plus the prior's gradient."""

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.methods import OptimSettings, create_method
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp

PRIOR_SCALE = 0.5


@pytest.fixture
def setup() -> tuple[BayesianLoRA, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits model (N = 1000, s = 0.5), a minibatch of 16, and g = ∇ mean CE at θ0 (the per-example gradient)."""
    x, y, _, _ = digits(n_train=1000)
    model = BayesianLoRA(lora_mlp(rank=4).eval(), num_data=len(y), prior_scale=PRIOR_SCALE)
    xb, yb = x[:16], y[:16]
    theta = model.theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model.logits(theta, xb), yb), theta)
    return model, xb, yb, grad


def one_step(name: str, model: BayesianLoRA, x: torch.Tensor, y: torch.Tensor, optim: OptimSettings) -> torch.Tensor:
    pyro.clear_param_store()  # the point-mass guides of MLE and MAP share their parameter name
    method = create_method(name, model, optim=optim)
    method.step(x, y)
    return method.theta()


def test_mle_step_is_a_cross_entropy_step_and_map_adds_the_prior_gradient(setup):
    model, x, y, grad = setup
    n, theta0, lr = model.num_data, model.theta0, 1e-3
    sgd = OptimSettings(lr=lr, optimizer="sgd", momentum=0.0)
    # ELBO units: the loss is N times the per-example objective, so SGD moves θ by lr·N·(per-example gradient).
    torch.testing.assert_close(one_step("mle", model, x, y, sgd), theta0 - lr * n * grad)
    prior_grad = theta0 / (n * PRIOR_SCALE**2)  # per example: θ/(N s²), i.e. weight decay 1/(N s²)
    theta_map = one_step("map", model, x, y, sgd)
    torch.testing.assert_close(theta_map, theta0 - lr * n * (grad + prior_grad))
    assert (theta_map - theta0 + lr * n * grad).abs().max() > 2e-4  # the prior's share: 20 times the tolerance


def test_mle_and_map_losses_differ_by_the_negative_log_prior(setup):
    model, x, y, _ = setup
    losses = {}
    for name in ("mle", "map"):
        pyro.clear_param_store()
        method = create_method(name, model, optim=OptimSettings(lr=1e-12, optimizer="sgd", momentum=0.0))
        losses[name] = method.step(x, y)["loss"]
    nll = model.num_data * float(F.cross_entropy(model.logits(model.theta0, x), y))
    assert losses["mle"] == pytest.approx(nll, rel=1e-5)
    neg_log_prior = -float(model.prior().log_prob(model.theta0))
    assert losses["map"] == pytest.approx(nll + neg_log_prior, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_prior_is_coupled_weight_decay_and_adamw_decay_is_not(setup, optimizer):
    """MAP equals MLE with torch's coupled weight decay 1/s² (ELBO units; 1/(N s²) per example), for SGD and Adam."""
    model, x, y, _ = setup
    lr, decay = 1e-3, 1 / PRIOR_SCALE**2
    theta_map = one_step("map", model, x, y, OptimSettings(lr=lr, optimizer=optimizer, momentum=0.0))
    coupled = one_step("mle", model, x, y, OptimSettings(lr=lr, optimizer=optimizer, momentum=0.0, weight_decay=decay))
    torch.testing.assert_close(theta_map, coupled)
    if optimizer == "adam":  # decoupled decay shrinks θ outside the adaptive step: a different update
        decoupled = one_step("mle", model, x, y, OptimSettings(lr=lr, optimizer="adamw", weight_decay=decay))
        assert (decoupled - theta_map).abs().max() > 1e-4
