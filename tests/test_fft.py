"""Full fine-tuning: θ is every weight of a plain network, and training moves the backbone itself."""

import pytest
import torch

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.methods import FFT, METHODS, OptimSettings, create_method
from tests._dummies.data import digits, minibatches
from tests._dummies.nets import lora_mlp, plain_mlp


def test_fft_trains_every_backbone_weight_and_no_lora_tensor_exists():
    x, y, _, _ = digits(n_train=1000)
    net = plain_mlp().eval()
    model = BayesianLoRA(net, num_data=len(y))
    names = [name for name, _ in net.named_parameters()]
    assert list(model.spec.names) == names  # θ is the whole network, in its own order
    assert not any("lora" in name for name in names + [n for n, _ in net.named_modules()])
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    method = create_method("fft", model, optim=OptimSettings(lr=0.01))
    for xb, yb in minibatches(x, y, 32, 20):
        method.step(xb, yb)
    moved = model.spec.unflatten(method.theta())
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "head.weight"):
        assert (moved[name] - before[name]).abs().max() > 1e-3, name  # backbone and head both trained
    for name, p in net.named_parameters():  # θ lives in the method, the network's own tensors are untouched
        assert torch.equal(p, before[name]), name
    assert METHODS["fft"].adapter == "full" and METHODS["map"].adapter == "lora"


def test_fft_refuses_lora_networks_and_frozen_weights():
    with pytest.raises(ValueError, match="without LoRA adapters"):
        FFT(BayesianLoRA(lora_mlp().eval(), num_data=10))
    net = plain_mlp().eval()
    net.fc1.requires_grad_(False)
    with pytest.raises(ValueError, match=r"2 parameters are not in θ .*fc1\.bias.*fc1\.weight.*requires_grad_\(True\)"):
        create_method("fft", BayesianLoRA(net, num_data=10))
    everything = BayesianLoRA(net, num_data=10, select=lambda name, p: True)  # the other documented way
    assert create_method("fft", everything).model.dim == sum(p.numel() for p in net.parameters())
