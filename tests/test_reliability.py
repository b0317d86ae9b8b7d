"""Issue 6: resume exactly, Ctrl-C, determinism, safe checkpoint loading, non-finite loss, property tests."""

from __future__ import annotations

import csv
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_cls import checkpoint as ckpt
from lora_cls import engine, pipeline
from lora_cls.config import register_configs, validate
from lora_cls.data import UnreadableImage, decode_image
from lora_cls.errors import UserError

# Weight noise on two layers only: every RNG stream is exercised without the CPU cost of drawing 19.8M
# Gaussians per step for the whole preset (see README, "Noise cost on CPU").
NOISY = ["schedule=decay_noise", "lora.dropout=0.1", "lora.targets=[layer3.0.conv1,layer4.2.conv2]"]
TINY = ["experiment=demo", "dataset.image_size=32", "dataset.synthetic.num_per_class=40", "trainer.epochs=3",
        "trainer.batch_size=16", "trainer.progress=false", "trainer.deterministic=true"]


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_module("lora_cls.conf", version_base="1.3"):
        return compose("train", list(overrides))


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "timing"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """One uninterrupted deterministic run (decay_noise + dropout: every RNG is in play)."""
    cfg = _cfg(*TINY, f"dataset.root={data_root}", *NOISY)
    run = tmp_path_factory.mktemp("runs") / "reference"
    return cfg, run, pipeline.train(cfg, run)


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(reference, tmp_path):
    cfg, _, first = reference
    second = pipeline.train(cfg, tmp_path / "again")
    assert _numbers(second) == _numbers(first)


@pytest.mark.slow
def test_resume_after_interrupt_ends_with_the_same_metrics(reference, tmp_path, monkeypatch):
    cfg, ref_dir, expected = reference
    original = engine.Trainer.train_epoch

    def interrupt_second_epoch(self):
        if self.state.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg, tmp_path / "killed")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert len(list(csv.DictReader(open(tmp_path / "killed" / "history.csv")))) == 1
    monkeypatch.setattr(engine.Trainer, "train_epoch", original)

    # trainer.resume=<path> continues into a new folder from a copy of the killed run's state
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_copy")
    resumed = pipeline.train(cfg, tmp_path / "killed")  # trainer.resume=auto, same folder
    assert _numbers(resumed) == _numbers(expected)
    ref_losses = [r["train_loss"] for r in csv.DictReader(open(ref_dir / "history.csv"))]
    assert [r["train_loss"] for r in csv.DictReader(open(tmp_path / "killed" / "history.csv"))] == ref_losses

    other = _cfg(*TINY, f"dataset.root={cfg.dataset.root}", *NOISY, f"trainer.resume={tmp_path / 'killed_copy'}")
    assert _numbers(pipeline.train(other, tmp_path / "elsewhere")) == _numbers(expected)


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_a_changed_config(reference, tmp_path):
    cfg, ref_dir, _ = reference
    with pytest.raises(UserError, match="finished run"):
        pipeline.train(cfg, ref_dir)
    changed = _cfg(*TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "lora.rank=4", f"trainer.resume={ref_dir}")
    with pytest.raises(UserError, match=r"config differs.*lora.rank: 8 -> 4"):
        pipeline.train(changed, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_refused_resume_leaves_the_interrupted_run_as_it_was(reference, run_cli, tmp_path):
    cfg, ref_dir, _ = reference
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ref_dir, unfinished)
    (unfinished / "metrics.json").unlink()  # what a killed run looks like: last.pt, no metrics.json
    before = {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()}
    changed = [*TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "dataset.split_seed=1"]
    with pytest.raises(UserError, match=r"config differs.*dataset.split_seed: 0 -> 1"):
        pipeline.train(_cfg(*changed), unfinished)  # trainer.resume=auto: the folder's own last.pt
    proc = run_cli("lora-train", *changed, f"hydra.run.dir={unfinished}", cwd=tmp_path)
    assert proc.returncode == 2 and "dataset.split_seed: 0 -> 1" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    # neither splits.json nor a failed metrics.json, nor Hydra's .hydra/ files were written over the run
    assert {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()} == before
    assert pipeline.resume_source("False", unfinished) is None  # `never` in any spelling YAML may produce


@pytest.mark.slow
def test_ctrl_c_keeps_last_pt_prints_resume_command_and_exits_130(tmp_path):
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "lora-train"), *TINY[:-1], "trainer.epochs=6",
           "dataset.synthetic.num_per_class=100", f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not (run / "history.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-2] == "resume with:" and lines[-1].strip().endswith(f"hydra.run.dir={run}")
    state = ckpt.load_last(run / "checkpoints" / "last.pt")
    assert state["epoch"] >= 1 and not (run / "metrics.json").exists()


@pytest.mark.slow
def test_a_sweep_stopped_mid_job_resumes_that_job_and_runs_the_rest(tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    args = [*TINY[:-1], "trainer.early_stopping.patience=100", f"dataset.root={tmp_path / 'data'}",
            "trainer.epochs=2,12"]
    cmd = [str(Path(sys.executable).parent / "lora-train"), "-m", *args, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not (sweep / "1" / "history.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # job 1 (12 epochs) has finished at least one epoch
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-2] == "resume the sweep with:", err[-2000:]
    assert lines[-1].strip().endswith(f"hydra.sweep.dir={sweep}")
    stopped_at = ckpt.load_last(sweep / "1" / "checkpoints" / "last.pt")["epoch"]
    assert 1 <= stopped_at < 12 and not (sweep / "summary.csv").exists()
    job0 = (sweep / "0" / "metrics.json").read_bytes()

    resumed = run_cli("lora-train", *shlex.split(lines[-1])[1:], cwd=tmp_path)  # the printed command, as is
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").read_bytes() == job0  # kept, not trained again
    log = (sweep / "1" / "train.log").read_text(encoding="utf-8")
    assert f"{stopped_at} of 12 epochs done" in log
    assert read_summary(sweep) == [("ok", "2"), ("ok", "12")]
    assert json.loads((sweep / "1" / "metrics.json").read_text())["epochs_run"] == 12


def read_summary(sweep: Path) -> list[tuple[str, str]]:
    with open(sweep / "summary.csv", newline="") as f:
        return [(row["status"], row["trainer.epochs"]) for row in csv.DictReader(f)]


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['EVIL_MARKER'], 'w').write('ran')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil = tmp_path / "last.pt"
    torch.save({"epoch": 1, "payload": _Evil()}, evil)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        ckpt.load_last(evil)
    cfg = _cfg(*TINY, f"dataset.root={tmp_path / 'data'}", f"trainer.resume={evil}")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        pipeline.train(cfg, tmp_path / "run")
    assert not marker.exists()


def test_adapter_files_hold_no_pickle(reference):
    _, run, _ = reference
    raw = (run / "checkpoints" / "adapter.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[: 8 + header_len]  # a JSON header, no pickle opcode


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a checkpoint at all", "not a readable safetensors adapter"),
    ("truncate", "not a readable safetensors adapter"),
])
def test_bad_checkpoints_are_user_errors(reference, tmp_path, content, message):
    _, run, _ = reference
    path = tmp_path / "adapter.safetensors"
    if content == "truncate":
        good = (run / "checkpoints" / "adapter.safetensors").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        pipeline.load_model_from_checkpoint(path)


def test_checkpoint_for_another_class_set_or_model_is_refused(reference, tmp_path):
    _, run, _ = reference
    tensors, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    meta["classes"] = ["a", "b", "c"]
    ckpt.save_adapter(tmp_path / "three.safetensors", tensors, meta)
    with pytest.raises(UserError, match="another model or class set"):
        pipeline.load_model_from_checkpoint(tmp_path / "three.safetensors")
    meta["classes"] = ["parasitized", "uninfected"]
    meta["config"]["model"]["name"] = "vgg16"
    meta["config"]["lora"]["targets"] = None
    ckpt.save_adapter(tmp_path / "vgg.safetensors", tensors, meta)
    with pytest.raises(UserError, match="trained on other base weights"):
        pipeline.load_model_from_checkpoint(tmp_path / "vgg.safetensors")


def test_metrics_d_is_the_best_epochs_d_the_adapter_was_saved_at(reference):
    _, run, metrics = reference
    with open(run / "history.csv") as f:
        d_by_epoch = {int(row["epoch"]): float(row["d"]) for row in csv.DictReader(f)}
    assert len(set(d_by_epoch.values())) == 3  # decay_noise over 3 epochs: a different d each epoch
    assert metrics["d"] == pytest.approx(d_by_epoch[metrics["best_epoch"]])
    _, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    assert meta["best_epoch"] == metrics["best_epoch"] and meta["d"] == pytest.approx(metrics["d"])


def test_a_checkpoint_from_an_older_schema_still_loads_and_a_foreign_key_is_dropped(reference, tmp_path, caplog):
    _, run, _ = reference
    tensors, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    expected, _, _ = pipeline.load_model_from_checkpoint(run / "checkpoints" / "adapter.safetensors")
    # A file written before trainer.compile and dataset.skip_bad existed: they take the schema's defaults.
    del meta["config"]["trainer"]["compile"], meta["config"]["dataset"]["skip_bad"]
    ckpt.save_adapter(tmp_path / "older.safetensors", tensors, meta)
    model, train_cfg, _ = pipeline.load_model_from_checkpoint(tmp_path / "older.safetensors")
    assert train_cfg.trainer.compile is False and train_cfg.dataset.skip_bad is False
    assert train_cfg.lora.rank == 8 and train_cfg.schedule.kind == "decay_noise"  # the stored values are kept
    torch.testing.assert_close(model.state_dict(), expected.state_dict(), rtol=0, atol=0)
    # A key lora-cls never read (a `+key=` override from before those were refused) is dropped, with a warning.
    meta["config"]["lora"]["rnk"] = 4
    meta["config"]["lora"]["a.b"] = 1  # a key with a dot in it is one key, not a path
    ckpt.save_adapter(tmp_path / "plus.safetensors", tensors, meta)
    with caplog.at_level(logging.WARNING):
        _, plus_cfg, _ = pipeline.load_model_from_checkpoint(tmp_path / "plus.safetensors")
    assert "ignoring config key(s) that lora-cls does not know: lora.rnk, lora.a.b" in caplog.text
    assert "rnk" not in plus_cfg.lora and plus_cfg.lora.rank == 8
    # Anything else that is not a training config is an error naming the file, never a traceback.
    for bad, message in [({**meta["config"], "lora": {**meta["config"]["lora"], "rank": "eight"}}, "key lora.rank"),
                         ({**meta["config"], "dataset": 5}, "cannot read"),
                         ({**meta["config"], "model": {"name": "${nope.x}"}}, "cannot read"),
                         ("hello", "no lora-cls training config"), ([1, 2], "no lora-cls training config")]:
        ckpt.save_adapter(tmp_path / "bad.safetensors", tensors, {**meta, "config": bad})
        with pytest.raises(UserError, match=message):
            pipeline.load_model_from_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_resume_from_an_older_last_pt_treats_a_new_key_as_its_default(reference, tmp_path):
    cfg, ref_dir, _ = reference
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ref_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    state = ckpt.load_last(unfinished / "checkpoints" / "last.pt")
    del state["config"]["trainer.compile"]
    state["config"]["lora.foo"] = 1  # a `+lora.foo=1` override, from before those were refused: never read
    ckpt.save_last(unfinished / "checkpoints" / "last.pt", state)
    assert pipeline.prepare_run_dir(cfg, unfinished)[0] == unfinished / "checkpoints" / "last.pt"
    compiled = _cfg(*TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "trainer.compile=true")
    with pytest.raises(UserError, match=r"trainer.compile: False -> True"):
        pipeline.prepare_run_dir(compiled, unfinished)
    state["config"] = None
    ckpt.save_last(unfinished / "checkpoints" / "last.pt", state)
    with pytest.raises(UserError, match=r"last.pt is not a lora-cls last.pt"):
        pipeline.prepare_run_dir(cfg, unfinished)


def test_eval_on_data_with_other_classes_is_refused(reference, tmp_path):
    _, run, _ = reference
    for cls in ("cats", "dogs", "birds"):
        (tmp_path / "other" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(tmp_path / "other" / cls / f"{i}.png")
    register_configs()
    with initialize_config_module("lora_cls.conf", version_base="1.3"):
        cfg = compose("eval", [f"ckpt={run}", f"dataset.root={tmp_path / 'other'}", "progress=false"])
    with pytest.raises(UserError, match=r"classes \['birds', 'cats', 'dogs'\].*same classes"):
        pipeline.evaluate_checkpoint(cfg, tmp_path / "eval")


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_state(data_root, tmp_path):
    cfg = _cfg(*TINY, f"dataset.root={data_root}", "optimizer.lr=1e30", "optimizer.warmup_fraction=0")
    with pytest.raises(UserError, match=r"non-finite \(NaN/inf\) by step \d+") as err:
        pipeline.train(cfg, tmp_path / "run")
    assert isinstance(err.value, engine.NonFiniteLoss) and err.value.step >= 1
    state = ckpt.load_last(tmp_path / "run" / "checkpoints" / "last.pt")  # the state before the bad epoch
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_unknown_model_name_fails_validation_naming_the_key():
    with pytest.raises(UserError, match="model.name: unknown model 'resnet99'"):
        validate(_cfg("model.name=resnet99"))


# -- property tests --------------------------------------------------------------------------------------

VALUES = st.one_of(st.integers(-5, 50), st.floats(-2, 2, allow_nan=False), st.sampled_from(
    ["auto", "bf16", "32", "16", "fp8", "adamw", "sgd", "x", "none", "decay", "val_loss"]))
KEYS = ["lora.rank", "lora.alpha", "lora.dropout", "optimizer.lr", "optimizer.weight_decay", "trainer.epochs",
        "trainer.batch_size", "trainer.precision", "dataset.val_fraction", "dataset.image_size",
        "schedule.kind", "schedule.start", "schedule.d_min", "optimizer.name", "trainer.early_stopping.monitor",
        "finetune", "lora.init", "lora.bn"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=4))
def test_random_config_values_validate_or_fail_with_a_user_error(values):
    from lora_cls.cli.common import precheck

    overrides = [f"{k}={v}" for k, v in values.items()]
    try:
        precheck(overrides, "train", validate)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((np.arange(24 * 24 * 3) % 251).astype(np.uint8).reshape(24, 24, 3)).save(buf, "PNG")
    return buf.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_image_bytes_never_crash_the_loader(png_bytes, tmp_path, data):
    raw = bytearray(png_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    path = tmp_path / "img.png"
    path.write_bytes(bytes(raw[:cut]))
    try:
        image = decode_image(path, 16)
    except UnreadableImage as exc:
        assert str(path) in str(exc)
    else:
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
