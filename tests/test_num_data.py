"""num_data = N scales the minibatch likelihood by N/B; a labelled batch larger than N is a usage error."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_ibdr import BayesianLoRA, EmpiricalPosterior, ParticleGuide, evaluate, fit, predictive_probs
from tests._dummies.nets import lora_mlp

X, Y = torch.rand(32, 64), torch.randint(0, 10, (32,))


@pytest.fixture
def model():
    return BayesianLoRA(lora_mlp().eval(), num_data=10)  # e.g. len(loader) passed for len(dataset)


def test_likelihood_is_scaled_by_n_over_b():
    model = BayesianLoRA(lora_mlp().eval(), num_data=100)
    theta = model.theta0
    trace = poutine.trace(poutine.condition(model, data={"theta": theta})).get_trace(X, Y)
    trace.compute_log_prob()
    expected = torch.distributions.Categorical(logits=model.logits(theta, X)).log_prob(Y).sum() * 100 / 32
    torch.testing.assert_close(trace.nodes["obs"]["log_prob_sum"], expected)


def test_training_batch_larger_than_num_data_is_an_error(model):
    message = r"training batch of 32 labelled examples is larger than num_data = 10.*len\(dataset\)"
    svi = SVI(model, ParticleGuide(model, 2), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    with pytest.raises(ValueError, match=message):
        svi.step(X, Y)
    with pytest.raises(ValueError, match=message):
        fit("map", model, [(X, Y)], steps=1, progress=False)
    svi.step(X[:10], Y[:10])  # a batch of N is fine


def test_prediction_batches_larger_than_num_data_keep_working(model):
    posterior = EmpiricalPosterior(model.init_particles(3, torch.Generator().manual_seed(0)))
    probs = predictive_probs(model, posterior, X, num_samples=3)
    torch.testing.assert_close(probs, model.logits(posterior.samples, X).softmax(-1))
    metrics = evaluate(model, posterior, [(X, Y)], num_samples=3)
    assert metrics["accuracy"] == pytest.approx(float((probs.mean(0).argmax(-1) == Y).float().mean()))
