"""Everything written into a run folder or a sweep root (DESIGN.md §6): JSON, reports, history, plots.

Every file goes through `atomic_open` (temp file in the same directory, fsync, `os.replace`), so a killed
process leaves either the previous version of a file or the new one, never half of one. Figures are drawn
on `matplotlib.figure.Figure` objects, not pyplot: no global state, no display backend needed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator
from rich.console import Console
from rich.table import Table
from sklearn.metrics import classification_report

from lora_cls.errors import UserError
from lora_cls.metrics import confusion, resolve_positive_class

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

_PNG_DPI = 120


# ----------------------------------------------------------------------------------------------- run folders

# Files that mark a folder as holding results: training's, lora-predict's and lora-data check's.
RUN_MARKERS = ("metrics.json", "history.csv", "checkpoints", "predictions.csv", "predict.json", "datacheck.json")


def check_fresh_run_dir(run_dir: Path) -> None:
    """Runs never write into a folder that already holds another run's results."""
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if found:
        raise UserError(f"run folder {run_dir} already holds a run ({', '.join(found)}); choose another "
                        "hydra.run.dir (runs never overwrite each other)")


# ----------------------------------------------------------------------------------------------- atomic


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open `path` for writing ("w" text, UTF-8, or "wb") so that it appears complete or not at all.

    Writes go to a hidden temp file next to `path`; on a clean exit it is fsynced and renamed over `path`,
    on an exception it is removed and `path` keeps its previous content. Parent directories are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0o666 filtered by the umask, like open(); mkstemp's 0o600 would make reports unreadable to others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            f = os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": newline}))
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars/arrays, tuples and paths turned into JSON types, NaN/inf into None.

    Strict JSON (no NaN tokens) keeps metrics.json readable by every JSON parser, not only Python's.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically (see `to_jsonable` for the conversions)."""
    with atomic_open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


# ----------------------------------------------------------------------------------------- split reports


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
    names = [_shorten(c, 24) for c in classes]
    if k > 3 or max(map(len, names)) > 10:
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n={int(cm.sum())})")
    save_figure(fig, path)


def _shorten(text: str, width: int) -> str:
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


_INT_RE = re.compile(r"^[+-]?\d+$")


def _parse_cell(text: str | None) -> Any:
    if text is None or text == "":
        return None
    if _INT_RE.match(text):
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


# -------------------------------------------------------------------------------------------------- sweep


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
    rows = [_summary_row(d.relative_to(sweep_dir).as_posix(), overrides[d], d) for d in job_dirs]
    columns = _summary_columns(override_keys)
    for row in rows:
        for column in columns:
            row.setdefault(column, None)
    rows = [{column: row[column] for column in columns} for row in rows]

    with atomic_open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
    write_text(sweep_dir / "summary.md", _summary_markdown(rows, columns, sweep_dir, title))
    _plot_sweep(rows, override_keys, sweep_dir / "summary.png", title)
    return rows


def _summary_columns(override_keys: list[str]) -> list[str]:
    # An override such as `finetune=full` shares its name with a summary field: one column, not two.
    return ["job", *override_keys, *(f for f in SUMMARY_FIELDS if f not in override_keys)]


def _find_job_dirs(sweep_dir: Path) -> list[Path]:
    def is_job(d: Path) -> bool:
        return (d / ".hydra" / "overrides.yaml").is_file() or (d / "metrics.json").is_file()

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
        if _INT_RE.match(value):
            out[key] = int(value)
        elif _NUMBER_RE.match(value):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def read_metrics(path: str | os.PathLike) -> dict | None:
    """A metrics.json as a dict; None when it is missing, unreadable or not a JSON object."""
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _summary_row(job: str, job_overrides: dict[str, Any], job_dir: Path) -> dict:
    row: dict[str, Any] = {"job": job, **{k: v for k, v in job_overrides.items() if k != "job"}}
    metrics_path = job_dir / "metrics.json"
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
    handles = []
    all_params: list[float] = []
    for color, (label, group) in zip(colors, groups.items()):
        group.sort(key=lambda r: r[x_key])
        x = [r[x_key] for r in group]
        suffix = f" ({label})" if label else ""
        handles += ax.plot(
            x, [r["test_accuracy"] for r in group], "o-", color=color, label=f"test accuracy{suffix}"
        )
        val = [(xi, r["val_accuracy"]) for xi, r in zip(x, group) if r.get("val_accuracy") is not None]
        if val:
            handles += ax.plot(
                *zip(*val), "s--", color=color, alpha=0.6, markersize=4, label=f"val accuracy{suffix}"
            )
        params = [(xi, r["trainable"]) for xi, r in zip(x, group) if _is_number(r.get("trainable"))]
        if params:
            all_params += [p for _, p in params]
            handles += params_ax.plot(
                *zip(*params), "^:", color=color, alpha=0.8, label=f"trainable params{suffix}"
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

    xs = sorted({r[x_key] for r in rows if _is_number(r.get(x_key))})
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.xaxis.set_minor_locator(NullLocator())
    if all_params and min(all_params) > 0:
        params_ax.set_yscale("log")
    params_ax.set_ylabel("trainable parameters")
    ax.set_xlabel(x_key)
    ax.set_ylabel("accuracy")
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="best")


def _plot_sweep_bars(ax: Any, rows: list[dict], override_keys: list[str]) -> None:
    """Test accuracy per job; failed and missing jobs keep their slot, labelled with their status."""
    positions = np.arange(len(rows))
    varying = [k for k in override_keys if len({str(r.get(k)) for r in rows}) > 1]
    labels = [
        "\n".join([_shorten(str(r["job"]), 20), *(_shorten(f"{k}={r.get(k)}", 24) for k in varying)])
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


def print_sweep_summary(rows: Sequence[dict], console: Console | None = None) -> None:
    """Print sweep summary rows (from `write_sweep_summary`) as a rich table."""
    console = console or Console()
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    # The terminal gets what tells jobs apart: swept keys that vary, status and the headline numbers
    # (summary.csv and summary.md keep every column).
    headline = ("job", "status", "trainable", "val_accuracy", "test_accuracy", "train_seconds", "error")
    varying = [c for c in columns if c not in SUMMARY_FIELDS and c != "job"
               and len({repr(r.get(c)) for r in rows}) > 1]
    shown = ["job", *varying, *[c for c in headline[1:] if c in columns]]
    if not any(r.get("error") for r in rows):
        shown.remove("error") if "error" in shown else None
    columns = shown
    table = Table(
        title=f"Sweep summary ({len(rows)} job{'s' if len(rows) != 1 else ''})", header_style="bold"
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
