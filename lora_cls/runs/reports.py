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
from lora_cls.metrics.classification import classification_metrics, confusion, resolve_positive_class
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
                  title: str | None = None) -> dict:
    """A split's metrics from an evaluation (`out`: y_true (N,), probs (N, K), loss, y_pred), and, when `folder`
    is given, its classification report and confusion matrix written there (`write_split_reports`)."""
    if folder is not None:
        write_split_reports(folder, out.y_true, out.y_pred, classes, positive_class, title=title)
    return classification_metrics(out.y_true, out.probs, list(classes), positive_class, loss=out.loss)


def write_split_reports(
    out_dir: str | os.PathLike,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    positive_class: str | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write a split's classification report (txt, json) and confusion matrix (csv, png) into `out_dir`.

    `y_true`, `y_pred`: (N,) class indices into `classes`. For binary problems the txt report starts with
    the positive class and its sensitivity/specificity. Returns the written paths by file name.
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
    write_text(paths["classification_report.txt"], header + report_txt)
    write_json(paths["classification_report.json"], report_dict)
    write_confusion_csv(paths["confusion_matrix.csv"], cm, classes)
    plot_confusion_matrix(cm, classes, paths["confusion_matrix.png"], title=title)
    return paths


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


