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
