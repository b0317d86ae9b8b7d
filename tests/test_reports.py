import json
import os

import numpy as np
import pytest
from helpers import assert_png, read_csv
from rich.console import Console

from lora_cls.metrics.classification import classification_metrics, confusion
from lora_cls.runs.console import print_metrics
from lora_cls.runs.plots import plot_curves
from lora_cls.runs.reports import HISTORY_FIELDS, read_history, write_history, write_split_reports

POS_SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.35, 0.65, 0.8, 0.9])
Y_TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
PROBS = np.stack([1.0 - POS_SCORE, POS_SCORE], axis=1)
Y_PRED = PROBS.argmax(1)  # confusion [[4, 2], [1, 3]]
CLASSES = ["neg", "pos"]


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
