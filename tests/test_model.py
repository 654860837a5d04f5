import peft
import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_ibdr import BayesianLoRA, IBDRLoss, ParticleGuide, lora_only
from tests._dummies.nets import TinyMLP, lora_mlp, lora_vit


def test_flat_theta_covers_lora_factors_and_head():
    model = BayesianLoRA(lora_mlp(), num_data=10)
    names = model.spec.names
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    assert any("modules_to_save" in n for n in names)
    assert model.dim == sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    lora_model = BayesianLoRA(lora_mlp(), num_data=10, select=lora_only)
    assert all(".lora_" in n for n in lora_model.spec.names)


@pytest.mark.parametrize("make_net", [lora_mlp, lora_vit])
def test_vectorised_forward_equals_loop(make_net):
    net = make_net().eval()
    x = torch.rand(5, 64) if make_net is lora_mlp else torch.rand(5, 1, 8, 8)
    vectorised = BayesianLoRA(net, num_data=10, vectorize=True)
    looped = BayesianLoRA(net, num_data=10, vectorize=False)
    theta = vectorised.init_particles(3) + 0.1 * torch.randn(3, vectorised.dim)
    expected = torch.stack([vectorised.logits(t, x) for t in theta])
    torch.testing.assert_close(vectorised.logits(theta, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped.logits(theta, x), expected, rtol=1e-5, atol=1e-5)
    # (K, 1, D), as θ arrives from a particle plate, gives (K, B, C)
    assert vectorised.logits(theta.unsqueeze(1), x).shape == (3, 5, 10)


@pytest.mark.parametrize("vectorize", [True, False, None])
def test_dropout_is_independent_per_particle(vectorize):
    model = BayesianLoRA(lora_mlp(dropout=0.5).train(), num_data=10, vectorize=vectorize)
    theta = model.theta0.expand(2, -1)
    logits = model.logits(theta, torch.rand(8, 64))
    assert not torch.allclose(logits[0], logits[1])


def test_backbone_is_unchanged_and_outside_the_param_store():
    net = lora_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    model = BayesianLoRA(net, num_data=64)
    guide = ParticleGuide(model, 2, sigma=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=IBDRLoss(alpha=0.0))
    for _ in range(3):
        svi.step(torch.rand(16, 64), torch.randint(0, 10, (16,)))
    assert set(pyro.get_param_store().keys()) == {"particle_guide.loc"}
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert {k: p.requires_grad for k, p in net.named_parameters()} == flags
    assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(pyro.param("particle_guide.loc").detach(), guide._init_loc)


def test_mapping_inputs_are_passed_as_keywords():
    class KeywordNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyMLP()

        def forward(self, features, offset):
            return self.inner(features + offset)

    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc1"])
    model = BayesianLoRA(peft.get_peft_model(KeywordNet(), config), num_data=4)
    inputs = {"features": torch.rand(4, 64), "offset": torch.zeros(4, 64)}
    assert model.logits(model.init_particles(2), inputs).shape == (2, 4, 10)


def test_prediction_batch_larger_than_num_data():
    model = BayesianLoRA(lora_mlp(), num_data=4)
    guide = ParticleGuide(model, 2)
    pyro.infer.Predictive(model, guide=guide, num_samples=2, parallel=True)(torch.rand(9, 64))


def test_bad_input_errors():
    model = BayesianLoRA(lora_mlp(), num_data=10)
    with pytest.raises(ValueError, match="labels have shape \\(3,\\) but the inputs hold 4"):
        model(torch.rand(4, 64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\)"):
        model(torch.rand(4, 64), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="no trainable adapter tensors"):
        BayesianLoRA(TinyMLP().requires_grad_(False), num_data=10)
    with pytest.raises(ValueError, match="num_data"):
        BayesianLoRA(lora_mlp(), num_data=0)
    with pytest.raises(ValueError, match="last dimension"):
        model.logits(torch.zeros(2, model.dim + 1), torch.rand(4, 64))
