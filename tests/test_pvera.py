"""PVeRA: peft's adapter noise is what the predictive samples, with the moments its formula gives."""

import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr import BayesianLoRA, predictive_probs
from pyro_ibdr.methods import OptimSettings, create_method
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp, pvera_mlp


def test_predictive_samples_the_adapter_noise_with_peft_s_moments():
    """PVeRA on the head only makes the logits Gaussian given x: l = W0 h + λ_b ⊙ B (μ + ε ⊙ σ), so each logit
    difference l_c − l_0 = log p_c − log p_0 has mean and variance in closed form."""
    x, y, x_test, _ = digits(n_train=1000)
    net = pvera_mlp(rank=4, targets=("head",), head=False).eval()
    model = BayesianLoRA(net, num_data=len(y))
    method = create_method("pvera", model, optim=OptimSettings(lr=0.05))
    for xb, yb in minibatches(x, y, 32, 30):
        method.step(xb, yb)
    assert not net.training, "the network's mode was not restored after a training step"
    posterior = method.posterior()
    assert posterior.dropout_at_test and posterior.num_particles == 1
    theta = posterior.particles[0]
    tensors = model.spec.unflatten(theta)
    lambda_b = tensors["base_model.model.head.pvera_lambda_b.default"]
    lambda_d = tensors["base_model.model.head.pvera_lambda_d.default"]
    assert lambda_b.abs().max() > 1e-2, "λ_b is still 0: the adapter adds no noise to test"
    mlp = net.base_model.model
    a, b = mlp.head.pvera_A["default"][:, :32], mlp.head.pvera_B["default"][:10, :]
    with torch.no_grad():
        hidden = torch.relu(mlp.fc2(torch.relu(mlp.fc1(x_test[0]))))
        mu, log_var = (lambda_d * F.linear(hidden, a)).chunk(2)
        mixing = lambda_b[:, None] * b  # l = mean + mixing @ (ε ⊙ σ)
        mean = mlp.head.base_layer(hidden) + mixing @ mu
        contrast = mixing - mixing[:1]  # rows: l_c − l_0
        variance = (contrast**2 * log_var.exp()).sum(-1)
    torch.manual_seed(0)
    probs = predictive_probs(model, posterior, x_test[:1], num_samples=4000)[:, 0]
    differences = probs.log() - probs[:, :1].log()
    torch.testing.assert_close(differences.mean(0), mean - mean[0], atol=0.05, rtol=0.0)
    torch.testing.assert_close(differences.var(0)[1:], variance[1:], rtol=0.1, atol=1e-4)
    assert variance[1:].min() > 1e-3
    assert not net.training


def test_pvera_needs_a_pvera_network():
    with pytest.raises(ValueError, match="PveraConfig"):
        create_method("pvera", BayesianLoRA(lora_mlp().eval(), num_data=10))
