"""Calibration of predicted probabilities: expected calibration error over equal-width bins, and temperature
scaling (Guo et al. 2017: one scalar T, p = softmax(z / T), fitted by minimising the negative log-likelihood).

ECE (top label): the images are binned by the probability of their predicted class into N_BINS equal-width bins
(right-closed, (0.9, 1.0] the last, as torchmetrics bins); ECE = sum over bins of (n_b / N)·|accuracy_b -
confidence_b|. For a binary task the positive class's probability is binned the same way against how often the
image is positive (`positive_ece`): what a threshold on prob_<positive class> relies on. The per-bin figures are
those of sklearn.calibration.calibration_curve (the tests check them against it), which returns no counts.

T is found by scipy.optimize.minimize_scalar over log T (bounded to [0.05, 20]), on the NLL computed with
scipy.special.log_softmax (a split without a single mistake has no minimum: T stays 1); T > 0 divides every logit alike, so the predicted class (and accuracy) never changes,
nor a binary task's ROC AUC.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

N_BINS = 10
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def reliability_bins(hit: np.ndarray, confidence: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1] of `confidence` (N,): each {"lo", "hi", "count", "confidence" (mean),
    "accuracy" (mean of `hit`, 0/1)}; empty bins have count 0 and None for the means."""
    confidence = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(hit, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], confidence, side="left")  # (e_b, e_b+1] is bin b; 0 goes to bin 0
    bins = []
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        bins.append({"lo": round(float(edges[b]), 6), "hi": round(float(edges[b + 1]), 6), "count": count,
                     "confidence": round(float(confidence[members].mean()), 6) if count else None,
                     "accuracy": round(float(hit[members].mean()), 6) if count else None})
    return bins


def expected_calibration_error(bins: list[dict[str, float]]) -> float:
    """sum_b (n_b / N)·|accuracy_b - confidence_b| over the non-empty bins of `reliability_bins`."""
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def top_label_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Reliability bins of the predicted class's probability against whether the prediction is right."""
    probs = np.asarray(probs, dtype=np.float64)
    return reliability_bins(probs.argmax(1) == np.asarray(y_true), probs.max(1), n_bins)


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[true class]."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(logp)), np.asarray(y_true, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (logits (N, K), y_true (N,)): over-confident models
    get T > 1, under-confident ones T < 1. Without a single mistake the NLL falls all the way to T → 0 (every
    probability to 0 or 1): there is nothing to fit, and T = 1 is returned."""
    if (np.asarray(logits).argmax(1) == np.asarray(y_true)).all():
        return 1.0
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, y_true, math.exp(log_t)),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def scaled_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def calibration_report(y_true: np.ndarray, logits: np.ndarray, temperature: float | None,
                       positive: int | None = None, n_bins: int = N_BINS) -> dict:
    """metrics.json `calibration` of one split: ECE, NLL and the bins of the model's own probabilities, and with a
    fitted `temperature` the same after scaling (`*_scaled`); for a binary task with `positive`, the positive
    class's ECE too. `logits` (N, K): any log-probabilities of the model (softmax-equivalent)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    report: dict = {"n_bins": n_bins}
    variants = [("", 1.0)] + ([("_scaled", float(temperature))] if temperature is not None else [])
    for suffix, t in variants:
        probs = scaled_probabilities(logits, t)
        bins = top_label_bins(y_true, probs, n_bins)
        report[f"ece{suffix}"] = round(expected_calibration_error(bins), 6)
        report[f"nll{suffix}"] = round(negative_log_likelihood(logits, y_true, t), 6)
        if positive is not None and probs.shape[1] == 2:
            positive_bins = reliability_bins(y_true == positive, probs[:, positive], n_bins)
            report[f"positive_ece{suffix}"] = round(expected_calibration_error(positive_bins), 6)
            report[f"positive_bins{suffix}"] = positive_bins
        report[f"bins{suffix}"] = bins
    if temperature is not None:
        report["temperature"] = round(float(temperature), 6)
    return report
