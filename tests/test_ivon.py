"""IVON: the posterior is ivon-opt's Gaussian, sampled exactly as the optimiser samples its weights."""

import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.methods import OptimSettings, create_method
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp


def trained_ivon(steps: int = 30, **options):
    x, y, _, _ = digits(n_train=1000)
    model = BayesianLoRA(lora_mlp(rank=4).eval(), num_data=len(y), prior_scale=0.5)
    method = create_method("ivon", model, optim=OptimSettings(lr=0.2), hess_init=0.5, beta2=0.99, **options)
    for xb, yb in minibatches(x, y, 32, steps):
        method.step(xb, yb)
    return method, model, (x, y)


def test_posterior_samples_are_the_optimisers_weight_samples():
    method, _, _ = trained_ivon()
    group = method.optimizer.param_groups[0]
    assert (group["ess"], group["weight_decay"]) == (1000.0, pytest.approx(1 / (1000 * 0.25)))  # λ = N, δ = 1/(N s²)
    assert group["hess"].std() > 1e-3, "the Hessian estimate never moved: the test would not see a wrong scale"
    posterior = method.posterior()
    torch.testing.assert_close(posterior.loc, method.theta.detach())
    torch.testing.assert_close(posterior.scale**2, 1 / (group["ess"] * (group["hess"] + group["weight_decay"])))
    for seed in (0, 1):
        torch.manual_seed(seed)
        with method.optimizer.sampled_params():  # ivon-opt's own draw θ ~ q, from torch's global generator
            drawn = method.theta.detach().clone()
        ours = posterior.sample(1, generator=torch.Generator().manual_seed(seed))["theta"][0]
        torch.testing.assert_close(ours, drawn)
    torch.testing.assert_close(method.theta.detach(), posterior.loc)  # the optimiser restored its mean


def test_the_loss_is_the_per_example_nll_at_the_sampled_weights():
    method, model, (x, y) = trained_ivon(steps=3)
    with method.optimizer.sampled_params():
        theta = method.theta.detach().clone()
        nll = float(method.nll(x[:32], y[:32]).detach())
    assert nll == pytest.approx(float(F.cross_entropy(model.logits(theta, x[:32]), y[:32])), rel=1e-5)
    assert method.state()["num_steps"] == 3
