"""The reliability diagram is written atomically as a valid image."""

import pytest
import torch

from pyro_ibdr.experiments.plots import reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _predictions(n: int = 200, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(2.0 * torch.randn(n, c, generator=gen), dim=-1)
    targets = torch.randint(0, c, (n,), generator=gen)
    probs[:10] = torch.nn.functional.one_hot(targets[:10], c).float()  # a few confidences of exactly 1
    return probs, targets


def test_reliability_diagram_writes_png_and_no_temp_file(tmp_path):
    probs, targets = _predictions()
    path = tmp_path / "reliability.png"
    returned = reliability_diagram(probs, targets, path, title="test")
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    assert list(tmp_path.iterdir()) == [path]


def test_reliability_diagram_replaces_existing_file_and_creates_folders(tmp_path):
    probs, targets = _predictions()
    path = tmp_path / "figures" / "run1" / "rel.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"old")
    reliability_diagram(probs, targets, str(path), n_bins=5)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert list(path.parent.iterdir()) == [path]
    new_path = reliability_diagram(probs, targets, tmp_path / "new" / "rel.png")
    assert new_path.read_bytes()[:8] == PNG_SIGNATURE


def test_reliability_diagram_refuses_bad_input_without_writing(tmp_path):
    probs, targets = _predictions()
    with pytest.raises(ValueError, match="figure format"):
        reliability_diagram(probs, targets, tmp_path / "rel.unknown")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        reliability_diagram(probs, targets + 5, tmp_path / "rel.png")
    assert list(tmp_path.iterdir()) == []
