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

import numpy as np
import yaml
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lora_cls.reports import INT_RE, save_figure, shorten
from lora_cls.runfolder import METRICS, atomic_open, read_metrics, write_text

log = logging.getLogger(__name__)

# Rows of the last summary written in this process; the CLI reads it to set the exit status of a sweep.
last_summary: list[dict] = []


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_summary(sweep_dir)
        last_summary[:] = rows
        print_sweep_summary(rows)
        log.info("sweep summary: %s", sweep_dir / "summary.md")


SUMMARY_FIELDS = [
    "status",
    "error",
    "finetune",
    "trainable",
    "trainable_pct",
    "val_accuracy",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_roc_auc",
    "train_seconds",
    "images_per_second",
]


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
                        stem: str = "summary") -> None:
    """<stem>.md, <stem>.png (accuracy against the first numeric key that varies) and <stem>.csv in `folder`."""
    # The CSV last: summary.csv marks a finished sweep (a restart refuses the folder), so it may only exist once
    # the table and the plot do.
    write_text(folder / f"{stem}.md", _summary_markdown(rows, columns, folder, title))
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


_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _read_overrides(job_dir: Path) -> dict[str, Any]:
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(items, list):
        return {}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key:
            continue
        if INT_RE.match(value):
            out[key] = int(value)
        elif _NUMBER_RE.match(value):
            out[key] = float(value)
        else:
            out[key] = value
    return out


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
        "train_seconds": _number(get("timing", "train_seconds")),
        "images_per_second": _number(get("timing", "train_images_per_second")),
    }
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
}


def _format_summary_value(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if column in _ACCURACY_COLUMNS and isinstance(value, (int, float)):
        return f"{value:.4f}"
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
    lines.append("")
    numeric = {
        c
        for c in columns
        if any(isinstance(r[c], (int, float)) and not isinstance(r[c], bool) for r in rows)
        and all(r[c] is None or (isinstance(r[c], (int, float)) and not isinstance(r[c], bool)) for r in rows)
    }
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|")
    for row in rows:
        cells = [_format_summary_value(c, row[c]).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _best_rows(rows: list[dict]) -> list[dict]:
    """The ok jobs with the highest validation accuracy (several when they tie)."""
    scored = [r for r in rows if r["status"] == "ok" and r.get("val_accuracy") is not None]
    if not scored:
        return []
    top = max(r["val_accuracy"] for r in scored)
    return [r for r in scored if r["val_accuracy"] == top]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sweep_axis_key(rows: list[dict], override_keys: list[str]) -> str | None:
    # A seed is swept for repeats, not as a quantity to plot against.
    candidates = []
    for key in override_keys:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        if values and all(_is_number(v) for v in values) and len(set(values)) >= 2:
            if key.rsplit(".", 1)[-1] != "seed":
                candidates.append(key)
    if "lora.rank" in candidates:
        return "lora.rank"
    return candidates[0] if candidates else None


def _plot_sweep(rows: list[dict], override_keys: list[str], path: Path, title: str | None) -> None:
    ok_rows = [r for r in rows if r["status"] == "ok" and r.get("test_accuracy") is not None]
    x_key = _sweep_axis_key(rows, override_keys)
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()

    if x_key is None:
        _plot_sweep_bars(ax, rows, override_keys)
    else:
        _plot_sweep_lines(ax, rows, ok_rows, override_keys, x_key)
    if not ok_rows:
        ax.set_ylim(0, 1.05)
        ax.text(
            0.5,
            0.5,
            f"no successful jobs ({len(rows)} job{'s' if len(rows) != 1 else ''})",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=13,
            color="tab:red",
        )
    ax.set_title(title or "Sweep summary")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_sweep_lines(
    ax: Any, rows: list[dict], ok_rows: list[dict], override_keys: list[str], x_key: str
) -> None:
    """Accuracy against a numeric swept key, one line per combination of the other swept keys."""
    group_keys = [k for k in override_keys if k != x_key and len({str(r.get(k)) for r in rows}) > 1]
    groups: dict[str, list[dict]] = {}
    for row in ok_rows:
        if _is_number(row.get(x_key)):
            label = ", ".join(f"{k}={row.get(k)}" for k in group_keys)
            groups.setdefault(label, []).append(row)

    params_ax = ax.twinx()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    # One line per quantity: with a single group, each gets its own colour (test, val, parameters); with several
    # groups the colour tells the groups apart and the marker and dash the quantity.
    series_colors = ("C0", "C1", "C2") if len(groups) == 1 else None
    handles = []
    all_params: list[float] = []
    for color, (label, group) in zip(colors, groups.items()):
        group.sort(key=lambda r: r[x_key])
        x = [r[x_key] for r in group]
        suffix = f" ({label})" if label else ""
        test_c, val_c, params_c = series_colors or (color, color, color)
        handles += ax.plot(
            x, [r["test_accuracy"] for r in group], "o-", color=test_c, label=f"test accuracy{suffix}"
        )
        val = [(xi, r["val_accuracy"]) for xi, r in zip(x, group) if r.get("val_accuracy") is not None]
        if val:
            handles += ax.plot(
                *zip(*val), "s--", color=val_c, alpha=0.6, markersize=4, label=f"val accuracy{suffix}"
            )
        params = [(xi, r["trainable"]) for xi, r in zip(x, group) if _is_number(r.get("trainable"))]
        if params:
            all_params += [p for _, p in params]
            handles += params_ax.plot(
                *zip(*params), "^:", color=params_c, alpha=0.8, label=f"trainable params{suffix}"
            )

    ok_ids = {id(r) for r in ok_rows}
    failed_x = [r[x_key] for r in rows if id(r) not in ok_ids and _is_number(r.get(x_key))]
    if failed_x:
        handles += ax.plot(
            failed_x,
            [0.02] * len(failed_x),
            "x",
            color="tab:red",
            markersize=9,
            transform=ax.get_xaxis_transform(),
            label="failed / missing",
        )

    _label_axes(ax, params_ax, sorted({r[x_key] for r in rows if _is_number(r.get(x_key))}), x_key, all_params)
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="best")


def _label_axes(ax: Any, params_ax: Any, xs: list, x_key: str, all_params: list[float]) -> None:
    """Ticks at the swept values (a log2 axis when they span 4x or more), a log axis for parameter counts."""
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    if all_params and min(all_params) > 0:
        params_ax.set_yscale("log")
    params_ax.set_ylabel("trainable parameters")
    ax.set_xlabel(x_key)
    ax.set_ylabel("accuracy")


def _plot_sweep_bars(ax: Any, rows: list[dict], override_keys: list[str]) -> None:
    """Test accuracy per job; failed and missing jobs keep their slot, labelled with their status."""
    positions = np.arange(len(rows))
    varying = [k for k in override_keys if len({str(r.get(k)) for r in rows}) > 1]
    labels = [
        "\n".join([shorten(str(r["job"]), 20), *(shorten(f"{k}={r.get(k)}", 24) for k in varying)])
        for r in rows
    ]
    for i, row in enumerate(rows):
        if row["status"] == "ok" and row.get("test_accuracy") is not None:
            ax.bar(i, row["test_accuracy"], color="tab:blue")
            ax.text(
                i, row["test_accuracy"], f"{row['test_accuracy']:.3f}", ha="center", va="bottom", fontsize=8
            )
        else:
            ax.text(
                i, 0.02, row["status"], ha="center", va="bottom", rotation=90, color="tab:red", fontsize=9
            )
    ax.set_xticks(positions, labels, rotation=45 if len(rows) > 6 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("job")
    ax.set_ylabel("test accuracy")


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
    varying = [c for c in columns if (c not in SUMMARY_FIELDS or c == "finetune") and c != "job"
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
        cells = [_format_summary_value(c, row.get(c)) for c in columns]
        table.add_row(
            *cells, style=None if row.get("status") == "ok" else styles.get(row.get("status"), "red")
        )
    console.print(table)
