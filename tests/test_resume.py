"""Resume exactly: after an interrupt, Ctrl-C and SIGTERM in a sweep; refusals that leave the run as it was."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DETERMINISTIC_TINY, NOISY, killed_in_second_epoch, train_cfg, without_timing

from lora_cls.errors import UserError
from lora_cls.runs import checkpoint as ckpt
from lora_cls.runs.resume import prepare_run_dir, resume_source
from lora_cls.tasks.train import train


@pytest.mark.slow
def test_resume_after_interrupt_ends_with_the_same_metrics(noisy_reference, tmp_path, monkeypatch):
    cfg, ref_dir, expected = noisy_reference
    killed_in_second_epoch(monkeypatch, lambda: train(cfg, tmp_path / "killed"))
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert len(list(csv.DictReader(open(tmp_path / "killed" / "history.csv")))) == 1

    # trainer.resume=<path> continues into a new folder from a copy of the killed run's state
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_copy")
    resumed = train(cfg, tmp_path / "killed")  # trainer.resume=auto, same folder
    assert without_timing(resumed) == without_timing(expected)
    ref_losses = [r["train_loss"] for r in csv.DictReader(open(ref_dir / "history.csv"))]
    assert [r["train_loss"] for r in csv.DictReader(open(tmp_path / "killed" / "history.csv"))] == ref_losses

    other = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={cfg.dataset.root}", *NOISY, f"trainer.resume={tmp_path / 'killed_copy'}")
    assert without_timing(train(other, tmp_path / "elsewhere")) == without_timing(expected)


@pytest.mark.slow
def test_a_dora_pissa_run_resumes_bit_identically(noisy_data_root, tmp_path, monkeypatch):
    """DoRA's magnitudes, the optimizer's state of them, and PiSSA's starting factors (the frozen residual) all come
    back from last.pt: the resumed run ends where the uninterrupted one does."""
    cfg = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={noisy_data_root}", "lora.dora=true", "lora.init=pissa",
                    "lora.dropout=0.1", "lora.targets=[layer3.0.conv1,layer4.2.conv2]", "trainer.epochs=2",
                    "trainer.max_steps_per_epoch=2")
    expected = train(cfg, tmp_path / "reference")
    killed_in_second_epoch(monkeypatch, lambda: train(cfg, tmp_path / "killed"))
    assert without_timing(train(cfg, tmp_path / "killed")) == without_timing(expected)
    tensors, _ = ckpt.load_adapter(tmp_path / "killed" / "checkpoints" / "adapter.safetensors")
    reference, _ = ckpt.load_adapter(tmp_path / "reference" / "checkpoints" / "adapter.safetensors")
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    assert {"layer3.0.conv1.lora_magnitude", "layer3.0.conv1.lora_A0", "layer4.2.conv2.lora_B0"} <= set(tensors)


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_a_changed_config(noisy_reference, tmp_path):
    cfg, ref_dir, _ = noisy_reference
    with pytest.raises(UserError, match="finished run"):
        train(cfg, ref_dir)
    changed = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "lora.rank=4", f"trainer.resume={ref_dir}")
    with pytest.raises(UserError, match=r"config differs.*lora.rank: 8 -> 4"):
        train(changed, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_refused_resume_leaves_the_interrupted_run_as_it_was(noisy_reference, run_main, tmp_path):
    cfg, ref_dir, _ = noisy_reference
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ref_dir, unfinished)
    (unfinished / "metrics.json").unlink()  # what a killed run looks like: last.pt, no metrics.json
    before = {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()}
    changed = [*DETERMINISTIC_TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "dataset.split_seed=1"]
    with pytest.raises(UserError, match=r"config differs.*dataset.split_seed: 0 -> 1"):
        train(train_cfg(*changed), unfinished)  # trainer.resume=auto: the folder's own last.pt
    proc = run_main("lora-train", *changed, f"hydra.run.dir={unfinished}", cwd=tmp_path)
    assert proc.returncode == 2 and "dataset.split_seed: 0 -> 1" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    # neither splits.json nor a failed metrics.json, nor Hydra's .hydra/ files were written over the run
    assert {p: p.read_bytes() for p in unfinished.rglob("*") if p.is_file()} == before
    assert resume_source("False", unfinished) is None  # `never` in any spelling YAML may produce


@pytest.mark.slow
def test_ctrl_c_keeps_last_pt_prints_resume_command_and_exits_130(tmp_path):
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "lora-train"), *DETERMINISTIC_TINY[:-1], "trainer.epochs=6",
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
    args = [*DETERMINISTIC_TINY[:-1], "trainer.early_stopping.patience=100", f"dataset.root={tmp_path / 'data'}",
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
    cfg = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={tmp_path / 'data'}", f"trainer.resume={evil}")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        train(cfg, tmp_path / "run")
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_an_older_last_pt_treats_a_new_key_as_its_default(noisy_reference, tmp_path):
    cfg, ref_dir, _ = noisy_reference
    unfinished = tmp_path / "unfinished"
    shutil.copytree(ref_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    state = ckpt.load_last(unfinished / "checkpoints" / "last.pt")
    del state["config"]["trainer.compile"]
    state["config"]["lora.foo"] = 1  # a `+lora.foo=1` override, from before those were refused: never read
    ckpt.save_last(unfinished / "checkpoints" / "last.pt", state)
    assert prepare_run_dir(cfg, unfinished)[0] == unfinished / "checkpoints" / "last.pt"
    compiled = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={cfg.dataset.root}", *NOISY, "trainer.compile=true")
    with pytest.raises(UserError, match=r"trainer.compile: False -> True"):
        prepare_run_dir(compiled, unfinished)

    # A last.pt from before round two: no recipe/logger/compile_mode/fused keys, the in-memory cache's 4 GB cap,
    # one optimizer param group. It resumes (dataset.cache.* only says where decoded images are kept) and restores.
    old = dict(state, config={k: v for k, v in state["config"].items()
                              if not k.startswith(("logger.", "trainer.ema", "trainer.label", "trainer.class",
                                                   "trainer.compile_mode", "optimizer.head", "lora.fused",
                                                   "dataset.cache.dir"))})
    old["config"]["dataset.cache.max_gb"] = 4.0
    assert len(old["optimizer"]["param_groups"]) == 1
    ckpt.save_last(unfinished / "checkpoints" / "last.pt", old)
    resumed = train(cfg, unfinished)
    assert resumed["status"] == "ok"
    (unfinished / "metrics.json").unlink()
    state["config"] = None
    ckpt.save_last(unfinished / "checkpoints" / "last.pt", state)
    with pytest.raises(UserError, match=r"last.pt is not a lora-cls last.pt"):
        prepare_run_dir(cfg, unfinished)


KILLS = 10


@pytest.mark.slow
def test_a_sweep_killed_at_random_moments_ends_as_an_uninterrupted_sweep(tmp_path):
    """SIGKILL at seeded random moments (some while a file is being written), restarted each time with the
    documented command (the same sweep command into the same folder), until it finishes: every job's
    metrics equal an uninterrupted sweep's, every file reads back whole, and no folder is left unreported."""
    import random

    from PIL import Image

    from lora_cls.data.layouts import prepare_splits

    data = tmp_path / "data" / "synthetic"
    base = [*DETERMINISTIC_TINY, "dataset.synthetic.num_per_class=60", "trainer.epochs=6",
            "trainer.early_stopping.patience=100", f"dataset.root={data}"]
    prepare_splits(train_cfg(*base).dataset)  # the data exists before the kills (its generation is atomic anyway)
    script = str(Path(sys.executable).parent / "lora-train")
    args = ["-m", *base, "lora.rank=2,4,8"]
    reference = subprocess.run([script, *args, f"hydra.sweep.dir={tmp_path / 'reference'}"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]

    sweep = tmp_path / "sweep"
    command = [script, *args, f"hydra.sweep.dir={sweep}"]  # docs/training.md "Sweeps": the same command resumes a sweep
    # Each atomic write's rename waits 30 ms (sitecustomize in the killed processes only), so that a kill can
    # land while a file is being written: without it the window is too short to hit from outside.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, time\n_replace = os.replace\n"
        "def _slow(src, dst, *a, **k):\n"
        "    if str(src).endswith('.tmp'):\n        time.sleep(0.03)\n"
        "    return _replace(src, dst, *a, **k)\n"
        "os.replace = _slow\n")
    env = {**os.environ, "PYTHONPATH": str(hook)}
    rng = random.Random(0)
    kills = kills_at_writes = 0
    # 10 restarts (20 before: 125 s of the suite, most of it interpreter start-ups, where a kill tests nothing new):
    # the random moments come after the ~3 s start-up, and half of the kills wait for a file write.
    while True:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if kills < KILLS:
            at_write = rng.random() < 0.5
            # A kill at a random moment, or at the next file write (waiting as long as it takes to get there)
            deadline = time.time() + (120 if at_write else rng.uniform(2.5, 6.5))
            left_before = set(sweep.rglob(".*.tmp"))  # by earlier kills, removed when their job runs again
            saw_write = False
            while proc.poll() is None and time.time() < deadline and not saw_write:
                saw_write = at_write and any(p not in left_before for p in sweep.rglob(".*.tmp"))
                time.sleep(0.005 if at_write else 0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                kills_at_writes += saw_write
                continue
        _, err = proc.communicate(timeout=900)
        finished_before = proc.returncode == 2 and "already holds a finished sweep" in err  # killed on its way out
        assert proc.returncode == 0 or finished_before, err[-3000:]
        break
    assert kills >= KILLS and kills_at_writes >= 2, (kills, kills_at_writes)

    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]  # no orphan folder
    with open(sweep / "summary.csv", newline="") as f:
        assert [(r["job"], r["status"]) for r in csv.DictReader(f)] == [("0", "ok"), ("1", "ok"), ("2", "ok")]
    for job in ("0", "1", "2"):
        got = json.loads((sweep / job / "metrics.json").read_text())
        want = json.loads((tmp_path / "reference" / job / "metrics.json").read_text())
        assert without_timing(got) == without_timing(want), job
        ckpt.load_adapter(sweep / job / "checkpoints" / "adapter.safetensors")  # whole, checksum verified
        assert ckpt.load_last(sweep / job / "checkpoints" / "last.pt")["epoch"] == 6
        assert len(list(csv.DictReader(open(sweep / job / "history.csv")))) == 6
    for png in sweep.rglob("*.png"):
        with Image.open(png) as image:
            image.verify()
    assert not list(sweep.rglob(".*.tmp"))  # no half-written file left behind
    print(f"crash test: {kills} kills survived, {kills_at_writes} of them while a file was being written")
