import math
import warnings

import pytest
import torch

from pyro_ibdr import dpp_log_volume


def reference_log_volume(probs: torch.Tensor, targets: torch.Tensor, jitter: float) -> torch.Tensor:
    """Loop over examples: delete the true class, L2-normalise, Gram matrix, log det (float64)."""
    out = []
    for b, y in enumerate(targets.tolist()):
        keep = [c for c in range(probs.shape[-1]) if c != y]
        v = probs[:, b, keep].double()
        v = v / v.norm(dim=-1, keepdim=True)
        gram = v @ v.T + jitter * torch.eye(v.shape[0], dtype=torch.float64)
        out.append(torch.logdet(gram))
    return torch.stack(out)


def test_matches_float64_reference_loop():
    probs = torch.randn(4, 16, 10).softmax(-1)
    targets = torch.randint(0, 10, (16,))
    expected = reference_log_volume(probs, targets, 1e-7)
    torch.testing.assert_close(dpp_log_volume(probs.double(), targets), expected)
    torch.testing.assert_close(dpp_log_volume(probs, targets), expected.float(), rtol=1e-5, atol=1e-5)


def test_orthogonal_wrong_class_vectors_give_zero():
    # class 0 is true; particle i puts its wrong-class mass on class i + 1 only
    probs = torch.zeros(3, 1, 5)
    for i in range(3):
        probs[i, 0, 0] = 0.5
        probs[i, 0, i + 1] = 0.5
    value = dpp_log_volume(probs, torch.tensor([0]))
    assert abs(float(value)) < 1e-5


def test_identical_particles_give_finite_very_negative_value_and_finite_gradient():
    logits = torch.randn(1, 8, 6).expand(3, -1, -1).clone().requires_grad_(True)
    targets = torch.randint(0, 6, (8,))
    value = dpp_log_volume(logits.softmax(-1), targets, jitter=1e-7)
    assert torch.isfinite(value).all()
    # G = 11ᵀ: eigenvalues K and 0, 0, each lifted by the jitter → log(3) + 2·log(1e-7) ≈ −31.1
    torch.testing.assert_close(value, torch.full((8,), math.log(3) + 2 * math.log(1e-7)), rtol=1e-4, atol=1e-4)
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_single_particle_is_constant():
    probs = torch.randn(1, 5, 4).softmax(-1)
    value = dpp_log_volume(probs, torch.randint(0, 4, (5,)))
    torch.testing.assert_close(value, torch.full((5,), math.log(1 + 1e-7)))


def test_more_particles_than_wrong_classes_warns_but_stays_finite():
    probs = torch.randn(3, 4, 3).softmax(-1)
    with pytest.warns(UserWarning, match="K = 3 particles exceed C − 1 = 2"):
        value = dpp_log_volume(probs, torch.randint(0, 3, (4,)))
    assert torch.isfinite(value).all()


def test_underflowed_wrong_class_probabilities_do_not_give_nan():
    probs = torch.zeros(2, 3, 4)
    probs[:, :, 1] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = dpp_log_volume(probs, torch.tensor([1, 1, 1]))
    assert torch.isfinite(value).all()


@pytest.mark.parametrize(
    ("shape", "targets", "message"),
    [((4, 10), torch.zeros(4, dtype=torch.long), "shape \\(K, B, C\\)"),
     ((2, 4, 10), torch.zeros(5, dtype=torch.long), "targets must have shape"),
     ((2, 4, 10), torch.full((4,), 10), "targets must lie in")],
)
def test_bad_input(shape, targets, message):
    with pytest.raises(ValueError, match=message):
        dpp_log_volume(torch.rand(shape), targets)
