"""End to end: SVI with IBDRLoss learns real handwritten digits with a frozen network and LoRA."""

import pyro
import torch
from pyro.infer import SVI

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide, predictive_probs
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp, lora_vit


def train_ibdr(net, x, y, steps, lr):
    model = BayesianLoRA(net, num_data=len(y))
    guide = ParticleGuide(model, 4, sigma=0.005, seed=0)
    loss = IBDRLoss(alpha=0.02, diversity="log_volume")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    data_terms = []
    for xb, yb in minibatches(x, y, 32, steps):
        svi.step(xb, yb)
        data_terms.append(loss.terms["data"])
    return model, guide, data_terms


def check_learned(model, guide, data_terms, x_test, y_test, min_accuracy):
    window = len(data_terms) // 5
    assert sum(data_terms[-window:]) < 0.5 * sum(data_terms[:window])
    probs = predictive_probs(model, guide, x_test, num_samples=4)
    accuracy = float((probs.mean(0).argmax(-1) == y_test).float().mean())
    assert accuracy > min_accuracy, accuracy  # chance is 0.1
    predictions = probs.argmax(-1)
    assert (predictions[0] != predictions[1:]).any(), "particles predict identically"
    assert not torch.allclose(probs[0], probs[1])


def test_ibdr_learns_digits_with_a_frozen_mlp():
    x, y, x_test, y_test = digits(n_train=1000)
    model, guide, data_terms = train_ibdr(lora_mlp(rank=8).eval(), x, y, steps=150, lr=0.02)
    check_learned(model, guide, data_terms, x_test, y_test, min_accuracy=0.8)


def test_ibdr_learns_digits_with_a_tiny_timm_vit():
    x, y, x_test, y_test = digits(n_train=1000)
    images = lambda t: t.reshape(-1, 1, 8, 8)  # noqa: E731
    model, guide, data_terms = train_ibdr(lora_vit().eval(), images(x), y, steps=120, lr=0.02)
    check_learned(model, guide, data_terms, images(x_test), y_test, min_accuracy=0.5)
