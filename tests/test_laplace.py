"""Laplace-LoRA: the approximation, its prior precision and its predictive are laplace-torch's own."""

import warnings

import pytest
import torch
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import BayesianLoRA, load_checkpoint, predict_loader, predictive_probs, save_checkpoint
from pyro_ibdr.methods import LaplacePosterior, OptimSettings, create_method
from pyro_ibdr.posterior import ParticlePosterior
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp

PRIOR_SCALE = 0.5


def fitted(hessian_structure: str = "kron", pred_type: str = "glm", **options):
    """A MAP fit of 60 steps on 300 digits, then the Laplace approximation on batches of 50."""
    x, y, x_test, _ = digits(n_train=300)
    model = BayesianLoRA(lora_mlp(rank=4).eval(), num_data=len(y), prior_scale=PRIOR_SCALE)
    method = create_method("laplace", model, optim=OptimSettings(lr=0.02), hessian_structure=hessian_structure,
                           pred_type=pred_type, **options)
    for xb, yb in minibatches(x, y, 32, 60):
        method.step(xb, yb)
    assert isinstance(method.posterior(), ParticlePosterior)  # MAP until the approximation is fitted
    method.finalize([(x[i : i + 50], y[i : i + 50]) for i in range(0, len(y), 50)])
    return method, model, (x, y, x_test)


def reference(method, hessian_structure: str, x: torch.Tensor, y: torch.Tensor, stochastic: bool = False,
              **marglik):
    """laplace-torch on an independent copy of the network holding θ_MAP, fitted and tuned as documented."""
    net = lora_mlp(rank=4).eval()
    values = method.model.spec.unflatten(method.theta())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in values:
                p.copy_(values[name])
    laplace = Laplace(net, "classification", subset_of_weights="all", hessian_structure=hessian_structure,
                      prior_precision=1 / PRIOR_SCALE**2, backend_kwargs={"stochastic": stochastic})
    laplace.fit(DataLoader(TensorDataset(x, y), batch_size=50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        laplace.optimize_prior_precision(method="marglik", pred_type="glm", init_prior_prec=1 / PRIOR_SCALE**2,
                                         link_approx="mc", **marglik)
    return laplace


@pytest.mark.parametrize(("structure", "pred_type", "stochastic"),
                         [("kron", "glm", False), ("diag", "glm", False), ("kron", "nn", True)])
def test_predictive_equals_laplace_torchs_own(structure, pred_type, stochastic):
    method, model, (x, y, x_test) = fitted(structure, pred_type, jacobian_batch_size=7, stochastic=stochastic)
    posterior = method.posterior()
    assert isinstance(posterior, LaplacePosterior) and posterior.own_predictive
    laplace = reference(method, structure, x, y, stochastic)
    torch.testing.assert_close(posterior.prior_precision, laplace.prior_precision)
    torch.testing.assert_close(posterior.mean, laplace.mean)
    expected = laplace.predictive_samples(x_test[:20], pred_type=pred_type, n_samples=6,
                                          generator=torch.Generator().manual_seed(3))
    ours = posterior.predict(model, x_test[:20], 6, generator=torch.Generator().manual_seed(3))
    assert ours.shape == (6, 20, 10)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert (ours.std(0) > 1e-3).any(), "the samples do not differ: the test would not see a wrong variance"
    # predict_loader seeds every batch alike, so batches of 8 give laplace-torch's one call on all 20 examples
    loader = [(chunk, torch.zeros(len(chunk), dtype=torch.long)) for chunk in x_test[:20].split(8)]
    batched, _ = predict_loader(model, posterior, loader, num_samples=6, seed=3)
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)


def test_network_and_gradient_flags_are_restored():
    method, model, (_, _, x_test) = fitted()
    flags = {name: p.requires_grad for name, p in model.net.named_parameters()}
    values = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    predictive_probs(model, method.posterior(), x_test[:5], num_samples=2)
    assert {name: p.requires_grad for name, p in model.net.named_parameters()} == flags
    for name, p in model.net.named_parameters():
        assert torch.equal(p, values[name]), name  # θ_MAP was only lent to the network
    assert not model.net.training


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
def test_marginal_likelihood_sets_the_prior_precision(prior_structure):
    method, model, (x, y, _) = fitted(prior_structure=prior_structure)
    state = method.state()
    precision = torch.tensor(state["prior_precision"])
    assert precision.shape == ((1,) if prior_structure == "scalar" else (len(model.spec.names),))
    assert state["prior_precision_init"] == 1 / PRIOR_SCALE**2
    assert (precision - 4.0).abs().max() > 0.5, "the marginal likelihood fit left p0 at its start"
    assert state["log_marglik"] > state["log_marglik_init"] + 1.0
    laplace = reference(method, "kron", x, y, prior_structure=prior_structure)
    torch.testing.assert_close(precision, laplace.prior_precision)
    without = create_method("laplace", model, marglik_steps=0)
    without.finalize([(x, y)])
    assert without.state()["prior_precision"] == [4.0]


def test_checkpoint_round_trip_rebinds_to_the_model(tmp_path):
    method, model, (_, _, x_test) = fitted()
    posterior = method.posterior()
    path = save_checkpoint(tmp_path / "lap.pt", posterior, spec=model.spec, method="laplace",
                           config=method.config.to_dict(), seed=0, state=method.state())
    loaded = load_checkpoint(path).posterior
    assert isinstance(loaded, LaplacePosterior) and loaded.hessian_structure == "kron"
    with pytest.raises(RuntimeError, match="bind"):
        loaded.sample(2)
    expected = posterior.predict(model, x_test[:10], 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.predict(model, x_test[:10], 4, generator=torch.Generator().manual_seed(1)),
                               expected)
    draws = [torch.Generator().manual_seed(2) for _ in range(2)]
    torch.testing.assert_close(loaded.sample(3, draws[0])["theta"], posterior.sample(3, draws[1])["theta"])
    other = BayesianLoRA(lora_mlp(rank=2).eval(), num_data=10)
    with pytest.raises(ValueError, match="D = "):
        loaded.bind(other)


def test_bad_settings_are_named():
    model = BayesianLoRA(lora_mlp(rank=2).eval(), num_data=10)
    for options, message in (({"hessian_structure": "full"}, "hessian_structure"),
                             ({"pred_type": "probit"}, "pred_type"), ({"prior_structure": "diag"}, "prior_structure"),
                             ({"jacobian_batch_size": 0}, "jacobian_batch_size")):
        with pytest.raises(ValueError, match=message):
            create_method("laplace", model, **options)
