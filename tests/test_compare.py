"""lora-compare: runs made at different times side by side, with the config values that differ as columns."""

from __future__ import annotations

import csv
import json

import pytest

from lora_cls.errors import UserError
from lora_cls.tasks.compare import differing_keys, run_folders


@pytest.fixture(scope="module")
def rank4_run(tmp_path_factory, tiny_overrides):
    from conftest import compose_config

    from lora_cls.tasks.train import train

    run_dir = tmp_path_factory.mktemp("rank4") / "run"
    train(compose_config("train", [*tiny_overrides, "lora.rank=4", "trainer.epochs=2"]), run_dir)
    return run_dir


def test_differing_keys_skip_equal_and_neutral_values():
    configs = [{"lora.rank": 8, "trainer.progress": True, "lora.targets": ["a"], "x": 1},
               {"lora.rank": 4, "trainer.progress": False, "lora.targets": ["b"], "x": 1}]
    assert differing_keys(configs) == ["lora.rank", "lora.targets"]


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no metrics.json"):
        run_folders([str(tmp_path)])
    with pytest.raises(UserError, match="matches no folder"):
        run_folders([str(tmp_path / "nothing-*")])


@pytest.mark.slow
def test_compare_two_runs_shows_the_rank_column(tiny_run, rank4_run, run_cli, tmp_path):
    out = tmp_path / "cmp"
    done = run_cli("lora-compare", str(tiny_run.run_dir), str(rank4_run), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lora.rank" in done.stdout
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["lora.rank"] for r in rows) == ["4", "8"]
    assert {r["lora.alpha"] for r in rows} == {"4.0", "8.0"}  # alpha follows the rank
    assert "dataset.root" not in rows[0]  # equal in both runs
    by_rank = {r["lora.rank"]: r for r in rows}
    assert float(by_rank["8"]["test_accuracy"]) == tiny_run.metrics["test"]["accuracy"]
    assert int(by_rank["8"]["trainable"]) == tiny_run.metrics["params"]["trainable"]
    assert "| lora.rank |" in (out / "comparison.md").read_text().replace("| job | lora.rank", "| lora.rank")
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_of_one_run_is_an_error_line(tiny_run, run_main, tmp_path):
    done = run_main("lora-compare", str(tiny_run.run_dir), "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: lora-compare needs two or more runs")


def _fake_run(folder, rank, accuracy):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"lora:\n  rank: {rank}\n  alpha: ${{.rank}}\ntrainer:\n  progress: {rank == 8}\n", encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", "error": None, "finetune": "lora",
                                                     "test": {"accuracy": accuracy}}), encoding="utf-8")
    return folder


def test_a_sweep_root_stands_for_its_jobs_and_interpolations_are_resolved(tmp_path):
    from lora_cls.tasks.compare import compare_runs

    _fake_run(tmp_path / "sweep" / "0", 8, 0.9)
    _fake_run(tmp_path / "sweep" / "1", 4, 0.8)
    rows = compare_runs([str(tmp_path / "sweep")], tmp_path / "out")
    assert [(r["job"], r["lora.rank"], r["lora.alpha"], r["test_accuracy"]) for r in rows] == [
        ("0", 8, 8, 0.9), ("1", 4, 4, 0.8)]
    assert "trainer.progress" not in rows[0]
    with pytest.raises(UserError, match="already holds a comparison"):
        compare_runs([str(tmp_path / "sweep")], tmp_path / "out")


def _predictions(folder, correct, extra=()):
    """reports/test/predictions.csv of a run: 100 images, alternately true class a and b, right where `correct`."""
    report = folder / "reports" / "test"
    report.mkdir(parents=True)
    lines = ["path,true,predicted,prob_a,prob_b"]
    for i, right in enumerate(correct):
        true = "ab"[i % 2]
        predicted = true if right else "ab"[1 - i % 2]
        lines.append(f"test/{i:03d}.png,{true},{predicted},0.5,0.5")
    (report / "predictions.csv").write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")


def test_runs_on_the_same_test_images_get_a_paired_test(tmp_path):
    from lora_cls.tasks.compare import compare_runs

    # 100 images: both right on 80, only the rank-8 run on 8, only the rank-4 run on 2, both wrong on 10.
    best = [True] * 80 + [True] * 8 + [False] * 2 + [False] * 10
    other = [True] * 80 + [False] * 8 + [True] * 2 + [False] * 10
    for name, rank, correct in (("r8", 8, best), ("r4", 4, other)):
        run = _fake_run(tmp_path / name, rank, sum(correct) / 100)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["val"] = {"accuracy": 0.9 if rank == 8 else 0.85}
        (run / "metrics.json").write_text(json.dumps(metrics))
        _predictions(run, correct)
    _fake_run(tmp_path / "old", 2, 0.5)  # no predictions.csv: a run from before they were written
    rows = compare_runs([str(tmp_path / n) for n in ("r8", "r4", "old")], tmp_path / "out")
    by_job = {r["job"]: r for r in rows}
    assert by_job["r4"]["paired_vs"] == "r8"
    assert by_job["r4"]["test_accuracy_diff"] == pytest.approx(-0.06)
    assert by_job["r4"]["mcnemar_p"] == pytest.approx(112 / 1024, abs=1e-6)  # 2·P(X <= 2 | 10, 1/2)
    assert by_job["r4"]["test_accuracy_diff_lo"] < -0.06 < by_job["r4"]["test_accuracy_diff_hi"] <= 0
    assert by_job["r8"]["paired_vs"] is None and by_job["old"]["mcnemar_p"] is None
    with open(tmp_path / "out" / "comparison.csv", newline="") as f:
        table = {r["job"]: r for r in csv.DictReader(f)}
    assert float(table["r4"]["mcnemar_p"]) == pytest.approx(0.109375)
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "## Paired tests on the test split (100 images)" in md
    assert "McNemar p = 0.109 (images only this run gets right: 2, only the reference: 8)" in md
    assert "`old`: not tested, no reports/test/predictions.csv" in md


def test_runs_on_other_test_images_are_not_paired(tmp_path):
    from lora_cls.tasks.compare import compare_runs

    for name, val, extra in (("a", 0.9, ()), ("b", 0.8, ("test/extra.png,a,a,0.5,0.5",))):
        run = _fake_run(tmp_path / name, 8 if name == "a" else 4, 0.9)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["val"] = {"accuracy": val}
        (run / "metrics.json").write_text(json.dumps(metrics))
        _predictions(run, [True] * 100, extra)
    rows = compare_runs([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out")
    assert all(r["mcnemar_p"] is None for r in rows)
    assert "`b`: not tested, evaluated on other test images" in (tmp_path / "out" / "comparison.md").read_text()
