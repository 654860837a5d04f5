"""ViT factory, q/k/v split and LoRA placement on tiny timm ViTs built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from torch import nn

from pyro_ibdr.experiments import vision
from pyro_ibdr.experiments.assets import dinov2
from pyro_ibdr.experiments.vision import SplitQKV, create_offline_vit, create_vit, split_qkv, vit_lora_config

TINY = {"depth": 2, "embed_dim": 24, "num_heads": 2}


def _tiny_vit(num_classes: int = 5, **kwargs: object) -> nn.Module:
    return create_vit("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, **{**TINY, **kwargs})


def test_create_vit_has_zero_new_head() -> None:
    model = _tiny_vit(num_classes=7).eval()
    head = model.get_classifier()
    assert head.out_features == 7
    assert not head.weight.any() and not head.bias.any()
    with torch.no_grad():
        assert not model(torch.randn(3, 3, 32, 32)).any()  # uniform predictions at the start
    with pytest.raises(ValueError, match="positive"):
        _tiny_vit(num_classes=0)


def test_split_qkv_preserves_outputs() -> None:
    model = _tiny_vit().eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        split_qkv(split_qkv(model))  # idempotent
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {f"blocks.{i}.attn.qkv.{p}" for i in range(2) for p in "qkv"} <= names
    assert not any(isinstance(m, nn.Linear) and m.out_features == 3 * 24 for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, SplitQKV)
    with pytest.raises(ValueError, match="no fused 'qkv'"):
        split_qkv(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize(("targets", "adapted"), [("qv", {"q", "v"}), ("qkv", {"q", "k", "v"})])
def test_lora_goes_on_q_and_v_only(targets: str, adapted: set[str]) -> None:
    model = split_qkv(_tiny_vit().eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.get_classifier().weight.normal_()
        reference = model(x)
    peft_model = get_peft_model(model, vit_lora_config(4, 8, targets=targets))
    adapted_layers = {n.split(".lora_A.")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert {name.rsplit(".", 1)[-1] for name in adapted_layers} == adapted
    assert {name.split("blocks.")[1].split(".")[0] for name in adapted_layers} == {"0", "1"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or ".head." in n for n in trainable)
    assert any(".head." in n for n in trainable)  # the new head trains in full
    rank, width = 4, 24
    expected = 2 * len(adapted) * (rank * width + width * rank) + (width * 5 + 5)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected
    with torch.no_grad():  # B = 0: LoRA starts at the pretrained function
        torch.testing.assert_close(peft_model(x), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        vit_lora_config(4, 8, targets="kv")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_create_vit_loads_local_checkpoint(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=11, img_size=32, **TINY)
    path = tmp_path / f"ckpt{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, path)
    model = _tiny_vit(num_classes=3, checkpoint_path=path)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model.get_classifier().out_features == 3 and not model.get_classifier().weight.any()
    larger = create_vit("vit_tiny_patch16_224", num_classes=3, img_size=48, checkpoint_path=path, **TINY)
    assert larger.pos_embed.shape == (1, 1 + 9, 24)  # resampled from the checkpoint's 2x2 grid
    with pytest.raises(ValueError, match="unexpected keys"):
        _tiny_vit(num_classes=3, checkpoint_path=path, depth=1)


def test_create_vit_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        _tiny_vit(checkpoint_path=tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="not both"):
        _tiny_vit(pretrained=True, checkpoint_path=tmp_path / "absent.pth")


def test_create_offline_vit_loads_converted_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = dinov2.new_dinov2_small().state_dict()
    reference = {k: v + 0.5 for k, v in reference.items()}  # distinguishable from any fresh init
    monkeypatch.setattr(vision, "load_dinov2_small_state_dict", lambda cache=None: reference)
    model = create_offline_vit(num_classes=7, img_size=56).eval()
    assert model.patch_embed.patch_size == (14, 14) and model.pos_embed.shape == (1, 1 + 16, 384)
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, reference["blocks.11.mlp.fc2.weight"])
    assert model.get_classifier().out_features == 7 and not model.get_classifier().weight.any()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 56, 56)).shape == (1, 7)
    with pytest.raises(ValueError, match="multiple of the 14 px patch"):
        vision.create_offline_vit(num_classes=7, img_size=50)
