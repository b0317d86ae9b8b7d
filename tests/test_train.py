"""train(): deterministic runs are bit-identical, metrics.json's d is the saved epoch's, a diverged loss stops."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import DETERMINISTIC_TINY, train_cfg, without_timing

from lora_cls.engine import trainer as engine
from lora_cls.errors import UserError
from lora_cls.runs import checkpoint as ckpt
from lora_cls.tasks.train import train


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(noisy_reference, tmp_path):
    cfg, _, first = noisy_reference
    second = train(cfg, tmp_path / "again")
    assert without_timing(second) == without_timing(first)


def test_metrics_d_is_the_best_epochs_d_the_adapter_was_saved_at(noisy_reference):
    _, run, metrics = noisy_reference
    with open(run / "history.csv") as f:
        d_by_epoch = {int(row["epoch"]): float(row["d"]) for row in csv.DictReader(f)}
    assert len(set(d_by_epoch.values())) == 3  # decay_noise over 3 epochs: a different d each epoch
    assert metrics["d"] == pytest.approx(d_by_epoch[metrics["best_epoch"]])
    _, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    assert meta["best_epoch"] == metrics["best_epoch"] and meta["d"] == pytest.approx(metrics["d"])


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_state(noisy_data_root, tmp_path):
    cfg = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={noisy_data_root}", "optimizer.lr=1e30", "optimizer.warmup_fraction=0")
    with pytest.raises(UserError, match=r"non-finite \(NaN/inf\) by step \d+") as err:
        train(cfg, tmp_path / "run")
    assert isinstance(err.value, engine.NonFiniteLoss) and err.value.step >= 1
    state = ckpt.load_last(tmp_path / "run" / "checkpoints" / "last.pt")  # the state before the bad epoch
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
