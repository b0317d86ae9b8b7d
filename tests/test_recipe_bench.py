"""scripts/recipe.py, the recipe benchmark (docs/BENCHMARKS.md, "Recipe"): its tasks, its table, and a toy run that
continues where an earlier call stopped."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "recipe.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_gives_mean_and_sample_std_over_seeds_per_task(recipe):
    rows = [{"task": "digits", "variant": "lora", "seed": s, "test_accuracy": a, "wall_seconds": w}
            for s, a, w in [(0, 0.90, 10.0), (1, 0.94, 14.0), (2, 0.98, 12.0)]]
    rows.append({"task": "shapes", "variant": "lora", "seed": 0, "test_accuracy": 0.5, "wall_seconds": 7.0})
    lines = recipe.table(rows, ["digits", "shapes"], ["lora", "full"]).splitlines()
    assert lines[2] == f"| `lora`: {recipe.VARIANTS['lora'][1]} | 0.940 ± 0.040 | 12 | 0.500 ± 0.000 | 7 |"
    assert lines[3].endswith("| – | – | – | – |")  # a variant with no runs yet


def test_the_shapes_of_each_task_are_told_apart_by_their_outline(recipe):
    rng = np.random.default_rng(0)
    for kind in (*recipe.SOURCE_SHAPES, *recipe.TARGET_SHAPES):
        image = recipe.shape_image(kind, rng)
        assert image.shape == (recipe.CANVAS, recipe.CANVAS, 3) and image.dtype == np.uint8
    assert not set(recipe.SOURCE_SHAPES) & set(recipe.TARGET_SHAPES)  # transfer: the target's classes are new


@pytest.mark.slow
def test_a_toy_benchmark_runs_and_a_second_call_runs_only_what_is_missing(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    common = [sys.executable, str(SCRIPT), "--quick", "--tasks", "shapes", "--data", str(data), "--out", str(out)]
    first = subprocess.run([*common, "--variants", "linear", "--seeds", "0"], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    target = data / "shapes-quick" / "target"
    assert {p.name for p in (target / "test").iterdir()} == {"pentagon", "hexagon", "diamond", "arrow", "crescent"}
    assert [len(list((target / split / "arrow").iterdir())) for split in ("train", "val", "test")] == [10, 5, 15]
    backbone = data / "shapes-quick" / "backbone.pt"
    built = backbone.stat().st_mtime_ns

    second = subprocess.run([*common, "--variants", "linear", "--seeds", "0", "1"], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert backbone.stat().st_mtime_ns == built  # the source task's backbone is trained once
    assert "backbone trained" not in second.stdout
    ran = [line for line in second.stdout.splitlines() if line.startswith("shapes ")]
    assert len(ran) == 1 and "linear" in ran[0] and "seed 1" in ran[0]  # (linear, 0) was in results.csv already
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("linear", "0"), ("linear", "1")]
    assert all(int(r["trainable"]) == 512 * 5 + 5 for r in rows)  # linear: ResNet34's new 5-class head only
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert "| `linear`: " in (out / "results.md").read_text()
