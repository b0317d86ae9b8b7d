"""Issue 7: torchrun (DDP over gloo on CPU), Hydra launchers (joblib locally, submitit/Slurm configs), sweep=rank."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from lora_cls.conf.load import register_configs
from lora_cls.engine.distributed import DistInfo, RankSliceBatchSampler, shard

BIN = Path(sys.executable).parent
# Augmentation off and BatchNorm on its running statistics: then N processes compute the same global-batch
# gradient as one, and the runs differ only by floating-point summation order.
EQUIVALENT = ["experiment=demo", "dataset.image_size=32", "dataset.synthetic.num_per_class=40", "trainer.epochs=2",
              "trainer.batch_size=16", "trainer.progress=false", "trainer.precision=32", "lora.bn=frozen",
              "dataset.augment.preset=none"]


def _run(cmd: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores: one thread each, for both runs
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _batches(seed: int = 3) -> BatchSampler:
    """A single process's batches; every rank builds its own with the same seed, as lora-train does."""
    return BatchSampler(RandomSampler(range(22), generator=torch.Generator().manual_seed(seed)), 8, False)


def test_rank_slices_partition_every_global_batch():
    expected = [list(b) for b in _batches()]
    per_rank = [list(RankSliceBatchSampler(_batches(), DistInfo(r, 2, r))) for r in range(2)]
    for i, global_batch in enumerate(expected):
        assert per_rank[0][i] + per_rank[1][i] == global_batch
    assert [len(b) for b in per_rank[0]] == [4, 4, 3]
    assert len(RankSliceBatchSampler(_batches(), DistInfo(0, 2, 0))) == 3


def test_rank_slice_is_never_empty():
    batches = BatchSampler(SequentialSampler(range(1)), 4, False)
    assert list(RankSliceBatchSampler(batches, DistInfo(1, 2, 1))) == [[0]]


@pytest.mark.parametrize("n, world", [(10, 2), (11, 3), (2, 4), (0, 2)])
def test_eval_shards_count_every_sample_exactly_once(n, world):
    parts = [list(shard(n, DistInfo(r, world, r))) for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process(tmp_path):
    data = f"dataset.root={tmp_path / 'data'}"
    one = _run([str(BIN / "lora-train"), *EQUIVALENT, data, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "lora-train"),
                *EQUIVALENT, data, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["status"] == "ok" and m2["processes"] == 2 and m1["processes"] == 1
    # one run folder, written once: rank 1 wrote neither Hydra's files nor a log of its own
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert (tmp_path / "two" / "train.log").read_text().count("done: best epoch") == 1
    # Tolerance: the same global batches and gradients, summed in another order (two halves + all-reduce).
    for r1, r2 in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), rel=5e-3)
        assert float(r2["val_loss"]) == pytest.approx(float(r1["val_loss"]), rel=5e-3)
    for split in ("val", "test"):
        assert m2[split]["n"] == m1[split]["n"]  # sharded evaluation counted every sample exactly once
        assert m2[split]["loss"] == pytest.approx(m1[split]["loss"], rel=1e-2)
        assert abs(m2[split]["accuracy"] - m1[split]["accuracy"]) <= 1 / m1[split]["n"] + 1e-9


@pytest.mark.slow
def test_multirun_under_torchrun_is_refused(tmp_path):
    proc = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "lora-train"),
                 "-m", "lora.rank=2,4"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "error: torchrun runs one training job" in proc.stderr


@pytest.mark.slow
def test_joblib_launched_sweep_writes_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run([str(BIN / "lora-train"), "-m", "hydra/launcher=local", "sweep=rank", "lora.rank=2,4",
                 *EQUIVALENT[:6], "trainer.epochs=1", f"dataset.root={tmp_path / 'data'}",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["lora.rank"], r["status"]) for r in rows] == [("2", "ok"), ("4", "ok")]
    assert [int(r["trainable"]) for r in rows] == [2 * 57_984 + 1_026, 4 * 57_984 + 1_026]
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()


def _hydra_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("lora_cls.conf", version_base="1.3"):
        return compose("train", list(overrides), return_hydra_config=True).hydra


def test_sweep_rank_holds_the_rank_grid():
    assert _hydra_cfg("sweep=rank").sweeper.params["lora.rank"] == "2,4,8,16"


def test_launcher_presets_compose_onto_the_plugins():
    slurm = _hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=90")
    assert slurm.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.launcher.partition, slurm.launcher.gpus_per_node, slurm.launcher.timeout_min) == ("a100", 1, 90)
    local = _hydra_cfg("hydra/launcher=local")
    assert local.launcher._target_.endswith("joblib_launcher.JoblibLauncher") and local.launcher.n_jobs == 2
