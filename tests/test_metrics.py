"""Metrics against hand-computed values on small fixed tensors."""

import math
from itertools import combinations, permutations

import pytest
import torch

from pyro_ibdr.diversity import dpp_log_volume
from pyro_ibdr.metrics import (
    adaptive_calibration_error,
    calibration_bins,
    classification_metrics,
    diversity_metrics,
    ensemble_probs,
    evaluate_predictions,
    ood_metrics,
    uncertainty_scores,
)


def _binary(confidences: list[float], predicted: list[int]) -> torch.Tensor:
    """(B, 2) probabilities whose top label is ``predicted`` with the given confidence."""
    conf = torch.tensor(confidences, dtype=torch.float64)
    first = torch.where(torch.tensor(predicted) == 0, conf, 1.0 - conf)
    return torch.stack([first, 1.0 - first], dim=-1)


def _random_sample_probs(s: int, b: int, c: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(s, b, c, generator=gen, dtype=torch.float64), dim=-1)


# ----------------------------------------------------------------------------------------- calibration
def test_ece_matches_hand_computed_value():
    # n_bins = 4: bin [0.5, 0.75) holds conf 0.6 (right) and 0.7 (wrong): |0.5 − 0.65| = 0.15;
    # bin [0.75, 1) holds 0.8 and 0.9 (both right): |1 − 0.85| = 0.15. ECE = 0.5·0.15 + 0.5·0.15.
    probs = _binary([0.6, 0.7, 0.9, 0.8], predicted=[0, 0, 1, 1])
    targets = torch.tensor([0, 1, 1, 1])
    result = classification_metrics(probs, targets, n_bins=4)
    assert result["ece"] == pytest.approx(0.15, abs=1e-6)
    assert calibration_bins(probs, targets, n_bins=4).ece == pytest.approx(0.15, abs=1e-6)


def test_bins_are_left_closed_and_confidence_one_is_its_own_group():
    probs = _binary([0.5, 0.75, 1.0], predicted=[0, 0, 0])
    bins = calibration_bins(probs, torch.tensor([0, 0, 0]), n_bins=4)
    assert bins.n_bins == 4
    assert bins.edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # 0.5 → [0.5, 0.75), 0.75 → [0.75, 1), 1.0 → the extra group that torchmetrics forms
    assert bins.count.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_ece_counts_confidence_one_separately_like_torchmetrics():
    # conf 1.0 (wrong) and 0.95 (right). torchmetrics: 0.5·|0 − 1| + 0.5·|1 − 0.95| = 0.525;
    # a closed last bin [14/15, 1] would merge them: |0.5 − 0.975| = 0.475.
    probs = _binary([1.0, 0.95], predicted=[0, 0])
    targets = torch.tensor([1, 0])
    result = classification_metrics(probs, targets)
    bins = calibration_bins(probs, targets)
    assert result["ece"] == pytest.approx(0.525, abs=1e-6)
    assert bins.ece == pytest.approx(0.525, abs=1e-6)
    assert bins.count[15] == 1 and bins.count[14] == 1
    assert bins.accuracy[15] == 0.0 and bins.confidence[15] == 1.0


def test_calibration_bins_reproduce_torchmetrics_ece_on_random_data():
    probs = ensemble_probs(_random_sample_probs(3, 500, 7))
    probs[:20] = torch.nn.functional.one_hot(torch.arange(20) % 7, 7).double()  # some confidences of 1
    targets = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(1))
    for n_bins in (1, 10, 15):
        bins = calibration_bins(probs, targets, n_bins)
        assert bins.count.sum() == 500 and bins.count[n_bins] == 20
        assert bins.ece == pytest.approx(classification_metrics(probs, targets, n_bins)["ece"], abs=1e-6)


def test_adaptive_ece_uses_equal_mass_bins():
    # N = 5, M = 2: ranks 0..2 → bin 0, ranks 3..4 → bin 1.
    # bin 0: conf {0.55 ✓, 0.6 ✗, 0.65 ✗}: |1/3 − 0.6| · 3/5 = 0.16; bin 1: {0.95 ✓, 0.99 ✓}: 0.03 · 2/5.
    probs = _binary([0.95, 0.6, 0.99, 0.55, 0.65], predicted=[1, 1, 0, 0, 0])
    targets = torch.tensor([1, 0, 0, 0, 1])
    expected = 0.16 + 0.012
    assert adaptive_calibration_error(probs, targets, n_bins=2) == pytest.approx(expected, abs=1e-12)
    assert classification_metrics(probs, targets, n_bins=2)["adaptive_ece"] == pytest.approx(expected)
    # equal-width bins [0, 0.5), [0.5, 1) put everything together: |3/5 − 0.748| = 0.148
    assert classification_metrics(probs, targets, n_bins=2)["ece"] == pytest.approx(0.148, abs=1e-6)


def test_accuracy_nll_and_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    targets = torch.tensor([0, 1])
    result = classification_metrics(probs, targets)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)
    # (0.09 + 0.04 + 0.01 + 0.01 + 0.49 + 0.36) / 2
    assert result["brier"] == pytest.approx(0.5, rel=1e-6)
    assert set(result) == {"accuracy", "ece", "adaptive_ece", "nll", "brier"}


def test_accuracy_is_the_micro_average():
    # all predictions are class 0: 3 of 4 right (a macro average over classes would give 0.5)
    probs = torch.tensor([[0.9, 0.1]]).expand(4, -1)
    assert classification_metrics(probs, torch.tensor([0, 0, 0, 1]))["accuracy"] == pytest.approx(0.75)


def test_nll_of_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    result = classification_metrics(probs, torch.tensor([1, 0]))
    assert result["nll"] == pytest.approx(-math.log(1e-12) / 2)
    assert result["brier"] == pytest.approx(1.0)
    assert result["accuracy"] == pytest.approx(0.5)


def test_perfect_confident_predictions_score_zero():
    targets = torch.tensor([0, 2, 1, 2])
    probs = torch.nn.functional.one_hot(targets, 3).float()
    result = classification_metrics(probs, targets)
    assert result["accuracy"] == 1.0
    assert result["ece"] == result["adaptive_ece"] == result["brier"] == result["nll"] == 0.0


# -------------------------------------------------------------------------------------------- ensemble
def test_ensemble_modes():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    sample_probs = torch.softmax(logits, dim=-1)
    mean_probs = ensemble_probs(sample_probs)
    assert mean_probs.dtype == torch.float64 and mean_probs.shape == (6, 5)
    torch.testing.assert_close(mean_probs, sample_probs.mean(0))
    torch.testing.assert_close(ensemble_probs(sample_probs, "mean_logits"), torch.softmax(logits.mean(0), -1))
    assert not torch.allclose(ensemble_probs(sample_probs, "mean_logits"), mean_probs)
    one = sample_probs[:1].expand(3, -1, -1)
    for mode in ("mean_probs", "mean_logits"):
        torch.testing.assert_close(ensemble_probs(one, mode), sample_probs[0])


def test_mean_logits_survives_underflowed_probabilities():
    # each sample puts zero mass on a different class: a plain log would make every class −∞
    sample_probs = torch.tensor([[[0.0, 0.5, 0.5]], [[0.5, 0.0, 0.5]], [[0.5, 0.5, 0.0]]])
    result = ensemble_probs(sample_probs, "mean_logits")
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, torch.full((1, 3), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("sample_probs", "message"),
    [
        (torch.full((4, 3), 1 / 3), r"shape \(S, B, C\)"),
        (torch.full((2, 4, 1), 1.0), "at least 2 classes"),
        (torch.tensor([[[0.5, float("nan")]]]), "NaN"),
        (torch.tensor([[[1.5, -0.5]]]), "negative"),
        (torch.tensor([[[2.0, 3.0]]]), "sum to 1"),
        (torch.ones(2, 3, 2, dtype=torch.long), "floating-point"),
        (torch.empty(0, 3, 2), "empty"),
    ],
)
def test_bad_sample_probs_are_refused(sample_probs, message):
    with pytest.raises(ValueError, match=message):
        ensemble_probs(sample_probs)


def test_bad_arguments_are_refused():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ensemble_probs([[[0.5, 0.5]]])
    with pytest.raises(ValueError, match="mode"):
        ensemble_probs(probs.unsqueeze(0), mode="median")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        classification_metrics(probs, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        classification_metrics(probs, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="3 examples"):
        classification_metrics(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        classification_metrics(probs, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        classification_metrics(probs, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, C\)"):
        classification_metrics(probs.unsqueeze(0), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="n_bins"):
        classification_metrics(probs, torch.tensor([0, 1, 2]), n_bins=0)
    with pytest.raises(ValueError, match="3 examples"):
        diversity_metrics(probs.unsqueeze(0), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------- diversity
def test_identical_samples_have_no_diversity():
    sample_probs = _random_sample_probs(1, 8, 5).expand(4, -1, -1)
    targets = torch.arange(8) % 5
    result = diversity_metrics(sample_probs, targets)
    assert result["disagreement"] == 0.0
    assert result["pairwise_kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert result["predictive_entropy"] == pytest.approx(result["expected_entropy"])
    assert result["dpp_log_volume"] < -10.0  # coinciding particles: about log(2·jitter)


def test_single_sample_gives_zero_pairwise_terms():
    sample_probs = _random_sample_probs(1, 6, 4)
    result = diversity_metrics(sample_probs, torch.tensor([0, 1, 2, 3, 0, 1]))
    assert all(math.isfinite(value) for value in result.values())
    assert result["disagreement"] == result["pairwise_kl"] == result["dpp_log_volume"] == 0.0
    assert result["mutual_information"] == 0.0


def test_disagreement_and_mutual_information_on_constructed_cases():
    eye = torch.eye(3, dtype=torch.float64)
    # example 0: votes (0, 0, 1) → pairs (0,1) agree, (0,2) and (1,2) disagree → 2/3; example 1: all agree.
    sample_probs = torch.stack([eye[[0, 2]], eye[[0, 2]], eye[[1, 2]]])
    with pytest.warns(UserWarning, match="S = 3 draws exceed C − 1 = 2"):  # the DPP term carries no signal
        result = diversity_metrics(sample_probs, torch.tensor([0, 2]))
    assert result["disagreement"] == pytest.approx((2 / 3 + 0.0) / 2)
    # example 0: p̄ = (2/3, 1/3, 0) and one-hot samples: MI = H(p̄); example 1: MI = 0
    h = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert result["mutual_information"] == pytest.approx(h / 2)
    assert result["predictive_entropy"] == pytest.approx(h / 2)
    assert result["expected_entropy"] == pytest.approx(0.0)


def test_pairwise_kl_and_disagreement_match_brute_force():
    sample_probs = _random_sample_probs(4, 10, 6, seed=3)
    targets = torch.arange(10) % 6
    result = diversity_metrics(sample_probs, targets)
    labels = sample_probs.argmax(-1)
    disagree = [(labels[i] != labels[j]).double().mean() for i, j in combinations(range(4), 2)]
    kl = [(sample_probs[i] * (sample_probs[i] / sample_probs[j]).log()).sum(-1).mean()
          for i, j in permutations(range(4), 2)]
    assert result["disagreement"] == pytest.approx(float(torch.stack(disagree).mean()))
    assert result["pairwise_kl"] == pytest.approx(float(torch.stack(kl).mean()))
    assert result["dpp_log_volume"] == pytest.approx(float(dpp_log_volume(sample_probs, targets).mean()))


def test_orthogonal_wrong_class_predictions_have_dpp_log_volume_zero():
    # true class 0; the wrong-class parts (0.6, 0) and (0, 0.6) are orthogonal → log det(I + jitter·I) ≈ 0
    sample_probs = torch.tensor([[[0.4, 0.6, 0.0]], [[0.4, 0.0, 0.6]]])
    result = diversity_metrics(sample_probs, torch.tensor([0]))
    assert result["dpp_log_volume"] == pytest.approx(0.0, abs=1e-6)
    assert result["disagreement"] == 1.0


# ------------------------------------------------------------------------------------------------- OOD
def test_uncertainty_scores_by_hand():
    eye = torch.eye(2, dtype=torch.float64)
    # example 0: two confident samples that disagree; example 1: two identical confident samples
    sample_probs = torch.stack([eye[[0, 0]], eye[[1, 0]]])
    scores = uncertainty_scores(sample_probs)
    assert set(scores) == {"max_prob", "entropy", "mutual_information"}
    torch.testing.assert_close(scores["max_prob"], torch.tensor([0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores["entropy"], torch.tensor([math.log(2), 0.0], dtype=torch.float64))
    torch.testing.assert_close(scores["mutual_information"], scores["entropy"])


def test_ood_auroc_extremes():
    separable = ood_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.9]))
    assert separable == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    identical = ood_metrics(torch.full((5,), 0.7), torch.full((4,), 0.7))
    assert identical["auroc"] == pytest.approx(0.5)
    assert identical["fpr95"] == 1.0
    assert ood_metrics(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0]))["auroc"] == 0.0


def test_ood_scores_outside_unit_interval_keep_their_order():
    # a sigmoid would map all of these to 1.0 in float32 and report chance
    result = ood_metrics(torch.tensor([1000.0, 1001.0]), torch.tensor([1002.0, 1003.0]))
    assert result["auroc"] == 1.0


def test_ood_auroc_matches_pair_counting_with_ties():
    gen = torch.Generator().manual_seed(0)
    s_in = torch.randint(0, 6, (40,), generator=gen).double()
    s_out = torch.randint(2, 9, (30,), generator=gen).double()
    diff = s_out[:, None] - s_in[None, :]
    expected = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert ood_metrics(s_in, s_out)["auroc"] == pytest.approx(expected, abs=1e-6)


def test_fpr_at_95_tpr_on_constructed_case():
    # 20 OOD scores 1..20: flagging ≥ 19 of them needs a threshold ≤ 2, which also flags the
    # in-distribution scores 2.5 and 30 out of four: FPR95 = 0.5.
    out_scores = torch.arange(1, 21, dtype=torch.float64)
    in_scores = torch.tensor([0.5, 1.5, 2.5, 30.0])
    assert ood_metrics(in_scores, out_scores)["fpr95"] == pytest.approx(0.5)


def test_bad_ood_scores_are_refused():
    with pytest.raises(ValueError, match="in_scores"):
        ood_metrics(torch.empty(0), torch.ones(3))
    with pytest.raises(ValueError, match="out_scores"):
        ood_metrics(torch.ones(3), torch.ones(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(torch.ones(3), torch.tensor([1.0, float("nan")]))


# -------------------------------------------------------------------------------------------- combined
def test_evaluate_predictions_combines_ensemble_and_diversity_metrics():
    sample_probs = _random_sample_probs(3, 50, 5, seed=4)
    targets = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(5))
    for mode in ("mean_probs", "mean_logits"):
        result = evaluate_predictions(sample_probs, targets, n_bins=10, mode=mode)
        expected = {
            **classification_metrics(ensemble_probs(sample_probs, mode), targets, 10),
            **diversity_metrics(sample_probs, targets),
        }
        assert result == expected
        assert all(isinstance(value, float) and math.isfinite(value) for value in result.values())
    assert len(result) == 11
