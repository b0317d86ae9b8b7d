"""The sweep summary: one row per job (failed and missing ones included), the best job chosen on validation."""

import csv
import json
import os
from pathlib import Path

from helpers import assert_png, read_csv
from rich.console import Console

from lora_cls.runs import plots as sweep
from lora_cls.runs.console import print_sweep_summary
from lora_cls.runs.summary import SUMMARY_FIELDS, write_sweep_summary


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
    assert sweep._sweep_axis_key(rows, ["finetune"]) is None
    assert_png(tmp_path / "summary.png")


def test_sweep_plot_axis_prefers_lora_rank_and_skips_seeds():
    rows = [
        {"seed": s, "optim.lr": lr, "lora.rank": r} for s, lr, r in [(0, 1e-3, 2), (1, 1e-4, 4), (2, 1e-3, 8)]
    ]
    assert sweep._sweep_axis_key(rows, ["seed", "optim.lr", "lora.rank"]) == "lora.rank"
    assert sweep._sweep_axis_key(rows, ["seed", "optim.lr"]) == "optim.lr"
    assert sweep._sweep_axis_key(rows, ["seed"]) is None


def test_print_sweep_summary_lists_every_job(tmp_path):
    make_job(tmp_path, "0", ["lora.rank=2"], job_metrics(2, 0.91))
    make_job(tmp_path, "1", ["lora.rank=4"], failed_metrics("boom"))
    console = Console(record=True, width=250)
    print_sweep_summary(write_sweep_summary(tmp_path), console=console)
    out = console.export_text()
    assert "lora.rank" in out and "0.9100" in out and "116,224" in out
    assert "failed" in out and "boom" in out


def test_console_summary_shows_a_varying_finetune_column(tmp_path):
    for i, mode in enumerate(("lora", "full", "linear")):
        metrics = {**job_metrics(8, 0.9 + 0.01 * i), "finetune": mode}
        make_job(tmp_path, str(i), [f"finetune={mode}"], metrics)
    console = Console(record=True, width=200)
    print_sweep_summary(write_sweep_summary(tmp_path), console=console)
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "job" in line and "status" in line)
    assert "finetune" in header
    assert [m for m in ("lora", "full", "linear") if any(f" {m} " in line for line in lines)] == ["lora", "full",
                                                                                               "linear"]


def test_a_single_rank_sweep_draws_test_val_and_parameters_in_three_colours(tmp_path):
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    for i, rank in enumerate((2, 4, 8)):
        make_job(tmp_path, str(i), [f"lora.rank={rank}"], job_metrics(rank, 0.9 + 0.01 * i))
    rows = write_sweep_summary(tmp_path)
    ax = Figure().add_subplot()
    sweep._plot_sweep_lines(ax, rows, rows, ["lora.rank"], "lora.rank")
    lines = ax.get_lines() + ax.figure.axes[1].get_lines()
    colours = {line.get_label(): to_hex(line.get_color()) for line in lines}
    assert set(colours) == {"test accuracy", "val accuracy", "trainable params"}
    assert len(set(colours.values())) == 3


def test_sweep_summary_shows_intervals_and_says_when_the_top_two_overlap(tmp_path):
    def metrics(val: float, test: float, val_ci, test_ci) -> dict:
        m = job_metrics(2, test)
        m["val"]["accuracy"], m["val"]["ci"] = val, {"accuracy": val_ci}
        m["test"]["ci"] = {"accuracy": test_ci}
        m["test"]["calibration"] = {"ece": 0.0512}
        return m

    make_job(tmp_path, "0", ["lora.rank=4"], metrics(0.95, 0.90, [0.90, 0.98], [0.85, 0.94]))
    make_job(tmp_path, "1", ["lora.rank=8"], metrics(0.92, 0.80, [0.86, 0.96], [0.74, 0.84]))
    make_job(tmp_path, "2", ["lora.rank=16"], job_metrics(16, 0.5))  # an older run: no intervals
    rows = write_sweep_summary(tmp_path)
    assert (rows[0]["val_accuracy_lo"], rows[0]["val_accuracy_hi"], rows[0]["test_ece"]) == (0.90, 0.98, 0.0512)
    assert rows[2]["val_accuracy_lo"] is None and rows[2]["test_accuracy_hi"] is None
    table = read_csv(tmp_path / "summary.csv")
    assert "test_accuracy_lo" in table[0] and table[3][table[0].index("test_accuracy_lo")] == ""
    md = (tmp_path / "summary.md").read_text()
    assert ("Top two on validation accuracy: `0` 0.9500 [0.9000, 0.9800] and `1` 0.9200 [0.8600, 0.9600]; their "
            "95% intervals overlap: the difference is within what this split can tell.") in md
    assert ("Top two on test accuracy: `0` 0.9000 [0.8500, 0.9400] and `1` 0.8000 [0.7400, 0.8400]; their 95% "
            "intervals do not overlap.") in md
    assert "| 0.9000 [0.8500, 0.9400] |" in md and "test_accuracy_lo" not in md  # folded into the cell
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 0.5000 |" in lines["2"]
    console = Console(record=True, width=200)
    print_sweep_summary(rows, console)
    text = console.export_text()
    assert "0.9500 [0.9000, 0.9800]" in text and "intervals overlap" in text
