"""The sweep summary (docs/DESIGN.md §6): summary.csv, summary.md and summary.png at a multirun's root, and the
Hydra callback that writes them when the sweep ends, even when a job failed."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lora_cls.conf.overrides import override_values
from lora_cls.files import atomic_open, write_text
from lora_cls.runs.folder import METRICS, read_metrics
from lora_cls.runs.plots import _plot_sweep

log = logging.getLogger(__name__)

SUMMARY_FIELDS = [
    "status",
    "error",
    "finetune",
    "trainable",
    "trainable_pct",
    "val_accuracy",
    "val_accuracy_lo",
    "val_accuracy_hi",
    "test_accuracy",
    "test_accuracy_lo",
    "test_accuracy_hi",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_roc_auc",
    "test_ece",
    "train_seconds",
    "images_per_second",
]
# The 95% interval of a metric is in <metric>_lo and <metric>_hi (metrics.json `ci`; empty for older runs).
INTERVAL_SUFFIXES = ("_lo", "_hi")
# lora-compare's paired test of each run against the best on validation (tasks/compare.py)
PAIRED_COLUMNS = ("paired_vs", "test_accuracy_diff", "test_accuracy_diff_lo", "test_accuracy_diff_hi", "mcnemar_p")


def write_sweep_summary(sweep_dir: str | os.PathLike, title: str | None = None) -> list[dict]:
    """Summarise a Hydra multirun root into summary.csv, summary.md and summary.png; return the rows.

    A job is a folder at most two levels below `sweep_dir` holding `.hydra/overrides.yaml` or
    `metrics.json`. One row per job, in natural order of its relative path: `job`, one column per override
    key, then SUMMARY_FIELDS. A job without metrics.json has status "missing"; an unreadable one "failed".
    """
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(
        _find_job_dirs(sweep_dir), key=lambda d: _natural_key(d.relative_to(sweep_dir).as_posix())
    )
    overrides = {d: _read_overrides(d) for d in job_dirs}
    override_keys: list[str] = []
    for job_overrides in overrides.values():
        override_keys.extend(k for k in job_overrides if k not in override_keys and k != "job")
    jobs = [(d.relative_to(sweep_dir).as_posix(), overrides[d], d) for d in job_dirs]
    rows, columns = summary_table(jobs, override_keys)
    write_summary_files(sweep_dir, rows, columns, override_keys, title)
    return rows


def summary_table(jobs: Sequence[tuple[str, dict[str, Any], Path]], keys: list[str]) -> tuple[list[dict], list[str]]:
    """Rows and columns of a summary: one row per (label, {key: value}, run folder), the label in column `job`,
    then `keys`, then SUMMARY_FIELDS read from the folder's metrics.json (lora-compare shares this)."""
    rows = [_summary_row(label, values, folder) for label, values, folder in jobs]
    columns = _summary_columns(keys)
    for row in rows:
        for column in columns:
            row.setdefault(column, None)
    return [{column: row[column] for column in columns} for row in rows], columns


def write_summary_files(folder: Path, rows: list[dict], columns: list[str], keys: list[str], title: str | None,
                        stem: str = "summary", sections: Sequence[str] = ()) -> None:
    """<stem>.md (with `sections`, Markdown blocks, after the table), <stem>.png (accuracy against the first
    numeric key that varies) and <stem>.csv in `folder`."""
    # The CSV last: summary.csv marks a finished sweep (a restart refuses the folder), so it may only exist once
    # the table and the plot do.
    write_text(folder / f"{stem}.md", _summary_markdown(rows, columns, folder, title)
               + "".join(f"\n{section}\n" for section in sections))
    _plot_sweep(rows, keys, folder / f"{stem}.png", title)
    with atomic_open(folder / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in columns])


def _summary_columns(override_keys: list[str]) -> list[str]:
    # An override such as `finetune=full` shares its name with a summary field: one column, not two.
    return ["job", *override_keys, *(f for f in SUMMARY_FIELDS if f not in override_keys)]


def _find_job_dirs(sweep_dir: Path) -> list[Path]:
    def is_job(d: Path) -> bool:
        return (d / ".hydra" / "overrides.yaml").is_file() or (d / METRICS).is_file()

    def subdirs(d: Path) -> list[Path]:
        return [c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")]

    if not sweep_dir.is_dir():
        return []
    jobs = []
    for child in subdirs(sweep_dir):
        if is_job(child):
            jobs.append(child)
        else:
            jobs.extend(grandchild for grandchild in subdirs(child) if is_job(grandchild))
    return jobs


def _natural_key(text: str) -> tuple:
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", text)
        if part
    )


def _read_overrides(job_dir: Path) -> dict[str, Any]:
    """A job's overrides (its .hydra/overrides.yaml), typed as Hydra types them."""
    try:
        items = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return override_values([str(item) for item in items]) if isinstance(items, list) else {}


def _summary_row(job: str, job_overrides: dict[str, Any], job_dir: Path) -> dict:
    row: dict[str, Any] = {"job": job, **{k: v for k, v in job_overrides.items() if k != "job"}}
    metrics_path = job_dir / METRICS
    if not metrics_path.is_file():
        row["status"] = "missing"
        return row
    metrics = read_metrics(metrics_path)
    if metrics is None:
        row["status"] = "failed"
        row["error"] = "unreadable metrics.json"
        return row

    def get(*keys: str) -> Any:
        value: Any = metrics
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    status = get("status")
    row["status"] = status if isinstance(status, str) and status else "failed"
    error = get("error")
    row["error"] = _first_line(error) if error else None
    values = {
        "finetune": get("finetune"),
        "trainable": _number(get("params", "trainable")),
        "trainable_pct": _number(get("params", "trainable_pct")),
        "val_accuracy": _number(get("val", "accuracy")),
        "test_accuracy": _number(get("test", "accuracy")),
        "test_balanced_accuracy": _number(get("test", "balanced_accuracy")),
        "test_macro_f1": _number(get("test", "macro_f1")),
        "test_roc_auc": _number(get("test", "roc_auc")),
        "test_ece": _number(get("test", "calibration", "ece")),
        "train_seconds": _number(get("timing", "train_seconds")),
        "images_per_second": _number(get("timing", "train_images_per_second")),
    }
    for split in ("val", "test"):
        interval = get(split, "ci", "accuracy")
        if isinstance(interval, list) and len(interval) == 2:
            values[f"{split}_accuracy_lo"], values[f"{split}_accuracy_hi"] = map(_number, interval)
    for key, value in values.items():
        # Keep an override's value (e.g. finetune=full) when the job died before writing its own.
        if value is not None or key not in row:
            row[key] = value
    return row


def _first_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_ACCURACY_COLUMNS = {
    "val_accuracy",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_roc_auc",
    "test_ece",
    *(f"{split}_accuracy{suffix}" for split in ("val", "test") for suffix in INTERVAL_SUFFIXES),
}


def with_interval(row: dict, column: str) -> str:
    """A metric's cell with its 95% interval when the row has one: `0.9444 [0.8782, 0.9760]`."""
    text = _format_summary_value(column, row.get(column))
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if lo is None or hi is None:
        return text
    return f"{text} [{_format_summary_value(column, lo)}, {_format_summary_value(column, hi)}]"


def interval_columns(columns: Sequence[str]) -> set[str]:
    """The _lo/_hi columns whose metric is also a column (shown inside that metric's cell)."""
    return {c for c in columns if c.endswith(INTERVAL_SUFFIXES) and c[:-3] in columns}


def overlap_notes(rows: list[dict]) -> list[str]:
    """For validation and test accuracy: whether the 95% intervals of the two best ok rows overlap (the
    difference between them is then within what the split's size can tell), or nothing when a row lacks one."""
    from lora_cls.metrics.intervals import intervals_overlap

    notes = []
    for split in ("val", "test"):
        key = f"{split}_accuracy"
        scored = sorted((r for r in rows if r["status"] == "ok" and r.get(key) is not None),
                        key=lambda r: -r[key])[:2]
        if len(scored) < 2:
            continue
        a, b = ([r.get(f"{key}_lo"), r.get(f"{key}_hi")] for r in scored)
        overlap = intervals_overlap(None if None in a else a, None if None in b else b)
        if overlap is None:
            continue
        first, second = (f"`{r['job']}` {with_interval(r, key)}" for r in scored)
        word = "overlap: the difference is within what this split can tell" if overlap else "do not overlap"
        notes.append(f"Top two on {'validation' if split == 'val' else 'test'} accuracy: {first} and {second}; "
                     f"their 95% intervals {word}.")
    return notes


def _format_summary_value(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if column in _ACCURACY_COLUMNS and isinstance(value, (int, float)):
        return f"{value:.4f}"
    if column.startswith("test_accuracy_diff") and isinstance(value, (int, float)):
        return f"{value:+.4f}"
    if column == "mcnemar_p" and isinstance(value, (int, float)):
        return f"{value:.3g}"
    if column == "trainable" and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if column == "trainable_pct" and isinstance(value, (int, float)):
        return f"{value:.3g}"
    if column in ("train_seconds", "images_per_second") and isinstance(value, (int, float)):
        return f"{value:,.1f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _summary_markdown(rows: list[dict], columns: list[str], sweep_dir: Path, title: str | None) -> str:
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "failed", "missing")}
    lines = [
        f"# {title or 'Sweep summary'}",
        "",
        f"`{sweep_dir}`: {len(rows)} job{'s' if len(rows) != 1 else ''}, "
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['missing']} missing.",
    ]
    best = _best_rows(rows)
    if best:
        # Chosen on validation, as the runs chose their best epoch: picking a job by its test score would make
        # that score an optimistic estimate. Its test accuracy is reported beside it.
        jobs = ", ".join(f"`{r['job']}`" for r in best)
        tests = ", ".join("–" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.4f}" for r in best)
        lines.append(f"Best validation accuracy: {'jobs ' + jobs + ' (tied)' if len(best) > 1 else 'job ' + jobs}, "
                     f"{best[0]['val_accuracy']:.4f}; test accuracy {tests}.")
    lines += overlap_notes(rows)
    lines.append("")
    merged = interval_columns(columns)
    columns = [c for c in columns if c not in merged]
    numeric = {
        c
        for c in columns
        if any(isinstance(r[c], (int, float)) and not isinstance(r[c], bool) for r in rows)
        and all(r[c] is None or (isinstance(r[c], (int, float)) and not isinstance(r[c], bool)) for r in rows)
    }
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|")
    for row in rows:
        cells = [(with_interval(row, c) if f"{c}_lo" in merged else _format_summary_value(c, row[c]))
                 .replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _best_rows(rows: list[dict]) -> list[dict]:
    """The ok jobs with the highest validation accuracy (several when they tie)."""
    scored = [r for r in rows if r["status"] == "ok" and r.get("val_accuracy") is not None]
    if not scored:
        return []
    top = max(r["val_accuracy"] for r in scored)
    return [r for r in scored if r["val_accuracy"] == top]


def read_summary_csv(sweep_dir: str | os.PathLike) -> list[dict] | None:
    """The rows of a sweep's summary.csv as text values (None when it has none)."""
    try:
        with open(Path(sweep_dir) / "summary.csv", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return None
