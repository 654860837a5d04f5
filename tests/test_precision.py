"""Mixed precision: autocast settings, networks held in bfloat16/float16, float32 θ and float32 probabilities."""

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from pyro_ibdr import BayesianLoRA, evaluate, fit, predict_loader, predictive_probs
from pyro_ibdr.experiments import commonsense
from pyro_ibdr.methods import METHODS, OptimSettings
from pyro_ibdr.precision import autocast
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp, plain_mlp, pvera_mlp
from tests._dummies.particles import vit
from tests.test_commonsense_cli import SMALL, arc_files, model_dir  # noqa: F401  (fixtures)
from tests.test_vtab_cli import _invoke as invoke_vtab
from tests.test_vtab_cli import data_dir  # noqa: F401  (fixture)

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
# sgld keeps samples within 4 steps; laplace's prior-precision search is short (the precision is what is tested)
SHORT_CHAIN = {"sgld": {"burn_in": 2, "thin": 1, "num_samples": 2}, "laplace": {"marglik_steps": 5}}
NETWORKS = {"fft": plain_mlp, "pvera": pvera_mlp}  # the methods that need another network than LoRA's


def network(method: str) -> nn.Module:
    """The method's TinyMLP (backbone dropout 0.1 for mc_dropout), random weights."""
    return NETWORKS.get(method, lora_mlp)(dropout=0.1)


@pytest.fixture(scope="module")
def data():
    return digits(n_train=400)


def loaders(data, batch_size=32):
    x, y, x_test, y_test = data
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(x_test, y_test), batch_size=128)


def check_trains_and_evaluates(model, method, data, precision):
    train, test = loaders(data)
    result = fit(method, model, train, steps=4, progress=False, precision=precision, **SHORT_CHAIN.get(method, {}))
    floats = [t for t in tree_leaves(result.posterior.tensors()) if torch.is_tensor(t) and t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    probs, _ = predict_loader(model, result.posterior, test, precision=precision)  # the posterior's own S
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-5)
    metrics = evaluate(model, result.posterior, test, precision=precision)
    assert 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["nll"]) and math.isfinite(metrics["ece"])


@pytest.mark.parametrize("held", LOW)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_network_held_in_low_precision_trains_with_every_method_and_evaluates(method, held, data):
    net = network(method).to(LOW[held])
    frozen = {name: p.detach().clone() for name, p in net.named_parameters() if not p.requires_grad}
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    model = BayesianLoRA(net, num_data=400)
    assert model.theta0.dtype == torch.float32  # master weights
    check_trains_and_evaluates(model, method, data, "fp32")
    assert {name: p.dtype for name, p in net.named_parameters()} == dtypes
    params = dict(net.named_parameters())  # laplace's float32 round trip left the frozen weights bit for bit
    assert all(torch.equal(params[name], value) for name, value in frozen.items())


@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_evaluates_under_autocast(method, precision, data):
    check_trains_and_evaluates(BayesianLoRA(network(method), num_data=400), method, data, precision)


@pytest.mark.parametrize("precision", LOW)
def test_autocast_runs_the_network_in_low_precision_and_returns_float32_logits(precision):
    net, inputs, _ = vit()
    model = BayesianLoRA(net.eval(), num_data=10)
    theta = (model.init_particles(3) + 0.1).requires_grad_(True)
    reference = model.logits(theta, inputs)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), theta)
    adapted = net.base_model.model.blocks[0].attn.qkv.q
    dtypes = []
    with autocast(precision, "cpu"), adapted.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype)):
        assert model.forward(theta, inputs).dtype == LOW[precision]  # the head's batched matmul too
        logits = model.logits(theta, inputs)
        (grad,) = torch.autograd.grad(logits.square().sum(), theta)
    assert dtypes == [LOW[precision]] * 2  # base + fused LoRA update in low precision
    assert logits.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
    assert torch.nn.functional.cosine_similarity(grad.flatten(), reference_grad.flatten(), dim=0) > 0.99
    assert not torch.equal(logits, reference)


@pytest.mark.parametrize("precision", ["fp32", *LOW])
def test_fit_and_prediction_run_the_network_in_the_chosen_precision(precision, data):
    net = lora_mlp()
    model = BayesianLoRA(net, num_data=400)
    train, test = loaders(data)
    dtypes = set()
    with net.base_model.model.fc1.base_layer.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype)):
        result = fit("ibdr", model, train, steps=1, progress=False, precision=precision)
        assert dtypes == {LOW.get(precision, torch.float32)}
        dtypes.clear()
        predict_loader(model, result.posterior, test, precision=precision)
        assert dtypes == {LOW.get(precision, torch.float32)}


def test_updates_below_bfloat16_resolution_accumulate_in_float32_theta(data):
    model = BayesianLoRA(lora_mlp().to(torch.bfloat16), num_data=400)
    train, _ = loaders(data)
    result = fit("map", model, train, steps=3, optim=OptimSettings(lr=1e-4), progress=False)
    theta, theta0 = result.posterior.particles[0], model.theta0
    moved = theta != theta0
    lost_in_bf16 = moved & (theta.bfloat16() == theta0.bfloat16())
    assert moved.float().mean() > 0.5 and lost_in_bf16.any()  # kept only by the float32 copy


@pytest.mark.parametrize("setting", ["fp32", "bf16", "fp16", "held_bf16"])
def test_training_in_low_precision_learns_as_in_float32(setting, data):
    net = lora_mlp(rank=8).eval()
    if setting == "held_bf16":
        net = net.to(torch.bfloat16)
    model = BayesianLoRA(net, num_data=400)
    train, test = loaders(data)
    precision = "fp32" if setting == "held_bf16" else setting
    result = fit("map", model, train, epochs=6, optim=OptimSettings(lr=0.02), progress=False, precision=precision)
    x_test, y_test = test.dataset.tensors
    probs = predictive_probs(model, result.posterior, x_test, num_samples=1, precision=precision)
    accuracy = float((probs[0].argmax(-1) == y_test).float().mean())
    assert accuracy > 0.75, accuracy  # chance is 0.1; the four settings reach 0.81-0.87 here


def test_unknown_precision_is_refused(data):
    model = BayesianLoRA(lora_mlp(), num_data=400)
    train, _ = loaders(data)
    with pytest.raises(ValueError, match="precision must be one of \\['bf16', 'fp16', 'fp32'\\], got 'fp8'"):
        fit("map", model, train, steps=1, progress=False, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        predictive_probs(model, {"theta": model.theta0[None]}, torch.rand(2, 64), precision="half")
    with pytest.raises(ValueError, match="autocast on cpu or cuda, not on 'meta'"):
        autocast("bf16", "meta")


def test_vtab_cli_trains_and_evaluates_in_bfloat16(data_dir, tmp_path):  # noqa: F811
    result = invoke_vtab(data_dir, tmp_path / "out", "map", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert '"precision": "bf16"' in (tmp_path / "out" / "results.json").read_text()


def test_commonsense_cli_trains_and_evaluates_in_bfloat16(model_dir, arc_files, tmp_path):  # noqa: F811
    train, test = arc_files
    args = ["--model", str(model_dir), "--train-file", str(train), "--test-file", str(test), "--output",
            str(tmp_path / "out"), *SMALL, "--tasks", "arc_easy", "--methods", "map", "--precision", "bf16"]
    result = CliRunner().invoke(commonsense.main, args)
    assert result.exit_code == 0, result.output
    assert '"precision": "bf16"' in (tmp_path / "out" / "results.json").read_text()
