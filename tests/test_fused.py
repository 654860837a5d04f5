"""The fused particle pass against the per-particle loop: logits and θ-gradients, LoRA dropout, the shared frozen
prefix, one copy of the frozen weights, the fallback, and chunked prediction."""

import math
import warnings

import peft
import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pyro_ibdr import BayesianLoRA, predict_loader, predictive_probs
from pyro_ibdr.functional import ParticleFallbackWarning
from pyro_ibdr.particle_lora import Unfusable, _Pass
from tests._dummies.nets import TinyMLP
from tests._dummies.particles import FAMILIES, LAST_BLOCKS, mlp

K = 3


def build(family: str, **options):
    net, inputs, first_block = FAMILIES[family](**options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticleFallbackWarning)
        fused = BayesianLoRA(net, num_data=10)
    return fused, BayesianLoRA(net, num_data=10, vectorize="loop"), inputs, first_block


def spread(model: BayesianLoRA, k: int = K) -> torch.Tensor:
    """K LoRA initialisations moved off B = 0, so every update and head differs between particles."""
    generator = torch.Generator().manual_seed(3)
    return model.init_particles(k, generator) + 0.1 * torch.randn(k, model.dim, generator=generator)


def assert_same_logits_and_gradients(fused: BayesianLoRA, loop: BayesianLoRA, theta: torch.Tensor, inputs) -> None:
    theta = theta.detach().requires_grad_(True)
    logits, expected = fused.logits(theta, inputs), loop.logits(theta, inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad((logits * weights).sum(), theta)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), theta)
    assert expected_grad.abs().max() > 1e-2  # the loss reaches θ
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_is_the_default_and_equals_the_loop(family, lora_dropout):
    fused, loop, inputs, _ = build(family, lora_dropout=lora_dropout)
    fused.net.eval()  # dropout modules present but inactive: the passes must agree exactly
    assert fused.forward.mode == "fused" and loop.forward.mode == "loop"
    assert_same_logits_and_gradients(fused, loop, spread(fused), inputs)
    assert fused.forward.mode == "fused"


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"lora_bias": True}, {"r": 2, "lora_alpha": 5}])
def test_peft_options_keep_their_meaning(options):
    fused, loop, inputs, _ = build("mlp", **options)
    assert_same_logits_and_gradients(fused, loop, spread(fused), inputs)


def test_a_factor_left_out_of_theta_keeps_the_fused_pass():
    net, inputs, _ = FAMILIES["mlp"]()
    for name, param in net.named_parameters():
        if "lora_B" in name:  # frozen, nonzero: the network's own B is used by every particle
            param.requires_grad_(False).data.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticleFallbackWarning)
        fused = BayesianLoRA(net, num_data=10)
    assert not any("lora_B" in name for name in fused.spec.names)
    assert_same_logits_and_gradients(fused, BayesianLoRA(net, num_data=10, vectorize="loop"), spread(fused), inputs)
    assert fused.forward.mode == "fused"


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def one_linear(rank: int, alpha: float, a: float, b: float,
               dtype: torch.dtype = torch.float32) -> tuple[BayesianLoRA, BayesianLoRA, torch.Tensor]:
    """(fused, loop, θ (K, D)): LoRA on one Linear held in ``dtype``, every entry of A set to ``a``, of B to ``b``."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"])
    net = peft.get_peft_model(OneLinear(), config).to(dtype)
    fused, loop = BayesianLoRA(net, num_data=10), BayesianLoRA(net, num_data=10, vectorize="loop")
    theta = fused.init_particles(K)
    for name, view in fused.spec.unflatten(theta).items():
        view.fill_(a if "lora_A" in name else b)
    return fused, loop, theta


def test_the_scaling_comes_after_the_down_projection_so_float16_overflows_no_sooner_than_peft():
    fused, loop, theta = one_linear(1, 64, a=2.0, b=1e-3, dtype=torch.float16)  # s = 64; x Aᵀ = 3200, s·x Aᵀ > 65504
    x = torch.full((2, 16), 100.0)
    logits, expected = fused.logits(theta, x), loop.logits(theta, x)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(logits, expected, rtol=2e-3, atol=0.0)


def test_a_base_output_in_another_dtype_is_not_rounded_to_the_low_rank_dtype():
    """A quantized base layer may return float32 under bf16 autocast; peft then adds the update in float32."""
    fused, loop, theta = one_linear(rank=4, alpha=8, a=0.1, b=1e-3)
    base = fused.net.base_model.model.fc.base_layer
    base.forward = lambda x, forward=base.forward: forward(x).float()
    x = 10 * torch.randn(5, 16, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, expected = fused.logits(theta, x), loop.logits(theta, x)
    # bfloat16 rounding of the base output (|y| ≈ 5) would err by ~1e-2; of the update (|Δ| ≈ 1e-2) by ~1e-4
    torch.testing.assert_close(logits, expected, rtol=0.0, atol=1e-3)


@pytest.mark.parametrize("family", LAST_BLOCKS)
def test_lora_on_the_last_blocks_runs_the_frozen_prefix_once(family):
    fused, loop, inputs, first_block = build(family, layers=LAST_BLOCKS[family])
    fused.net.eval()
    seen: list[int] = []

    def record(module, args, kwargs):
        seen.append(next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0])

    theta = spread(fused)
    with first_block.register_forward_pre_hook(record, with_kwargs=True):
        fused.logits(theta, inputs)
        assert seen == [3]  # one pass of the B = 3 examples through the frozen first block
        seen.clear()
        loop.logits(theta, inputs)
        assert seen == [3] * K
    assert len(fused.forward.fused.plan.blocks) == 1  # particles join at the one adapted (last) block
    assert_same_logits_and_gradients(fused, loop, theta, inputs)


@pytest.mark.parametrize("family", ["vit", "llama", "bert", "gpt2"])
def test_particles_join_the_batch_at_the_first_adapted_block(family):
    fused, _, inputs, first_block = build(family)
    seen = []
    with first_block.register_forward_hook(lambda module, args, out: seen.append(tree_leaves(out)[0].shape[0])):
        fused.logits(spread(fused), inputs)
    assert seen == [K * 3]


def test_training_with_dropout_in_the_prefix_repeats_the_inputs_so_masks_stay_independent():
    fused, _, inputs, first_block = build("vit", layers=[2])
    prefix_dropout = fused.net.base_model.model.pos_drop
    prefix_dropout.p = 0.5
    seen = []
    with first_block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0])):
        fused.net.train()
        fused.logits(spread(fused), inputs)
        fused.net.eval()
        fused.logits(spread(fused), inputs)
    assert seen == [K * 3, 3]  # training: the dropout runs on the K·B repeated rows; eval: the prefix runs once
    fused.net.train()
    assert "dropout before the first adapted block" in fused.forward.fused.expands_at_input()


@pytest.mark.parametrize("family", ["mlp", "vit", "llama", "bert", "gpt2"])
def test_lora_dropout_is_independent_per_particle_and_distributed_as_in_the_loop(family):
    fused, loop, inputs, _ = build(family, lora_dropout=0.5)
    fused.net.train()
    one = spread(fused, 1)
    theta = one.expand(8, -1)  # eight copies of ONE particle: only the dropout masks differ
    with torch.no_grad():  # a scalar per draw: the summed logit of class 0
        sampled = torch.stack([fused.logits(theta, inputs) for _ in range(25)])[..., 0].sum(-1)  # (25, 8)
        looped = torch.stack([loop.logits(one, inputs) for _ in range(60)])[..., 0].sum(-1).flatten()  # (60,)
    assert sampled.std() > 1e-3  # dropout on the LoRA input moves the output
    # Independent masks: the spread across particles within one pass is the spread of a single particle across
    # passes (shared masks would make it 0).
    within, across = sampled.var(dim=1).mean(), sampled[:, 0].var()
    assert 0.5 < within / sampled.var() < 1.5 and across > 0
    # Distributed as in the loop: same mean (4 standard errors) and variance.
    a, b = sampled.flatten(), looped
    standard_error = math.sqrt(a.var() / a.numel() + b.var() / b.numel())
    assert abs(a.mean() - b.mean()) < 4 * standard_error
    assert 0.5 < a.var() / b.var() < 2.0


class FrozenCopies(TorchDispatchMode):
    """Record each op output holding a frozen parameter's values once per particle: copied m·K times into new
    memory, or expanded (a view over the same memory) to m·K times its elements."""

    def __init__(self, frozen: list[torch.Tensor], particles: int) -> None:
        super().__init__()
        self.frozen = [p.detach() for p in frozen if p.numel() > 1]
        self.particles = particles
        self.found: list[str] = []
        self.ops = 0

    def _check(self, name: str, out: torch.Tensor) -> None:
        for p in self.frozen:
            repeats, rest = divmod(out.numel(), p.numel())
            if rest or repeats % self.particles:
                continue
            if out.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                self.found.append(f"{name}: expanded {tuple(p.shape)} to {tuple(out.shape)}")
            elif out.dtype == p.dtype and torch.equal(out.reshape(repeats, -1), p.reshape(1, -1).expand(repeats, -1)):
                self.found.append(f"{name}: copied {tuple(p.shape)} into {tuple(out.shape)}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() > 1:
                self._check(str(func), tensor)
        return out


@pytest.mark.parametrize("family", ["vit", "llama", "gpt2"])
def test_one_copy_of_every_frozen_tensor(family):
    fused, _, inputs, _ = build(family)
    frozen = [p for p in fused.net.parameters() if not p.requires_grad]
    theta = spread(fused, 4).requires_grad_(True)  # K = 4 ≠ B = 3: the model's own expand over B rows is no copy
    with FrozenCopies(frozen, particles=4) as probe:
        weight = probe.frozen[0]
        weight.repeat(4, *([1] * (weight.dim() - 1)))  # the probe sees a copy when there is one
        assert probe.found and probe.found.pop()
        fused.logits(theta, inputs).sum().backward()
    assert probe.ops > 100 and theta.grad.abs().sum() > 0
    assert probe.found == []


@pytest.mark.parametrize("shape", [(), (4,), (4, 1), (2, 3)])
def test_any_leading_shape_of_theta(shape):
    fused, loop, inputs, _ = build("vit")
    theta = spread(fused, max(1, math.prod(shape))).reshape(*shape, fused.dim)
    logits = fused.logits(theta, inputs)
    lead = shape[:-1] if shape[-1:] == (1,) else shape
    assert logits.shape == (*lead, 3, 5)
    torch.testing.assert_close(logits, loop.logits(theta, inputs), rtol=1e-4, atol=1e-5)


class LatePrefix(nn.Module):
    """An adapted layer registered after the block list but run before it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.pre = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class BatchFromInput(LatePrefix):
    """Reads the batch size from its input and reshapes with it: the particles would land in the features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        hidden = torch.relu(self.layers[1](self.layers[0](x)))
        return self.head(hidden.reshape(rows, -1, 8).mean(1))


class IndexedByInput(LatePrefix):
    """Indexes its hidden rows with an index built from the input: fails on K·B rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layers[1](self.layers[0](x))
        index = torch.zeros(x.shape[0], dtype=torch.long)
        return self.head(hidden[torch.arange(hidden.shape[0]), index].unsqueeze(-1).expand(-1, 8))


def lora_net(net: nn.Module, targets: list[str]) -> nn.Module:
    torch.manual_seed(0)
    return peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets))


def conv_lora_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5, in_chans=1)
    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))


@pytest.mark.parametrize("make_net, inputs, reason, error", [
    (lambda: conv_lora_vit(), torch.rand(3, 1, 8, 8), "adapts a Conv2d", Unfusable),
    (lambda: lora_net(TinyMLP(), ["fc1"]).merge_and_unload().requires_grad_(True), torch.rand(3, 64),
     "neither a factor of a peft LoRA", Unfusable),
    (lambda: peft.get_peft_model(TinyMLP(), peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True)),
     torch.rand(3, 64), "variant", Unfusable),
    (lambda: lora_net(LatePrefix(), ["pre", "layers.1"]), torch.rand(3, 8), "'.*pre' received 3 rows before",
     Unfusable),
    (lambda: lora_net(BatchFromInput(), ["layers.1"]), torch.rand(3, 8), "returned 3 rows for 3 particles",
     Unfusable),
    (lambda: lora_net(IndexedByInput(), ["layers.1"]), torch.rand(3, 8), "first call failed \\(IndexError",
     IndexError),
])
def test_unbatchable_networks_fall_back_to_the_loop_once_with_the_reason(make_net, inputs, reason, error):
    net = make_net().eval()
    with pytest.warns(ParticleFallbackWarning, match=reason):
        model = BayesianLoRA(net, num_data=10)
        theta = model.init_particles(K) + 0.1
        logits = model.logits(theta, inputs)
    assert model.forward.mode == "loop" and reason.split()[-1].strip("\\(") in model.forward.fallback_reason
    torch.testing.assert_close(logits, BayesianLoRA(net, num_data=10, vectorize="loop").logits(theta, inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParticleFallbackWarning)  # one message, not one per call
        model.logits(theta, inputs)
    with pytest.raises(error):  # asked for explicitly, the fused pass raises instead
        BayesianLoRA(net, num_data=10, vectorize="fused").logits(theta, inputs)


def test_a_bad_input_raises_and_keeps_the_fused_pass():
    fused, _, _, _ = build("mlp")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        fused.logits(spread(fused), torch.rand(3, 65))
    assert fused.forward.mode == "fused"


def test_tensors_repeated_once_per_pass_are_told_apart_by_identity_not_by_a_reused_id():
    # Regression: the pass memoised repetitions by id() alone, so a freed block input whose id CPython handed to
    # the next block's input came back as the old repetition (map's K = 1 logits varied between calls).
    step = _Pass({}, k=2)
    for i in range(200):
        hidden = torch.full((3, 4), float(i))  # a fresh tensor each time; the previous one is freed
        torch.testing.assert_close(step.expand(3, hidden, 2), hidden.repeat(2, 1))
    mask = torch.ones(3, 5)
    assert step.expand(3, (mask,), 2)[0] is step.expand(3, {"m": mask}, 2)["m"]  # one repetition per tensor
    one = _Pass({}, k=1)
    assert one.expand(3, hidden, 2) is hidden and not one.memo  # K = 1: nothing to repeat, nothing kept


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="vectorize must be 'fused', 'vmap', 'loop'"):
        BayesianLoRA(mlp()[0], num_data=10, vectorize="batched")


def test_prediction_runs_all_samples_in_one_fused_pass_or_in_chunks():
    fused, loop, inputs, first_block = build("vit")
    samples = {"theta": spread(fused, 5)}
    rows: list[int] = []
    with first_block.register_forward_hook(lambda module, args, out: rows.append(out.shape[0])):
        probs = predictive_probs(fused, samples, inputs)
        assert rows == [5 * 3]
        rows.clear()
        chunked = predictive_probs(fused, samples, inputs, chunk_size=2)
        assert rows == [2 * 3, 2 * 3, 1 * 3]
    assert probs.shape == (5, 3, 5) and probs.dtype == torch.float32
    torch.testing.assert_close(chunked, probs)
    torch.testing.assert_close(predictive_probs(loop, samples, inputs), probs)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of samples"):
        predictive_probs(fused, samples, inputs, chunk_size=0)


def test_prediction_halves_the_chunk_after_out_of_memory_and_keeps_it():
    fused, _, inputs, _ = build("mlp")
    samples = {"theta": spread(fused, 5)}
    expected = predictive_probs(fused, samples, inputs)
    forward, seen = fused.forward, []

    def limited(theta, x):
        seen.append(theta.shape[0])
        if theta.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(theta, x)

    fused.forward = limited
    labels = torch.zeros(3, dtype=torch.long)
    probs, _ = predict_loader(fused, samples, [(inputs, labels), (inputs, labels)])
    assert seen == [5, 3, 2, 2, 1, 2, 2, 1]  # 5 and 3 samples fail; the 2 that fit carry over to batch two
    torch.testing.assert_close(probs, torch.cat([expected, expected], dim=1))
    with pytest.raises(torch.OutOfMemoryError):
        predict_loader(fused, samples, [(inputs, labels)], chunk_size=4)
