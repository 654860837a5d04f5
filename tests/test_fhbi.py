"""FHBI: one step equals a hand-written kernel-weighted ascent followed by an SVGD step at the perturbed
particles; ρ = 0 is SVGD."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.methods import OptimSettings, create_method
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp

SGD = OptimSettings(lr=0.01, optimizer="sgd", momentum=0.0)


def tiny_model() -> tuple[BayesianLoRA, tuple]:
    data = digits(n_train=200)
    return BayesianLoRA(lora_mlp(rank=2, hidden=8).eval(), num_data=200, prior_scale=0.5), data


def reference_step(model: BayesianLoRA, particles: torch.Tensor, x, y, rho: float, lr: float) -> torch.Tensor:
    """θ_i + lr·(1/K) Σ_j [k(θ_j, θ_i) ∇ log p(θ_j + e_j, D_B) + ∇_{θ_j} k(θ_j, θ_i)], e from the ascent."""
    num = particles.shape[0]
    sq_dist = torch.cdist(particles, particles).pow(2)
    h = sq_dist[torch.triu_indices(num, num, offset=1).unbind()].median() / math.log(num + 1)

    def kernel(a, b):
        return torch.exp(-(a - b).pow(2).sum() / h)

    k = torch.stack([torch.stack([kernel(a, b) for b in particles]) for a in particles])
    grads = []
    for theta in particles:
        theta = theta.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(model.logits(theta, x), y), theta)[0])
    psi = k @ torch.stack(grads)
    perturbed = particles + rho * psi / psi.norm(dim=1, keepdim=True)
    log_joint_grads = []
    for theta in perturbed:
        theta = theta.clone().requires_grad_(True)
        log_prior = -theta.pow(2).sum() / (2 * model.prior_scale**2)
        log_lik = -F.cross_entropy(model.logits(theta, x), y, reduction="sum") * model.num_data / len(y)
        log_joint_grads.append(torch.autograd.grad(log_prior + log_lik, theta)[0])
    phi = []
    for i in range(num):
        movable = particles.clone().requires_grad_(True)
        repulsion = torch.autograd.grad(sum(kernel(movable[j], particles[i]) for j in range(num)), movable)[0]
        phi.append(sum(k[j, i] * log_joint_grads[j] + repulsion[j] for j in range(num)) / num)
    return particles + lr * torch.stack(phi)


def test_one_step_equals_the_hand_written_ascent_and_stein_descent():
    model, (x, y, _, _) = tiny_model()
    method = create_method("fhbi", model, optim=SGD, seed=0, num_particles=3, rho=0.1)
    start = method.particles()
    xb, yb = x[:40], y[:40]
    log = method.step(xb, yb)
    expected = reference_step(model, start, xb, yb, rho=0.1, lr=0.01)
    torch.testing.assert_close(method.particles(), expected, rtol=1e-4, atol=1e-6)
    assert log["perturbation"] == pytest.approx(0.1)
    assert method.passes_per_step == 6
    # a second step from the moved particles still matches
    moved = method.particles()
    method.step(x[40:80], y[40:80])
    torch.testing.assert_close(method.particles(), reference_step(model, moved, x[40:80], y[40:80], 0.1, 0.01),
                               rtol=1e-4, atol=1e-6)


def test_rho_zero_is_svgd():
    model, (x, y, _, _) = tiny_model()
    runs = {}
    for name, options in (("svgd", {}), ("fhbi", {"rho": 0.0})):
        method = create_method(name, model, optim=OptimSettings(lr=0.02), seed=3, num_particles=3, **options)
        for xb, yb in minibatches(x, y, 32, 5):
            method.step(xb, yb)
        runs[name] = method.particles()
    torch.testing.assert_close(runs["fhbi"], runs["svgd"])
    with pytest.raises(ValueError, match="rho must be >= 0"):
        create_method("fhbi", model, rho=-0.1)
