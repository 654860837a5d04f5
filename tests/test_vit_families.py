"""split_qkv + q/v LoRA across the timm ViT families a user would pick, as tiny models built from configs."""

from __future__ import annotations

import pytest
import timm
import torch
from peft import get_peft_model
from torch import nn

from pyro_ibdr.experiments.vision import SplitQKV, split_qkv, vit_lora_config

VIT = {"depth": 1, "embed_dim": 24, "num_heads": 2}
# (timm name, create_model kwargs, input side in pixels)
FAMILIES = [
    ("vit_tiny_patch16_224", VIT, 32),
    ("deit_tiny_distilled_patch16_224", VIT, 32),
    ("vit_small_patch14_dinov2", VIT, 28),
    ("vit_small_patch14_reg4_dinov2", VIT, 28),
    ("vit_base_patch16_clip_224", VIT, 32),
    ("beit_base_patch16_224", VIT, 32),  # reads qkv.weight with separate q/v biases
    ("beitv2_base_patch16_224", VIT, 32),
    ("eva02_tiny_patch14_224", VIT, 28),  # same, plus rotary embeddings
    ("eva_giant_patch14_224", {**VIT, "mlp_ratio": 2}, 28),
    ("swin_tiny_patch4_window7_224", {"depths": (1, 1), "embed_dim": 24, "num_heads": (2, 2)}, 56),
    ("swinv2_tiny_window8_256", {"depths": (1, 1), "embed_dim": 24, "num_heads": (2, 2)}, 64),  # reads qkv.weight
    ("cait_xxs24_224", {**VIT, "depth_token_only": 1}, 32),
    ("xcit_nano_12_p16_224", VIT, 32),
]


def _tiny(name: str, kwargs: dict, side: int) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=side, **kwargs).eval()
    with torch.no_grad():  # random values, so that every weight and bias (q_bias, the k_bias buffer, ...) matters
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("bias"):
                tensor.normal_(0.0, 0.1)
            elif name in dict(model.named_parameters()):  # norm weights and layer scales near 1, matrices fan-in
                tensor.normal_(1.0, 0.1) if tensor.dim() == 1 else tensor.normal_(0.0, tensor.shape[-1] ** -0.5)
    return model


@pytest.mark.parametrize(("name", "kwargs", "side"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_split_and_qv_lora_match_the_unsplit_model(name: str, kwargs: dict, side: int) -> None:
    model = _tiny(name, kwargs, side)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        reference = model(x)
    fused = sum(isinstance(getattr(m, "qkv", None), nn.Linear) for m in model.modules())
    split_qkv(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(getattr(m, "qkv", None), SplitQKV) for m in model.modules()) == fused > 0

    peft_model = get_peft_model(model, vit_lora_config(2, 4))
    adapted = {n.split(".lora_A.")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 2 * fused and {a.rsplit(".", 1)[1] for a in adapted} == {"q", "v"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), reference, rtol=1e-5, atol=1e-5)  # B = 0: unchanged
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.5)
        adapted_out = peft_model(x)
    assert (adapted_out - reference).abs().max() > 1e-3  # the adapters are on the path the attention takes
    merged = peft_model.merge_and_unload()  # W_q + (alpha/r) B A written into the split weights
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted_out, rtol=1e-4, atol=1e-4)


class _ReadsFusedWeight(nn.Module):
    """An attention that reads its fused weight without timm's separate-bias switch."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.qkv.weight)[..., :4]


def test_attention_reading_the_fused_weight_otherwise_is_refused_up_front() -> None:
    model = nn.Sequential(_ReadsFusedWeight(), _ReadsFusedWeight())
    message = r"_ReadsFusedWeight \(0\) reads its fused qkv weight.*target_modules=\['qkv'\]"
    with pytest.raises(ValueError, match=message):
        split_qkv(model)
    assert all(isinstance(block.qkv, nn.Linear) for block in model)  # nothing half-split
    split = SplitQKV(nn.Linear(4, 12))
    assert not hasattr(split, "weight")
    with pytest.raises(AttributeError, match="reads the fused qkv weight directly"):
        _ = split.weight


def test_separate_biases_keep_their_trainability() -> None:
    model = _tiny("beit_base_patch16_224", VIT, 32)
    split_qkv(model)
    attention = model.blocks[0].attn
    assert attention.q_bias is None and attention.k_bias is None and attention.v_bias is None
    assert attention.qkv.q.bias.requires_grad and attention.qkv.v.bias.requires_grad
