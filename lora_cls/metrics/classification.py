"""Classification metrics as plain numbers (no files; reports.py writes them).

Every value returned is a built-in Python type (float, int, str, None) so the dict goes straight into
metrics.json (docs/DESIGN.md §6).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix

from lora_cls.errors import UserError


def resolve_positive_class(classes: Sequence[str], positive_class: str | None) -> int:
    """Index of the positive class of a binary problem: `positive_class` if given, else `classes[1]`."""
    if positive_class is None:
        return 1
    if positive_class not in classes:
        raise UserError(f"positive_class {positive_class!r} is not one of the classes {list(classes)}")
    return list(classes).index(positive_class)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (K, K) of int64 counts: rows are true classes, columns predicted classes.

    Every class 0..K-1 gets a row and a column, present in the data or not.
    """
    return _sk_confusion_matrix(
        np.asarray(y_true), np.asarray(y_pred), labels=list(range(num_classes))
    ).astype(np.int64)


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
    loss: float | None = None,
) -> dict:
    """Metrics of one split from true labels (N,) and class probabilities (N, K).

    The prediction is `probs.argmax(1)`. Returns
    `{"loss", "accuracy", "balanced_accuracy", "macro_f1", "per_class": {name: {"precision", "recall", "f1",
    "support"}}, "n"}` and, for K == 2, `"roc_auc"` (score = probability of the positive class; None when
    y_true holds a single class or the probabilities are not finite), `"sensitivity"` (recall of the positive
    class), `"specificity"` (recall of the other one) and `"positive_class"` (its name).

    Every class gets a per-class row (support 0 when absent); `classes_absent` names the classes with no
    sample in y_true. Macro F1 and balanced accuracy (sklearn's) average over the classes present in y_true;
    undefined ratios are 0 (sklearn's zero_division=0).
    """
    y_true, probs = _checked(y_true, probs, len(classes))
    num_classes = len(classes)
    y_pred = probs.argmax(axis=1)
    labels = list(range(num_classes))
    # sklearn warns when y_pred holds a class y_true lacks; absent classes are expected here (small splits).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        balanced = balanced_accuracy_score(y_true, y_pred)
        # Over the classes present in y_true: a class with no image in the split has no F1 to average (it
        # would pull the mean towards 0 whatever the model does); the absent ones are named in the result.
        present = sorted(set(y_true.tolist()))
        macro_f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)

    out: dict = {
        "loss": None if loss is None else float(loss),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
        "classes_absent": [str(classes[k]) for k in labels if k not in present],
    }
    if num_classes == 2:
        pos = resolve_positive_class(classes, positive_class)
        neg = 1 - pos
        out["roc_auc"] = _binary_roc_auc(y_true == pos, probs[:, pos])
        out["sensitivity"] = float(recall[pos])
        out["specificity"] = float(recall[neg])
        out["positive_class"] = str(classes[pos])
    out["per_class"] = {
        str(name): {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(classes)
    }
    out["n"] = int(y_true.shape[0])
    return out


def _checked(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 (N,) and probabilities as float64 (N, K); a ValueError for shapes or labels that do not fit."""
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (y_true.shape[0], num_classes):
        raise ValueError(
            f"probs must have shape (N, K) = ({y_true.shape[0]}, {num_classes}), got {probs.shape}"
        )
    if y_true.shape[0] == 0:
        raise ValueError("no samples to compute metrics on")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y_true.min()}..{y_true.max()}")

    return y_true, probs


def _binary_roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float | None:
    # AUC is undefined with one class present, and a diverged model's NaN scores must not crash a run.
    if is_positive.all() or not is_positive.any() or not np.isfinite(score).all():
        return None
    auc = float(roc_auc_score(is_positive.astype(np.int64), score))
    return auc if math.isfinite(auc) else None
