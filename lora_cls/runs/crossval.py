"""What a k-fold cross-validation writes beside its fold folders (tasks/crossval.py): cv_summary.csv (one row per
fold, then the mean and the std), cv_summary.md (the same table, the pooled held-out figure and the test mean
with their intervals) and plots/cv_folds.png; and the table on the console."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lora_cls.files import atomic_open, write_text
from lora_cls.runs.plots import plot_cv_folds

CV_JSON = "cv.json"
COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")


def _table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (per fold, mean, std) of the summary: held-out and test figures of COLUMNS."""
    cv = metrics["cv"]
    columns = [c for c in COLUMNS if c in cv["mean"]["heldout"]]
    header = ["fold", "images", "best_epoch", *(f"heldout_{c}" for c in columns), *(f"test_{c}" for c in columns)]
    rows = [[str(r["fold"]), str(r["images"]), str(r["best_epoch"]),
             *(f"{r['heldout'][c]:.4f}" for c in columns), *(f"{r['test'][c]:.4f}" for c in columns)]
            for r in cv["per_fold"]]
    for name in ("mean", "std"):
        rows.append([name, "", "", *(f"{cv[name]['heldout'][c]:.4f}" for c in columns),
                     *(f"{cv[name]['test'][c]:.4f}" for c in columns)])
    return header, rows


def _interval(part: dict, key: str = "accuracy") -> str:
    lo, hi = part["ci"][key]
    return f"{part[key]:.4f} [{lo:.4f}, {hi:.4f}]"


def write_cv_summary(folder: Path, metrics: dict, title: str) -> None:
    header, rows = _table(metrics)
    with atomic_open(folder / "cv_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    cv, val, test = metrics["cv"], metrics["val"], metrics["test"]
    grouped = "grouped by patient, stratified" if cv["grouped_by"] else "stratified"
    mean, std = cv["mean"], cv["std"]
    lines = [f"# {title}: {cv['folds']}-fold cross-validation", "",
             f"{cv['pool']} images in the train+val pool in {cv['folds']} folds ({grouped}); test split "
             f"{test['n']} images, the same for every fold.", "",
             f"- held-out folds: accuracy {mean['heldout']['accuracy']:.4f} ± {std['heldout']['accuracy']:.4f} "
             f"(mean ± std over the folds); pooled over the {cv['pool']} held-out images {_interval(val)} "
             "(95% Wilson interval)",
             f"- test split: accuracy {mean['test']['accuracy']:.4f} ± {std['test']['accuracy']:.4f}; the "
             f"folds' mean {_interval(test)} (95% stratified bootstrap over the test images)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Each fold picks its best epoch on its held-out fold, as a run picks it on its val split, so the "
              "held-out figures lean slightly optimistic; the test split played no part in training or choosing."]
    write_text(folder / "cv_summary.md", "\n".join(lines) + "\n")
    plot_cv_folds(cv, folder / "plots" / "cv_folds.png", title)


def print_cv_summary(metrics: dict, console: Console | None = None) -> None:
    """Accuracy and ROC AUC (held-out fold, test split) per fold, mean and std: readable at 80 columns
    (cv_summary.csv and .md have every column)."""
    header, rows = _table(metrics)
    shown = [i for i, c in enumerate(header) if c in ("fold", "images", "best_epoch") or
             c.endswith(("_accuracy", "_roc_auc")) and "balanced" not in c]
    table = Table(title=f"{metrics['cv']['folds']}-fold cross-validation", header_style="bold")
    names = {"best_epoch": "best epoch", "heldout_accuracy": "held-out acc.", "heldout_roc_auc": "held-out AUC",
             "test_accuracy": "test acc.", "test_roc_auc": "test AUC"}
    for i in shown:
        table.add_column(names.get(header[i], header[i]), justify="left" if header[i] == "fold" else "right")
    for row in rows:
        table.add_row(*(row[i] for i in shown), style="bold" if row[0] in ("mean", "std") else None)
    (console or Console(stderr=True)).print(table)
