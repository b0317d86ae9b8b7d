"""What a run prints on the console: metrics, parameter counts, the sweep summary and predictions as rich tables."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lora_cls.runs.summary import (
    PAIRED_COLUMNS,
    SUMMARY_FIELDS,
    _format_summary_value,
    overlap_notes,
    with_interval,
)


def print_parameter_report(report: dict, title: str = "Parameters", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("block")
    table.add_column("total", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("trainable %", justify="right")
    for name, c in report["blocks"].items():
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        table.add_row(name, f"{c['total']:,}", f"{c['trainable']:,}", f"{pct:.2f}")
    table.add_section()
    table.add_row("all", f"{report['total']:,}", f"{report['trainable']:,}", f"{report['trainable_pct']:.2f}",
                  style="bold")
    (console or Console()).print(table)


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
    ci = metrics.get("ci") or {}
    if ci:
        summary.add_column("95% interval", justify="right")
    rows = [
        ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro F1", "macro_f1"),
    ]
    if "roc_auc" in metrics:
        rows.append(("ROC AUC", "roc_auc"))
    if "sensitivity" in metrics:
        positive = metrics.get("positive_class", "positive class")
        rows.append((f"sensitivity ({positive})", "sensitivity"))
        rows.append(("specificity", "specificity"))
    rows.append(("loss", "loss"))
    calibration = metrics.get("calibration") or {}
    if "ece" in calibration:
        rows.append(("ECE (calibration)", calibration["ece"]))
        if "ece_scaled" in calibration:
            rows.append((f"ECE at T = {calibration['temperature']:.3g}", calibration["ece_scaled"]))
    if "n" in metrics:
        rows.append(("n", "n"))
    for name, key in rows:
        value = metrics.get(key) if isinstance(key, str) else key
        cells = [name, _fmt(value)]
        if ci:
            interval = ci.get(key) if isinstance(key, str) else None
            cells.append(f"{interval[0]:.4f}–{interval[1]:.4f}" if interval else "")
        summary.add_row(*cells)
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


def print_sweep_summary(rows: Sequence[dict], console: Console | None = None, title: str = "Sweep summary") -> None:
    """Print sweep summary rows (from `write_sweep_summary`) as a rich table."""
    console = console or Console()
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    # The terminal gets what tells jobs apart: swept keys that vary, status and the headline numbers
    # (summary.csv and summary.md keep every column).
    headline = ("job", "status", "trainable", "val_accuracy", "test_accuracy", "train_seconds", "error")
    # `finetune` is both a summary field and an override (finetune=lora,full,linear): shown when it varies.
    varying = [c for c in columns if (c not in SUMMARY_FIELDS or c == "finetune") and c not in ("job", *PAIRED_COLUMNS)
               and len({repr(r.get(c)) for r in rows}) > 1]
    shown = ["job", *varying, *[c for c in headline[1:] if c in columns]]
    if not any(r.get("error") for r in rows):
        shown.remove("error") if "error" in shown else None
    columns = shown
    table = Table(
        title=f"{title} ({len(rows)} job{'s' if len(rows) != 1 else ''})", header_style="bold"
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("job", "status", "error", "finetune") else "right"
        )
    styles = {"ok": "green", "failed": "red", "missing": "yellow"}
    for row in rows:
        cells = [with_interval(row, c) if c in ("val_accuracy", "test_accuracy") else _format_summary_value(c, row.get(c))
                 for c in columns]
        table.add_row(
            *cells, style=None if row.get("status") == "ok" else styles.get(row.get("status"), "red")
        )
    console.print(table)
    for note in overlap_notes([r for r in rows if "status" in r]):
        console.print(note.replace("`", ""), soft_wrap=True)


def _cut(text: str, width: int, keep_end: bool = False) -> str:
    """`text` cut to `width` characters with an ellipsis; `keep_end` keeps the end (a path's file name)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "…"


def print_predictions(rows: Sequence[dict[str, Any]], classes: Sequence[str], show: int = 20,
                      console: Console | None = None) -> None:
    """The first `show` rows and the number of images predicted per class, readable at 80 columns: a column per
    class for up to three classes, else the predicted class's probability and the runner-up."""
    console = console or Console()
    shown = rows[:show]
    # Paths relative to the folder they share keep the table narrow; the CSV keeps them whole.
    base = os.path.commonpath([os.path.dirname(r["path"]) for r in shown]) if len(shown) > 1 else ""
    title = f"predictions ({len(shown)} of {len(rows)})" + (f", paths under {base}" if base else "")
    names = [str(c) for c in classes]
    lw = min(14, max(9, *map(len, names)))  # class names are cut to this width
    per_class = len(names) <= 3
    widths = [lw, *([max(6, min(10, len(c))) for c in names] if per_class else [6, lw + 5])]
    # Each column adds a border and two spaces of padding; the path takes what is left of the console.
    path_width = max(12, console.width - sum(widths) - 3 * (len(widths) + 1) - 1)
    table = Table(title=title, header_style="bold")
    headers = ["path", "predicted", *([_cut(c, w) for c, w in zip(names, widths[1:])] if per_class
                                      else ["p", "runner-up"])]
    for i, (header, width) in enumerate(zip(headers, [path_width, *widths])):
        table.add_column(header, width=width, no_wrap=True,
                         justify="right" if 2 <= i < 2 + len(names) and per_class or header == "p" else "left")
    for row in shown:
        path = _cut(os.path.relpath(row["path"], base) if base else row["path"], path_width, keep_end=True)
        probs = {c: row[f"prob_{c}"] for c in names}
        if per_class:
            table.add_row(path, _cut(row["predicted"], lw), *(f"{probs[c]:.4f}" for c in names))
        else:
            second = max((c for c in names if c != row["predicted"]), key=probs.__getitem__)
            table.add_row(path, _cut(row["predicted"], lw), f"{probs[row['predicted']]:.4f}",
                          f"{_cut(second, lw)} {probs[second]:.2f}")
    console.print(table)
    counts = Table(title="predicted classes", header_style="bold")
    counts.add_column("class")
    counts.add_column("images", justify="right")
    predicted = Counter(row["predicted"] for row in rows)
    for c in classes:
        counts.add_row(c, f"{predicted.get(c, 0):,}")
    console.print(counts)


def print_export(report: dict[str, Any], out: str | Path, console: Any = None) -> None:
    """The exported model's size against the base model's (low-rank), and the verification, on the console."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"lora-export · {report['model']} · {report['format']}"
                        + (" (low-rank)" if report["low_rank"] else ""), header_style="bold")
    for column in ("model", "parameters", "file MB", f"MMACs/image at {report['image_size']} px"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [("base", report["base"]), ("exported", report["exported"])] if "base" in report else [
        ("exported", report["exported"])]
    ratios = report.get("ratios_vs_base", {})
    for name, stats in rows:
        def cell(key: str, text: str, name: str = name) -> str:
            return text + (f" ({ratios[key]:.3f}×)" if name == "exported" and key in ratios else "")

        table.add_row(name, cell("parameters", f"{stats['parameters']:,}"),
                      cell("file_bytes", f"{stats['file_bytes'] / 1e6:.2f}"), cell("macs", f"{stats['macs'] / 1e6:,.1f}"))
    console.print(table)
    v = report["verification"]
    console.print(f"verified on {v['source']}: max |logit difference| {v['max_abs_logit_diff']:.2e} "
                  f"(allowed {v['allowed_diff']:.2e}: tolerance {v['tolerance']:g} × largest |logit|, float32)",
                  soft_wrap=True)
    if "peft" in report:  # format=peft: PeftModel.from_pretrained's own logits, when PEFT is installed
        p = report["peft"]
        console.print(f"checked through PEFT {p['version']} (PeftModel.from_pretrained on {p['base_model']}): max "
                      f"|logit difference| {p['max_abs_logit_diff']:.2e}" if p["checked"] else
                      f"not checked through PEFT: {p['reason']} (pip install 'lora-cls[peft]')", soft_wrap=True)
    console.print(f"export: {Path(out) / report['file']}", soft_wrap=True)
