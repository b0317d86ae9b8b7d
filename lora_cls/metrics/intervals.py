"""95% intervals around a split's metrics, and the paired comparison of two models on the same images.

Proportions (accuracy, sensitivity, specificity) get Wilson's score interval (scipy.stats.binomtest's
`proportion_ci(method="wilson")`): exact-coverage intervals are too wide and the normal approximation is wrong
near 0 and 1, where good classifiers sit; Wilson's is the usual choice for a test-set accuracy. The metrics that
are not a proportion (balanced accuracy, macro F1, ROC AUC) get a stratified percentile bootstrap: the images
are resampled within each true class (so every replicate has the split's class counts), RESAMPLES times from a
generator seeded with SEED, so the same predictions always give the same interval. scipy.stats.bootstrap cannot
stratify, and sklearn's metric functions cost ~1 ms a call (seconds per split for 1,000 replicates), so the
replicates are computed from per-class counts on the whole (replicates × images) array at once; tests pin them
to sklearn's functions on the same resamples.

Two models on the same images (lora-compare): McNemar's exact test on the discordant pairs (a binomial test of
b against b + c at 1/2, scipy.stats.binomtest) and a paired bootstrap interval of the accuracy difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy.stats import binomtest, rankdata

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0
_CHUNK = 100  # replicates per block: (100 × N) arrays, so a split of 27,558 images needs ~30 MB at a time
BOOTSTRAP = f"stratified percentile bootstrap ({RESAMPLES} resamples, seed {SEED})"


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> list[float] | None:
    """Wilson's score interval [lo, hi] for `successes` of `n` (None when n is 0). 90 of 100: [0.8256, 0.9448]."""
    if n <= 0:
        return None
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def stratified_resamples(y_true: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                         chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows (≤ chunk, N): row r resamples, with replacement, the positions of each true
    class among themselves, so column j always holds an image of y_true[j]'s class."""
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        idx = np.empty((rows, len(y_true)), dtype=np.int64)
        for positions in groups:
            idx[:, positions] = positions[rng.integers(0, len(positions), (rows, len(positions)))]
        done += rows
        yield idx


def _replicate_metrics(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray | None,
                       idx: np.ndarray) -> dict[str, np.ndarray]:
    """balanced accuracy, macro F1 (over the classes in y_true, zero_division 0, as sklearn) and, given the
    positive-class `score` of a binary task, ROC AUC (Mann-Whitney U with average ranks) of each resample row."""
    pred = y_pred[idx]
    correct = pred == y_true[idx]
    recalls, f1s = [], []
    for c in np.unique(y_true):
        cols = y_true == c  # stratified: these columns hold class c in every row
        tp = correct[:, cols].sum(1)
        fn = cols.sum() - tp
        fp = (pred[:, ~cols] == c).sum(1)
        recalls.append(tp / cols.sum())
        denom = 2 * tp + fp + fn
        f1s.append(np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0))
    out = {"balanced_accuracy": np.mean(recalls, axis=0), "macro_f1": np.mean(f1s, axis=0)}
    if score is not None:
        positive = y_true == 1
        n_pos, n_neg = positive.sum(), (~positive).sum()
        ranks = rankdata(score[idx], axis=1)
        u = ranks[:, positive].sum(1) - n_pos * (n_pos + 1) / 2
        out["roc_auc"] = u / (n_pos * n_neg)
    return out


def bootstrap_intervals(y_true: np.ndarray, probs: Sequence[np.ndarray], positive: int | None = None,
                        resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL,
                        with_accuracy: bool = False) -> dict[str, list[float]]:
    """Percentile intervals of balanced accuracy, macro F1 and (binary, `positive` given, both classes present)
    ROC AUC, by the stratified bootstrap over images. `probs` holds one (N, K) array per model: with several
    (k-fold models on one test split) each replicate's statistic is their mean, so the interval is that of the
    models' mean under resampling of the images. `with_accuracy` adds accuracy, sensitivity and specificity."""
    y_true = np.asarray(y_true).astype(np.int64)
    preds = [np.asarray(p).argmax(1) for p in probs]
    binary = positive is not None and len(np.unique(y_true)) == 2 and np.asarray(probs[0]).shape[1] == 2
    labels = (y_true == positive).astype(np.int64) if binary else y_true
    scores = [np.asarray(p)[:, positive] if binary else None for p in probs]
    collected: dict[str, list[np.ndarray]] = {}
    for idx in stratified_resamples(y_true, resamples, seed):
        per_model = [_replicate_metrics(labels if binary else y_true, (pred == positive).astype(np.int64)
                                        if binary else pred, score, idx) for pred, score in zip(preds, scores)]
        if with_accuracy:
            for pred, metrics in zip(preds, per_model):
                correct = pred[idx] == y_true[idx]
                metrics["accuracy"] = correct.mean(1)
                if binary:
                    pos = y_true == positive
                    metrics["sensitivity"] = correct[:, pos].mean(1)
                    metrics["specificity"] = correct[:, ~pos].mean(1)
        for key in per_model[0]:
            collected.setdefault(key, []).append(np.mean([m[key] for m in per_model], axis=0))
    tail = 100 * (1 - level) / 2
    return {key: [float(v) for v in np.percentile(np.concatenate(blocks), [tail, 100 - tail])]
            for key, blocks in collected.items()}


def metric_intervals(y_true: np.ndarray, probs: np.ndarray, positive: int | None = None) -> dict[str, list[float]]:
    """The 95% interval of every metric a split reports: Wilson for accuracy, sensitivity and specificity, the
    stratified bootstrap for balanced accuracy, macro F1 and ROC AUC (binary; absent when one class is missing)."""
    y_true = np.asarray(y_true).astype(np.int64)
    correct = np.asarray(probs).argmax(1) == y_true
    ci: dict[str, list[float]] = {"accuracy": wilson_interval(int(correct.sum()), len(y_true))}
    ci.update(bootstrap_intervals(y_true, [probs], positive))
    if positive is not None and np.asarray(probs).shape[1] == 2:
        for key, members in (("sensitivity", y_true == positive), ("specificity", y_true != positive)):
            interval = wilson_interval(int(correct[members].sum()), int(members.sum()))
            if interval is not None:
                ci[key] = interval
    return {key: [round(lo, 6), round(hi, 6)] for key, (lo, hi) in ci.items()}


def interval_methods(level: float = LEVEL) -> dict[str, object]:
    """metrics.json `ci_method`: how each interval of `ci` was computed."""
    return {"level": level, "accuracy": "wilson", "sensitivity": "wilson", "specificity": "wilson",
            "balanced_accuracy": BOOTSTRAP, "macro_f1": BOOTSTRAP, "roc_auc": BOOTSTRAP}


def intervals_overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Whether two [lo, hi] intervals share a point (None when either is missing)."""
    if a is None or b is None:
        return None
    return bool(a[0] <= b[1] and b[0] <= a[1])


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact test of two models on the same images: b = images only A gets right, c = only B gets
    right; two-sided p of b under Binomial(b + c, 1/2) (1.0 when no image is discordant)."""
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p)}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, y_true: np.ndarray,
                      resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, float]:
    """Accuracy of A minus accuracy of B on the same images, with its paired stratified-bootstrap percentile
    interval (both models scored on the same resampled images in each replicate)."""
    diff = np.asarray(correct_a, float) - np.asarray(correct_b, float)
    replicates = np.concatenate([diff[idx].mean(1) for idx in stratified_resamples(y_true, resamples, seed)])
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return {"difference": float(diff.mean()), "lo": float(lo), "hi": float(hi)}
