"""Intervals around a split's metrics and the paired test of two models (lora_cls.metrics.intervals), against
published values, hand-computed statistics and sklearn's own metric functions on the same resamples."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from lora_cls.metrics.intervals import (
    _replicate_metrics,
    bootstrap_intervals,
    intervals_overlap,
    mcnemar_exact,
    metric_intervals,
    paired_difference,
    stratified_resamples,
    wilson_interval,
)


def test_wilson_interval_of_90_of_100_is_the_published_one():
    # Wilson (1927); Newcombe (1998), Table I: 0.8256 to 0.9448 for 90/100 at 95%.
    lo, hi = wilson_interval(90, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    # 0 of 10 keeps a positive upper end (the normal approximation would give [0, 0]): 0 to 0.2775 (Newcombe)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(0, 0) is None


def _noisy_binary(n=300, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    score = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.3, n), 0.001, 0.999)
    return y, np.stack([1 - score, score], axis=1)


def test_stratified_resamples_keep_each_column_in_its_class():
    y, _ = _noisy_binary()
    blocks = list(stratified_resamples(y, resamples=250, seed=3, chunk=100))
    assert [b.shape[0] for b in blocks] == [100, 100, 50]
    idx = np.concatenate(blocks)
    assert (y[idx] == y[None, :]).all()  # every replicate has the split's class counts
    again = np.concatenate(list(stratified_resamples(y, resamples=250, seed=3, chunk=100)))
    assert (idx == again).all()


def test_replicate_metrics_equal_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    pred = np.where(rng.random(120) < 0.7, y, rng.integers(0, 3, 120))
    idx = next(stratified_resamples(y, resamples=5, seed=0))
    got = _replicate_metrics(y, pred, None, idx)
    for r in range(5):
        assert got["balanced_accuracy"][r] == pytest.approx(balanced_accuracy_score(y[idx[r]], pred[idx[r]]))
        assert got["macro_f1"][r] == pytest.approx(f1_score(y[idx[r]], pred[idx[r]], average="macro",
                                                            labels=[0, 1, 2], zero_division=0))
    yb, probs = _noisy_binary()
    probs[::7, 1] = 0.5  # ties, which the rank formula averages as sklearn does
    idx = next(stratified_resamples(yb, resamples=4, seed=1))
    got = _replicate_metrics(yb, probs.argmax(1), probs[:, 1], idx)
    for r in range(4):
        assert got["roc_auc"][r] == pytest.approx(roc_auc_score(yb[idx[r]], probs[idx[r], 1]))


def test_intervals_are_reproducible_and_cover_the_point_estimate():
    y, probs = _noisy_binary()
    ci = metric_intervals(y, probs, positive=1)
    assert ci == metric_intervals(y, probs, positive=1)
    pred = probs.argmax(1)
    points = {"accuracy": (pred == y).mean(), "balanced_accuracy": balanced_accuracy_score(y, pred),
              "macro_f1": f1_score(y, pred, average="macro"), "roc_auc": roc_auc_score(y, probs[:, 1]),
              "sensitivity": (pred[y == 1] == 1).mean(), "specificity": (pred[y == 0] == 0).mean()}
    assert set(ci) == set(points)
    for key, value in points.items():
        lo, hi = ci[key]
        assert lo < value < hi, key
        assert hi - lo < 0.25, key
    # Another seed moves the bootstrap ends a little, not the Wilson ones.
    other = bootstrap_intervals(y, [probs], positive=1, seed=7)
    assert other["macro_f1"] != ci["macro_f1"] and abs(other["macro_f1"][0] - ci["macro_f1"][0]) < 0.02
    assert ci["accuracy"] == pytest.approx(wilson_interval(int((pred == y).sum()), len(y)), abs=1e-6)


def test_bootstrap_over_several_models_is_the_interval_of_their_mean():
    y, probs = _noisy_binary()
    one = bootstrap_intervals(y, [probs], positive=1, with_accuracy=True)
    same_twice = bootstrap_intervals(y, [probs, probs], positive=1, with_accuracy=True)
    assert same_twice.keys() == one.keys()
    for key in one:
        assert same_twice[key] == pytest.approx(one[key])
    perfect = np.eye(2)[y]
    mixed = bootstrap_intervals(y, [probs, perfect], positive=1, with_accuracy=True)
    assert mixed["accuracy"][0] == pytest.approx((one["accuracy"][0] + 1) / 2, abs=0.02)


def test_mcnemar_exact_matches_the_hand_computed_binomial_test():
    # 100 images: both right on 80, only A right on 8, only B right on 2, both wrong on 10.
    a = np.array([1] * 80 + [1] * 8 + [0] * 2 + [0] * 10, bool)
    b = np.array([1] * 80 + [0] * 8 + [1] * 2 + [0] * 10, bool)
    test = mcnemar_exact(a, b)
    assert (test["only_a"], test["only_b"]) == (8, 2)
    # two-sided exact: 2·P(X <= 2 | n=10, p=1/2) = 2·(1 + 10 + 45)/1024
    assert test["p_value"] == pytest.approx(112 / 1024)
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    y = np.array([0, 1] * 50)
    diff = paired_difference(a, b, y)
    assert diff["difference"] == pytest.approx(0.06)
    assert diff["lo"] <= 0.06 <= diff["hi"] and diff["lo"] >= 0.0 - 1e-12
    assert diff == paired_difference(a, b, y)


def test_overlap_of_two_intervals():
    assert intervals_overlap([0.8, 0.9], [0.85, 0.95]) is True
    assert intervals_overlap([0.8, 0.84], [0.85, 0.95]) is False
    assert intervals_overlap(None, [0.1, 0.2]) is None
