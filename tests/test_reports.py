import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lora_cls import reports
from lora_cls.metrics import classification_metrics, confusion
from lora_cls.reports import (
    HISTORY_FIELDS,
    SUMMARY_FIELDS,
    plot_curves,
    print_metrics,
    print_sweep_summary,
    read_history,
    write_history,
    write_json,
    write_split_reports,
    write_sweep_summary,
    write_text,
)

POS_SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.35, 0.65, 0.8, 0.9])
Y_TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
PROBS = np.stack([1.0 - POS_SCORE, POS_SCORE], axis=1)
Y_PRED = PROBS.argmax(1)  # confusion [[4, 2], [1, 3]]
CLASSES = ["neg", "pos"]


def assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= min_side


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------------------------------ split reports


def test_split_reports_agree_with_the_metrics(tmp_path):
    paths = write_split_reports(tmp_path / "val", Y_TRUE, Y_PRED, CLASSES, title="val split")

    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [
        "classification_report.json",
        "classification_report.txt",
        "confusion_matrix.csv",
        "confusion_matrix.png",
    ]
    assert set(paths.values()) == set((tmp_path / "val").iterdir())

    rows = read_csv(tmp_path / "val" / "confusion_matrix.csv")
    assert rows == [["true\\pred", "neg", "pos"], ["neg", "4", "2"], ["pos", "1", "3"]]
    np.testing.assert_array_equal(
        np.array([r[1:] for r in rows[1:]], dtype=int), confusion(Y_TRUE, Y_PRED, 2)
    )

    report = json.loads((tmp_path / "val" / "classification_report.json").read_text())
    metrics = classification_metrics(Y_TRUE, PROBS, CLASSES)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"]) == pytest.approx(0.7)
    assert report["pos"]["recall"] == pytest.approx(0.75)
    assert report["neg"]["support"] == 6

    text = (tmp_path / "val" / "classification_report.txt").read_text()
    lines = text.splitlines()
    assert lines[0] == "positive class: pos"
    assert lines[1] == "sensitivity (recall of pos): 0.7500"
    assert lines[2] == "specificity (recall of neg): 0.6667"
    assert "0.7000" in text and "macro avg" in text

    assert_png(tmp_path / "val" / "confusion_matrix.png")


def test_split_report_names_an_explicit_positive_class(tmp_path):
    write_split_reports(tmp_path, Y_TRUE, Y_PRED, CLASSES, positive_class="neg")
    lines = (tmp_path / "classification_report.txt").read_text().splitlines()
    assert lines[:3] == [
        "positive class: neg",
        "sensitivity (recall of neg): 0.6667",
        "specificity (recall of pos): 0.7500",
    ]


def test_split_reports_for_many_classes_keep_absent_classes(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"class_{i:02d}" for i in range(20)]
    y_true = rng.integers(0, 18, 300)  # classes 18 and 19 never occur
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 20, 300))

    write_split_reports(tmp_path, y_true, y_pred, classes)

    rows = read_csv(tmp_path / "confusion_matrix.csv")
    assert rows[0] == ["true\\pred", *classes]
    assert [r[0] for r in rows[1:]] == classes
    counts = np.array([r[1:] for r in rows[1:]], dtype=int)
    np.testing.assert_array_equal(counts, confusion(y_true, y_pred, 20))
    assert counts[18].sum() == counts[19].sum() == 0
    report = json.loads((tmp_path / "classification_report.json").read_text())
    assert report["class_19"]["support"] == 0
    assert not (tmp_path / "classification_report.txt").read_text().startswith("positive class")
    assert_png(tmp_path / "confusion_matrix.png", min_side=800)


# ------------------------------------------------------------------------------------------------ atomic


def test_write_json_creates_parents_and_writes_strict_json(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_json(
        path, {"x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(3), "nan": float("nan"), "t": (1, 2)}
    )
    text = path.read_text()
    assert json.loads(text) == {"x": 0.5, "n": 3, "arr": [0, 1, 2], "nan": None, "t": [1, 2]}
    assert text.startswith('{\n  "x"')  # indent 2
    assert "NaN" not in text


@pytest.mark.parametrize("failing", ["json.dump", "os.replace"])
def test_write_json_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "metrics.json"
    write_json(path, {"version": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if failing == "json.dump":
        monkeypatch.setattr(reports.json, "dump", boom)
    else:
        monkeypatch.setattr(reports.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"version": 2})

    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_text_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    write_text(path, "old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reports.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["notes.txt"]

    monkeypatch.undo()
    write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"


def test_atomic_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------------------------- history


def history_rows(n: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "step": 12 * e,
            "lr": 1e-3 * 0.5**e,
            "d": max(0.0, 1.0 - 0.25 * e),
            "train_loss": 1.0 / e,
            "train_accuracy": 0.5 + 0.05 * e,
            "val_loss": 1.1 / e,
            "val_accuracy": 0.5 + 0.04 * e,
            "val_balanced_accuracy": 0.5 + 0.03 * e,
            "val_macro_f1": 0.45 + 0.03 * e,
            "images_per_second": 123.4,
            "seconds": 2.5,
        }
        for e in range(1, n + 1)
    ]


def test_history_round_trips_numbers_extras_and_missing_values(tmp_path):
    rows = history_rows(3)
    rows[0]["val_loss"] = None
    rows[1]["grad_norm"] = 0.125
    rows[2]["note"] = "resumed"
    path = tmp_path / "history.csv"

    write_history(path, rows)

    header = read_csv(path)[0]
    assert header == [*HISTORY_FIELDS, "grad_norm", "note"]
    back = read_history(path)
    assert len(back) == 3
    assert back[0]["epoch"] == 1 and isinstance(back[0]["epoch"], int)
    assert back[0]["val_loss"] is None
    assert back[0]["grad_norm"] is None
    assert back[1]["grad_norm"] == 0.125
    assert back[2]["note"] == "resumed"
    for original, parsed in zip(rows, back):
        for key in HISTORY_FIELDS:
            assert parsed[key] == original[key], key
            assert type(parsed[key]) is type(original[key]) or original[key] is None


def test_history_rewrite_replaces_the_whole_file(tmp_path):
    path = tmp_path / "history.csv"
    write_history(path, history_rows(4))
    write_history(path, history_rows(2))
    assert [r["epoch"] for r in read_history(path)] == [1, 2]
    assert os.listdir(tmp_path) == ["history.csv"]


@pytest.mark.parametrize("epochs", [1, 5])
def test_plot_curves_writes_a_png(tmp_path, epochs):
    path = tmp_path / "plots" / "curves.png"
    plot_curves(history_rows(epochs), path, best_epoch=epochs)
    assert_png(path, min_side=500)


def test_plot_curves_tolerates_missing_columns_and_no_rows(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.5, "val_loss": None}]
    plot_curves(rows, tmp_path / "partial.png")
    plot_curves([], tmp_path / "empty.png", best_epoch=None)
    assert_png(tmp_path / "partial.png")
    assert_png(tmp_path / "empty.png")


def test_print_metrics_shows_the_values(tmp_path):
    console = Console(record=True, width=120)
    print_metrics(classification_metrics(Y_TRUE, PROBS, CLASSES, loss=0.4321), "test", console=console)
    out = console.export_text()
    for expected in ("accuracy", "0.7000", "balanced accuracy", "0.7083", "macro F1", "0.6970"):
        assert expected in out
    assert "ROC AUC" in out and "0.8333" in out
    assert "0.4321" in out
    assert "neg" in out and "0.8000" in out  # per-class precision of neg


# ------------------------------------------------------------------------------------------------- sweep


def job_metrics(rank: int, test_accuracy: float) -> dict:
    trainable = 58_112 * rank
    return {
        "status": "ok",
        "error": None,
        "finetune": "lora",
        "dataset": "synthetic",
        "model": "resnet34",
        "params": {
            "total": 21_749_570,
            "trainable": trainable,
            "trainable_pct": 100 * trainable / 21_749_570,
        },
        "best_epoch": 3,
        "epochs_run": 5,
        "val": {"loss": 0.3, "accuracy": test_accuracy - 0.01, "balanced_accuracy": 0.8, "macro_f1": 0.8},
        "test": {
            "loss": 0.31,
            "accuracy": test_accuracy,
            "balanced_accuracy": test_accuracy - 0.02,
            "macro_f1": test_accuracy - 0.03,
            "roc_auc": 0.95,
        },
        "timing": {"train_seconds": 12.25, "train_images_per_second": 345.67},
        "device": "cpu",
        "precision": "fp32",
    }


def failed_metrics(error: str) -> dict:
    return {
        "status": "failed",
        "error": error,
        "finetune": "lora",
        "dataset": "synthetic",
        "model": "resnet34",
    }


def make_job(root: Path, name: str, overrides: list[str], metrics: dict | str | None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if isinstance(metrics, dict):
        (job / "metrics.json").write_text(json.dumps(metrics))
    elif isinstance(metrics, str):
        (job / "metrics.json").write_text(metrics)
    return job


def test_sweep_summary_rows_csv_markdown_and_png(tmp_path):
    make_job(tmp_path, "0", ["dataset=synthetic", "lora.rank=2"], job_metrics(2, 0.91))
    make_job(tmp_path, "1", ["dataset=synthetic", "lora.rank=4"], job_metrics(4, 0.93))
    make_job(
        tmp_path,
        "2",
        ["dataset=synthetic", "lora.rank=8"],
        failed_metrics("RuntimeError: out of memory\nTraceback (most recent call last):\n  ..."),
    )
    make_job(tmp_path, "10", ["dataset=synthetic", "lora.rank=16"], '{"status": "ok", "test": {')
    make_job(tmp_path, "3", ["dataset=synthetic", "lora.rank=32"], None)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")

    rows = write_sweep_summary(tmp_path)

    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # natural order, not "10" before "2"
    assert list(rows[0]) == ["job", "dataset", "lora.rank", *SUMMARY_FIELDS]
    assert [r["lora.rank"] for r in rows] == [2, 4, 8, 32, 16]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "missing", "failed"]
    assert rows[0]["test_accuracy"] == 0.91 and rows[1]["test_accuracy"] == 0.93
    assert rows[1]["trainable"] == 232_448
    assert rows[1]["test_roc_auc"] == 0.95
    assert rows[1]["images_per_second"] == 345.67
    assert rows[2]["error"] == "RuntimeError: out of memory"
    assert rows[2]["test_accuracy"] is None
    assert rows[4]["error"] == "unreadable metrics.json"
    assert rows[3]["error"] is None and rows[3]["test_accuracy"] is None

    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["0", "1", "2", "3", "10"]
    assert table[0]["lora.rank"] == "2" and table[1]["lora.rank"] == "4"
    assert float(table[0]["test_accuracy"]) == 0.91
    assert table[1]["trainable"] == "232448"
    assert table[2]["status"] == "failed" and table[2]["test_accuracy"] == ""
    assert table[4]["error"] == "unreadable metrics.json"

    md = (tmp_path / "summary.md").read_text()
    assert "5 jobs, 2 ok, 2 failed, 1 missing" in md
    assert "Best validation accuracy: job `1`, 0.9200; test accuracy 0.9300." in md  # chosen on val, not test
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "job" in lines  # header row
    assert "| 0.9100 |" in lines["0"] and "| 116,224 |" in lines["0"]
    assert "| 0.9300 |" in lines["1"] and "| 232,448 |" in lines["1"]
    assert "RuntimeError: out of memory" in lines["2"] and "Traceback" not in md
    assert "unreadable metrics.json" in lines["10"]
    assert "missing" in lines["3"]

    assert_png(tmp_path / "summary.png")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_sweep_summary_picks_the_best_job_on_validation_and_names_ties(tmp_path):
    def metrics(val: float, test: float) -> dict:
        m = job_metrics(2, test)
        m["val"]["accuracy"] = val
        return m

    make_job(tmp_path / "a", "0", ["lora.rank=2"], metrics(0.95, 0.80))
    make_job(tmp_path / "a", "1", ["lora.rank=4"], metrics(0.90, 0.99))  # the best test score is not the pick
    write_sweep_summary(tmp_path / "a")
    assert "Best validation accuracy: job `0`, 0.9500; test accuracy 0.8000." in (tmp_path / "a" / "summary.md").read_text()
    make_job(tmp_path / "b", "0", ["lora.rank=2"], metrics(0.5, 0.5))
    make_job(tmp_path / "b", "1", ["lora.rank=4"], metrics(0.5, 0.6))
    write_sweep_summary(tmp_path / "b")
    assert ("Best validation accuracy: jobs `0`, `1` (tied), 0.5000; test accuracy 0.5000, 0.6000."
            in (tmp_path / "b" / "summary.md").read_text())


def test_sweep_summary_when_every_job_failed(tmp_path):
    make_job(tmp_path, "0", ["lora.rank=2"], failed_metrics("ValueError: bad config"))
    make_job(tmp_path, "1", ["lora.rank=4"], "not json at all")

    rows = write_sweep_summary(tmp_path)

    assert [(r["status"], r["error"]) for r in rows] == [
        ("failed", "ValueError: bad config"),
        ("failed", "unreadable metrics.json"),
    ]
    assert "2 jobs, 0 ok, 2 failed, 0 missing" in (tmp_path / "summary.md").read_text()
    assert "Best validation accuracy" not in (tmp_path / "summary.md").read_text()
    assert len(read_csv(tmp_path / "summary.csv")) == 3
    assert_png(tmp_path / "summary.png")


def test_sweep_summary_of_an_empty_sweep_writes_empty_files(tmp_path):
    assert write_sweep_summary(tmp_path) == []
    assert read_csv(tmp_path / "summary.csv") == [["job", *SUMMARY_FIELDS]]
    assert "0 jobs" in (tmp_path / "summary.md").read_text()
    assert_png(tmp_path / "summary.png")


def test_sweep_summary_without_numeric_key_finds_nested_jobs(tmp_path):
    # Two levels deep (e.g. sweep_dir/<date>/<job>); a non-numeric sweep gets a bar chart.
    make_job(tmp_path / "a", "0", ["finetune=lora"], job_metrics(8, 0.9))
    full = job_metrics(8, 0.95) | {"finetune": "full"}
    make_job(tmp_path / "a", "1", ["finetune=full"], full)
    make_job(tmp_path / "b", "0", ["finetune=linear"], None)
    make_job(tmp_path / "b", "1", ["finetune=none"], {"status": "failed", "error": "UserError: bad finetune"})

    rows = write_sweep_summary(tmp_path)

    assert [r["job"] for r in rows] == ["a/0", "a/1", "b/0", "b/1"]
    assert list(rows[0]) == ["job", "finetune", *(f for f in SUMMARY_FIELDS if f != "finetune")]
    # The override keeps its value where the job did not record one.
    assert [r["finetune"] for r in rows] == ["lora", "full", "linear", "none"]
    assert [r["test_accuracy"] for r in rows] == [0.9, 0.95, None, None]
    assert [r["status"] for r in rows] == ["ok", "ok", "missing", "failed"]
    assert reports._sweep_axis_key(rows, ["finetune"]) is None
    assert_png(tmp_path / "summary.png")


def test_sweep_plot_axis_prefers_lora_rank_and_skips_seeds():
    rows = [
        {"seed": s, "optim.lr": lr, "lora.rank": r} for s, lr, r in [(0, 1e-3, 2), (1, 1e-4, 4), (2, 1e-3, 8)]
    ]
    assert reports._sweep_axis_key(rows, ["seed", "optim.lr", "lora.rank"]) == "lora.rank"
    assert reports._sweep_axis_key(rows, ["seed", "optim.lr"]) == "optim.lr"
    assert reports._sweep_axis_key(rows, ["seed"]) is None


def test_print_sweep_summary_lists_every_job(tmp_path):
    make_job(tmp_path, "0", ["lora.rank=2"], job_metrics(2, 0.91))
    make_job(tmp_path, "1", ["lora.rank=4"], failed_metrics("boom"))
    console = Console(record=True, width=250)
    print_sweep_summary(write_sweep_summary(tmp_path), console=console)
    out = console.export_text()
    assert "lora.rank" in out and "0.9100" in out and "116,224" in out
    assert "failed" in out and "boom" in out
