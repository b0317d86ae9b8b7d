"""What a run's results look like to a reader (docs/DESIGN.md §6): split reports, history, curves, console tables.

Files are written through `runfolder.atomic_open`. Figures are drawn on `matplotlib.figure.Figure` objects, not
pyplot: no global state, no display backend needed. The sweep summary is `lora_cls.sweep`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table
from sklearn.metrics import classification_report

from lora_cls.metrics import classification_metrics, confusion, resolve_positive_class
from lora_cls.runfolder import atomic_open, write_json, write_text

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


_PNG_DPI = 120


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


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


def plot_confusion_matrix(
    cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str | None = None
) -> None:
    """Heatmap of a (K, K) confusion matrix; each cell shows its count and its share of the true class."""
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    row_sums = cm.sum(axis=1, keepdims=True)
    # Colour by row share, not count, so a minority class's errors are as visible as a majority class's.
    share = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=np.float64), where=row_sums > 0)

    side = min(max(4.8, 0.6 * k + 2.8), 16.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")

    font = 11 if k <= 5 else 9 if k <= 10 else max(5.0, 9.0 - 0.35 * (k - 10))
    for i in range(k):
        for j in range(k):
            pct = f"{100.0 * share[i, j]:.1f}%" if row_sums[i, 0] else "–"
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{pct}",
                ha="center",
                va="center",
                fontsize=font,
                color="white" if share[i, j] > 0.5 else "black",
            )
    names = [shorten(c, 24) for c in classes]
    if k > 3 or max(map(len, names)) > 10:
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n={int(cm.sum())})")
    save_figure(fig, path)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


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


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, best_epoch: int | None = None) -> None:
    """Training curves from history rows: loss, accuracy, learning rate and decay factor d against epoch.

    The best epoch, if given, is marked by a vertical line in every panel.
    """
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    epochs = np.array([_as_float(r.get("epoch")) for r in rows], dtype=np.float64)
    panels = [
        (axes[0, 0], "loss", [("train_loss", "train"), ("val_loss", "val")]),
        (
            axes[0, 1],
            "accuracy",
            [
                ("train_accuracy", "train"),
                ("val_accuracy", "val"),
                ("val_balanced_accuracy", "val balanced"),
            ],
        ),
        (axes[1, 0], "learning rate", [("lr", "lr")]),
        (axes[1, 1], "decay factor d", [("d", "d")]),
    ]
    for ax, name, series in panels:
        drawn = False
        for key, label in series:
            values = np.array([_as_float(r.get(key)) for r in rows], dtype=np.float64)
            if np.isfinite(values).any():
                ax.plot(epochs, values, marker="o", markersize=4, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})"
            )
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if drawn and (len(series) > 1 or best_epoch is not None):
            ax.legend(fontsize=8)
    axes[1, 1].set_ylim(-0.05, 1.05)
    axes[1, 0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    finite_epochs = epochs[np.isfinite(epochs)]
    if (
        finite_epochs.size
        and np.allclose(finite_epochs, np.round(finite_epochs))
        and finite_epochs.size <= 20
    ):
        axes[1, 0].set_xticks(np.unique(finite_epochs))
    else:
        axes[1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Training curves ({len(rows)} epoch{'s' if len(rows) != 1 else ''})")
    save_figure(fig, path)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return math.nan
    return float(value)


# ------------------------------------------------------------------------------------------------ console


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def print_metrics(metrics: dict, title: str, console: Console | None = None) -> None:
    """Print a split's metrics (from `classification_metrics`) as two rich tables: summary and per class."""
    console = console or Console()
    summary = Table(title=title, show_header=True, header_style="bold")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows = [
        ("accuracy", metrics.get("accuracy")),
        ("balanced accuracy", metrics.get("balanced_accuracy")),
        ("macro F1", metrics.get("macro_f1")),
    ]
    if "roc_auc" in metrics:
        rows.append(("ROC AUC", metrics.get("roc_auc")))
    if "sensitivity" in metrics:
        positive = metrics.get("positive_class", "positive class")
        rows.append((f"sensitivity ({positive})", metrics.get("sensitivity")))
        rows.append(("specificity", metrics.get("specificity")))
    rows.append(("loss", metrics.get("loss")))
    if "n" in metrics:
        rows.append(("n", metrics.get("n")))
    for name, value in rows:
        summary.add_row(name, _fmt(value))
    console.print(summary)

    per_class = metrics.get("per_class") or {}
    if per_class:
        table = Table(title=f"{title}: per class", show_header=True, header_style="bold")
        table.add_column("class")
        for column in ("precision", "recall", "F1", "support"):
            table.add_column(column, justify="right")
        for name, values in per_class.items():
            table.add_row(
                str(name),
                _fmt(values.get("precision")),
                _fmt(values.get("recall")),
                _fmt(values.get("f1")),
                _fmt(values.get("support")),
            )
        console.print(table)
