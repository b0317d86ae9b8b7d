"""Calibration (lora_cls.metrics.calibration): ECE of hand-made probabilities, the bins against sklearn's
calibration_curve, and temperature scaling of an over-confident model."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.calibration import calibration_curve

from lora_cls.metrics.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    scaled_probabilities,
    top_label_bins,
)

# Five images: (probabilities, label) -> predicted class's confidence, right or wrong, its bin of ten.
PROBS = np.array([[0.95, 0.05], [0.85, 0.15], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
Y = np.array([0, 1, 0, 1, 0])


def test_ece_of_hand_made_probabilities():
    # bin (0.9,1]: 0.95 right -> |1-0.95|·1/5 = 0.01; (0.8,0.9]: 0.85 wrong -> 0.85/5 = 0.17;
    # (0.5,0.6]: 0.6 right, 0.55 wrong -> |0.5-0.575|·2/5 = 0.03; (0.6,0.7]: 0.7 right -> 0.3/5 = 0.06
    bins = top_label_bins(Y, PROBS)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 1, 0, 1, 1]
    assert bins[5]["confidence"] == pytest.approx(0.575) and bins[5]["accuracy"] == 0.5
    assert expected_calibration_error(bins) == pytest.approx(0.27)
    assert bins[0]["accuracy"] is None


def test_bins_agree_with_sklearn_calibration_curve():
    rng = np.random.default_rng(0)
    confidence = rng.random(400)
    hit = rng.random(400) < confidence
    bins = reliability_bins(hit, confidence, n_bins=10)
    prob_true, prob_pred = calibration_curve(hit, confidence, n_bins=10, strategy="uniform")
    filled = [b for b in bins if b["count"]]
    assert [b["accuracy"] for b in filled] == pytest.approx(prob_true, abs=1e-6)  # bins keep 6 decimals
    assert [b["confidence"] for b in filled] == pytest.approx(prob_pred, abs=1e-6)


def _over_confident(n, seed):
    """A 3-class model whose logits are 4x too large: right ~80% of the time, far more confident than that."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 1.8 * np.eye(3)[y]
    return 4.0 * logits, y


def test_temperature_scaling_lowers_the_nll_and_keeps_the_prediction():
    val_logits, val_y = _over_confident(600, 0)
    test_logits, test_y = _over_confident(600, 1)
    t = fit_temperature(val_logits, val_y)
    assert t > 2.0  # over-confident: the logits are divided down
    assert negative_log_likelihood(val_logits, val_y, t) < 0.8 * negative_log_likelihood(val_logits, val_y)
    # the minimum: a little off T either way is worse
    for other in (0.9 * t, 1.1 * t):
        assert negative_log_likelihood(val_logits, val_y, t) < negative_log_likelihood(val_logits, val_y, other)
    scaled = scaled_probabilities(test_logits, t)
    assert (scaled.argmax(1) == test_logits.argmax(1)).all()
    report = calibration_report(test_y, test_logits, t)
    assert report["ece_scaled"] < 0.5 * report["ece"] and report["nll_scaled"] < report["nll"]
    assert report["temperature"] == pytest.approx(t, abs=1e-6)
    assert report["ece"] == pytest.approx(
        expected_calibration_error(top_label_bins(test_y, softmax(test_logits, 1))), abs=1e-5)


def test_binary_report_has_the_positive_class_bins():
    logits = np.log(PROBS)
    report = calibration_report(Y, logits, None, positive=1)
    assert "ece_scaled" not in report and report["ece"] == pytest.approx(0.27)
    # P(positive) 0.05 0.15 0.4 0.7 0.55 against positive? 0 1 0 1 0:
    # (0,0.1]: 0.05/5 = 0.01; (0.1,0.2]: |1-0.15|/5 = 0.17; (0.3,0.4]: 0.4/5 = 0.08;
    # (0.5,0.6]: 0.55/5 = 0.11; (0.6,0.7]: 0.3/5 = 0.06
    assert report["positive_ece"] == pytest.approx(0.43)


def test_a_split_without_mistakes_keeps_temperature_one():
    # every prediction right: the NLL falls towards T -> 0, which would make every probability 0 or 1
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 0.5]])
    assert negative_log_likelihood(logits, [0, 1, 0], 0.1) < negative_log_likelihood(logits, [0, 1, 0], 1.0)
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0
    assert fit_temperature(logits, np.array([0, 1, 1])) != 1.0
