"""What a run's results look like to a reader (docs/DESIGN.md §6): split reports, history, curves, console tables.

Files are written through `runfolder.atomic_open`. Figures are drawn on `matplotlib.figure.Figure` objects, not
pyplot: no global state, no display backend needed. The sweep summary is `lora_cls.sweep`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report

from lora_cls.files import atomic_open, write_json, write_text
from lora_cls.metrics.calibration import calibration_report
from lora_cls.metrics.classification import classification_metrics, confusion, resolve_positive_class
from lora_cls.metrics.intervals import interval_methods, metric_intervals
from lora_cls.runs.diagnostics import plot_reliability, plot_roc_pr
from lora_cls.runs.plots import plot_confusion_matrix

# Math-text tick labels (10^5 on a log axis) ask for STIX fonts and fall back to DejaVu Sans, which matplotlib
# logs once per glyph; under Hydra's logging that is a screenful of noise after every sweep.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

HISTORY_FIELDS = [
    "epoch",
    "step",
    "lr",
    "d",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "images_per_second",
    "seconds",
]


# ----------------------------------------------------------------------------------------- split reports


def split_results(out: Any, classes: Sequence[str], positive_class: str | None, folder: str | os.PathLike | None = None,
                  title: str | None = None, temperature: float | None = None,
                  paths: Sequence[str] | None = None) -> dict:
    """A split's metrics from an evaluation (`out`: y_true (N,), probs (N, K), logits (N, K) or None, loss, y_pred)
    with their 95% intervals (`ci`, `ci_method`) and calibration (ECE and bins; with a fitted `temperature`, also
    after scaling); when `folder` is given, its reports are written there (`write_split_reports`,
    `write_split_diagnostics`; `paths`: the images' paths, for predictions.csv)."""
    metrics = classification_metrics(out.y_true, out.probs, list(classes), positive_class, loss=out.loss)
    positive = resolve_positive_class(classes, positive_class) if len(classes) == 2 else None
    metrics["ci"] = metric_intervals(out.y_true, out.probs, positive)
    metrics["ci_method"] = interval_methods()
    logits = out.logits if getattr(out, "logits", None) is not None else np.log(np.clip(out.probs, 1e-30, None))
    if np.isfinite(logits).all():
        metrics["calibration"] = calibration_report(out.y_true, logits, temperature, positive)
    if folder is not None:
        write_split_reports(folder, out.y_true, out.y_pred, classes, positive_class, title=title, ci=metrics["ci"])
        write_split_diagnostics(folder, out.y_true, out.probs, classes, positive, metrics.get("calibration"),
                                paths, title or "")
    return metrics


def write_split_diagnostics(out_dir: str | os.PathLike, y_true: np.ndarray, probs: np.ndarray,
                            classes: Sequence[str], positive: int | None, calibration: dict | None,
                            paths: Sequence[str] | None, title: str) -> None:
    """predictions.csv (one row per image: path, true, predicted, prob_<class>; what lora-compare pairs runs on),
    roc_pr.png and reliability.png in `out_dir`."""
    out_dir = Path(out_dir)
    if paths is not None:
        write_split_predictions(out_dir / PREDICTIONS, paths, y_true, probs, classes)
    plot_roc_pr(y_true, probs, classes, positive, out_dir / "roc_pr.png", title)
    if calibration is not None:
        plot_reliability(calibration, out_dir / "reliability.png", title,
                         None if positive is None else str(classes[positive]))


PREDICTIONS = "predictions.csv"


def write_split_predictions(path: str | os.PathLike, paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                            classes: Sequence[str]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", *(f"prob_{c}" for c in classes)])
        for name, label, p in zip(paths, np.asarray(y_true), np.asarray(probs)):
            writer.writerow([name, classes[int(label)], classes[int(p.argmax())], *(f"{v:.6f}" for v in p)])


def read_split_predictions(path: str | os.PathLike) -> list[dict[str, str]] | None:
    """A split's predictions.csv rows (None when the run has none: runs from before it was written)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return None


def write_split_reports(
    out_dir: str | os.PathLike,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
    title: str | None = None,
    ci: dict[str, list[float]] | None = None,
) -> dict[str, Path]:
    """Write a split's classification report (txt, json) and confusion matrix (csv, png) into `out_dir`.

    `y_true`, `y_pred`: (N,) class indices into `classes`. For binary problems the txt report starts with
    the positive class and its sensitivity/specificity; with `ci` (metrics.json's intervals) it ends with them.
    Returns the written paths by file name.
    """
    out_dir = Path(out_dir)
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    classes = [str(c) for c in classes]
    labels = list(range(len(classes)))
    report_args = dict(labels=labels, target_names=classes, digits=4, zero_division=0)
    report_txt = classification_report(y_true, y_pred, **report_args)
    report_dict = classification_report(y_true, y_pred, output_dict=True, **report_args)
    cm = confusion(y_true, y_pred, len(classes))

    header = ""
    if len(classes) == 2:
        pos = resolve_positive_class(classes, positive_class)
        neg = 1 - pos
        header = (
            f"positive class: {classes[pos]}\n"
            f"sensitivity (recall of {classes[pos]}): {_row_recall(cm, pos):.4f}\n"
            f"specificity (recall of {classes[neg]}): {_row_recall(cm, neg):.4f}\n\n"
        )

    absent = [classes[k] for k in labels if not (y_true == k).any()]
    if absent:
        header += (f"no image of class(es) {', '.join(absent)} in this split: their rows have support 0, and the "
                   "macro F1 and balanced accuracy in metrics.json average over the classes present\n\n")
    paths = {
        name: out_dir / name
        for name in (
            "classification_report.txt",
            "classification_report.json",
            "confusion_matrix.csv",
            "confusion_matrix.png",
        )
    }
    write_text(paths["classification_report.txt"], header + report_txt + _interval_lines(ci))
    write_json(paths["classification_report.json"], report_dict)
    write_confusion_csv(paths["confusion_matrix.csv"], cm, classes)
    plot_confusion_matrix(cm, classes, paths["confusion_matrix.png"], title=title)
    return paths


def _interval_lines(ci: dict[str, list[float]] | None) -> str:
    if not ci:
        return ""
    lines = [f"{key.replace('_', ' '):>20}  {lo:.4f} to {hi:.4f}" for key, (lo, hi) in ci.items()]
    return ("\n95% intervals (accuracy, sensitivity, specificity: Wilson; the others: stratified bootstrap, "
            "1000 resamples, seed 0)\n" + "\n".join(lines) + "\n")


def _row_recall(cm: np.ndarray, k: int) -> float:
    support = cm[k].sum()
    return float(cm[k, k] / support) if support else 0.0


def write_confusion_csv(path: str | os.PathLike, cm: np.ndarray, classes: Sequence[str]) -> None:
    """Confusion matrix as CSV: header `true\\pred,<class>...`, then one row of counts per true class."""
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *classes])
        for name, row in zip(classes, np.asarray(cm)):
            writer.writerow([name, *(int(v) for v in row)])


# ------------------------------------------------------------------------------------------------ history


def write_history(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rewrite the per-epoch history CSV atomically: HISTORY_FIELDS first, then extra keys as first seen.

    Missing values and None are written as empty cells.
    """
    fields = list(HISTORY_FIELDS)
    for row in rows:
        fields.extend(key for key in row if key not in fields)
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow(["" if row.get(key) is None else row[key] for key in fields])


def read_history(path: str | os.PathLike) -> list[dict]:
    """Read a history CSV back: integers as int, other numbers as float, empty cells as None."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{key: _parse_cell(value) for key, value in row.items()} for row in csv.DictReader(f)]


INT_RE = re.compile(r"^[+-]?\d+$")


def _parse_cell(text: str | None) -> Any:
    if text is None or text == "":
        return None
    if INT_RE.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------------------------------ console


