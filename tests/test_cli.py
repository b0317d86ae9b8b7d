"""End to end: a tiny training run writes the run folder of docs/DESIGN.md §6, lora-eval reproduces it, the CLIs
report user mistakes as one `error:` line with exit status 2, and sweeps summarise every job (docs/DESIGN.md §6–§8)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import console_script
from safetensors import safe_open

from lora_cls.cli.interrupt import interrupted
from lora_cls.errors import UserError
from lora_cls.tasks.evaluate import evaluate_checkpoint
from lora_cls.tasks.train import train

TINY_COUNTS = {"train": 56, "val": 12, "test": 12}  # the tiny set: 40 images per class, split 28/6/6
RESNET34_PER_RANK = 57_984  # LoRA A/B parameters of the resnet34 preset per unit of rank (docs/DESIGN.md §4)
HEAD_2_CLASSES = 512 * 2 + 2


def resnet34_trainable(rank: int) -> int:
    return RESNET34_PER_RANK * rank + HEAD_2_CLASSES


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


TRAIN_FILES = [
    "splits.json", "history.csv", "metrics.json", "plots/curves.png",
    "checkpoints/adapter.safetensors", "checkpoints/last.pt",
    *(f"reports/{split}/{name}" for split in ("val", "test") for name in (
        "classification_report.txt", "classification_report.json", "confusion_matrix.csv", "confusion_matrix.png")),
]
SPLIT_KEYS = {"loss", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "roc_auc"}


# -- one in-process run ------------------------------------------------------------------------------------

def test_train_writes_every_run_file(tiny_run):
    missing = [name for name in TRAIN_FILES if not (tiny_run.run_dir / name).is_file()]
    assert missing == []
    for name in TRAIN_FILES:
        if name.endswith(".png"):
            assert (tiny_run.run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    leftovers = [p.name for p in tiny_run.run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []  # atomic writes leave no temp files behind


def test_metrics_json_has_every_documented_key(tiny_run):
    metrics = read_json(tiny_run.run_dir / "metrics.json")
    assert metrics == json.loads(json.dumps(tiny_run.metrics))  # the file is what train returned
    assert metrics["status"] == "ok"
    assert metrics["error"] is None
    assert (metrics["finetune"], metrics["dataset"], metrics["model"]) == ("lora", "synthetic", "resnet34")
    params = metrics["params"]
    assert params["trainable"] == resnet34_trainable(8) == 464_898
    assert params["total"] == 21_749_570
    assert params["trainable_pct"] == pytest.approx(100 * 464_898 / 21_749_570, abs=1e-4)
    assert metrics["epochs_run"] == 2
    assert metrics["best_epoch"] in (1, 2)
    assert metrics["d"] == 1.0  # schedule=none: the frozen weight always counts in full
    classes = ["parasitized", "uninfected"]
    for split in ("val", "test"):
        block = metrics[split]
        assert SPLIT_KEYS <= set(block), split
        assert sorted(block["per_class"]) == classes
        assert sum(c["support"] for c in block["per_class"].values()) == TINY_COUNTS[split]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
            assert 0.0 <= block[key] <= 1.0, (split, key)
        assert block["loss"] > 0
    assert metrics["timing"]["train_seconds"] > 0
    assert metrics["timing"]["train_images_per_second"] > 0
    assert metrics["device"] == "cpu" or metrics["device"].startswith("cuda")
    assert metrics["precision"] in ("32", "bf16", "16")


def test_split_reports_agree_with_metrics(tiny_run):
    metrics = read_json(tiny_run.run_dir / "metrics.json")
    for split in ("val", "test"):
        folder = tiny_run.run_dir / "reports" / split
        report = read_json(folder / "classification_report.json")
        assert report["accuracy"] == pytest.approx(metrics[split]["accuracy"])
        rows = list(csv.reader((folder / "confusion_matrix.csv").read_text(encoding="utf-8").splitlines()))
        assert rows[0] == ["true\\pred", "parasitized", "uninfected"]
        counts = [[int(v) for v in row[1:]] for row in rows[1:]]
        assert sum(map(sum, counts)) == TINY_COUNTS[split]
        assert (counts[0][0] + counts[1][1]) / TINY_COUNTS[split] == pytest.approx(metrics[split]["accuracy"])
        assert "parasitized" in (folder / "classification_report.txt").read_text(encoding="utf-8")


def test_history_has_one_row_per_epoch_with_lr_and_d(tiny_run):
    rows = read_csv(tiny_run.run_dir / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    lrs = [float(r["lr"]) for r in rows]
    assert 0 < lrs[-1] < lrs[0] <= tiny_run.cfg.optimizer.lr  # warm-up then cosine decay
    assert [float(r["d"]) for r in rows] == [1.0, 1.0]  # schedule=none: d stays 1
    steps = [int(r["step"]) for r in rows]
    assert steps[1] == 2 * steps[0] > 0
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)


def test_splits_json_lists_the_data_on_disk(tiny_run, synthetic_root):
    splits = read_json(tiny_run.run_dir / "splits.json")
    assert Path(splits["root"]) == synthetic_root.resolve()
    assert splits["classes"] == ["parasitized", "uninfected"]
    listed = []
    for split, count in TINY_COUNTS.items():
        paths = splits[split]
        assert len(paths) == len(splits["labels"][split]) == count
        assert all(not Path(p).is_absolute() and (synthetic_root / p).is_file() for p in paths)
        listed += paths
    assert len(set(listed)) == len(listed)  # no image in two splits
    on_disk = {p.relative_to(synthetic_root).as_posix() for p in synthetic_root.rglob("*.png")}
    assert set(listed) == on_disk


def test_checkpoints_are_small_and_safe_to_load(tiny_run):
    adapter = tiny_run.run_dir / "checkpoints" / "adapter.safetensors"
    assert adapter.stat().st_size < 3 * 2**20
    with safe_open(str(adapter), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        trainable = sum(f.get_tensor(k).numel() for k in keys if k.endswith(("lora_A", "lora_B")) or
                        k.startswith("fc."))
    assert trainable == resnet34_trainable(8)
    assert json.loads(meta["classes"]) == ["parasitized", "uninfected"]
    assert json.loads(meta["config"])["lora"]["rank"] == 8

    last = torch.load(tiny_run.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    assert len(last["history"]) == 2
    assert set(last["trainable"]) == set(keys)
    assert {"optimizer", "lr_scheduler", "rng", "global_step"} <= set(last)


@pytest.mark.parametrize("split, ckpt_form", [("test", "file"), ("val", "file"), ("test", "run folder")])
def test_evaluate_checkpoint_reproduces_the_run(tiny_run, compose_cfg, path_override, tmp_path, split, ckpt_form):
    ckpt = tiny_run.run_dir / "checkpoints" / "adapter.safetensors" if ckpt_form == "file" else tiny_run.run_dir
    cfg = compose_cfg(path_override("ckpt", ckpt), f"split={split}", "progress=false", config_name="eval")
    result = evaluate_checkpoint(cfg, tmp_path / "eval")

    written = read_json(tmp_path / "eval" / "metrics.json")
    trained = read_json(tiny_run.run_dir / "metrics.json")
    assert written[split] == trained[split]
    assert written["status"] == "ok"
    assert written["split"] == split
    assert written["images"] == TINY_COUNTS[split]
    assert json.loads(json.dumps(result)) == written
    for name in ("confusion_matrix.csv", "classification_report.txt"):
        assert (tmp_path / "eval" / "reports" / split / name).read_text(encoding="utf-8") == (
            tiny_run.run_dir / "reports" / split / name).read_text(encoding="utf-8")


def test_eval_on_a_copy_of_the_data_keeps_the_runs_positive_class_and_skips_bad_files(
        tiny_run, synthetic_root, compose_cfg, path_override, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    broken = sorted((copy / "test" / "uninfected").iterdir())[0]
    broken.write_bytes(b"not an image")
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), path_override("dataset.root", copy),
                      "dataset.skip_bad=true", "progress=false", config_name="eval")
    written = evaluate_checkpoint(cfg, tmp_path / "eval")
    trained = read_json(tiny_run.run_dir / "metrics.json")
    assert written["test"]["positive_class"] == trained["test"]["positive_class"] == "parasitized"
    assert written["images"] == TINY_COUNTS["test"] - 1  # what was evaluated, not what was listed
    assert written["skipped_images"] == [f"test/uninfected/{broken.name}"]
    assert sum(c["support"] for c in written["test"]["per_class"].values()) == TINY_COUNTS["test"] - 1


def test_eval_split_all_takes_every_image_of_another_folder(tiny_run, synthetic_root, compose_cfg, path_override,
                                                            tmp_path):
    flat = tmp_path / "new_images"  # root/<class>/*, no split folders: lora-eval carves a split out of it
    for cls in ("parasitized", "uninfected"):
        shutil.copytree(synthetic_root / "test" / cls, flat / cls)
        shutil.copytree(synthetic_root / "val" / cls, flat / cls, dirs_exist_ok=True)
    total = len(list(flat.rglob("*.png")))
    assert total == TINY_COUNTS["test"] + TINY_COUNTS["val"]
    results = {}
    for split in ("test", "all"):
        cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), path_override("dataset.root", flat),
                          f"split={split}", "progress=false", config_name="eval")
        results[split] = evaluate_checkpoint(cfg, tmp_path / f"eval_{split}")
    assert results["all"]["images"] == total
    assert sum(c["support"] for c in results["all"]["all"]["per_class"].values()) == total
    assert 0 < results["test"]["images"] < total  # the seeded test share, as lora-train would split the folder
    assert (tmp_path / "eval_all" / "reports" / "all" / "confusion_matrix.csv").is_file()
    tiny = tmp_path / "tiny"  # 2 images a class: too few for a test share, but split=all needs none
    for cls in ("parasitized", "uninfected"):
        (tiny / cls).mkdir(parents=True)
        for src in sorted((synthetic_root / "test" / cls).iterdir())[:2]:
            shutil.copy(src, tiny / cls / src.name)
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), path_override("dataset.root", tiny), "split=all",
                      "progress=false", config_name="eval")
    assert evaluate_checkpoint(cfg, tmp_path / "eval_tiny")["images"] == 4
    # On the run's own data split=all would count its training images: refused, with or without dataset.root.
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "split=all", "progress=false", config_name="eval")
    with pytest.raises(UserError, match="split: split=all evaluates every image of other data"):
        evaluate_checkpoint(cfg, tmp_path / "eval_own")
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), path_override("dataset.root", synthetic_root),
                      "split=all", "progress=false", config_name="eval")
    with pytest.raises(UserError, match="the data the run was trained on"):
        evaluate_checkpoint(cfg, tmp_path / "eval_own2")


def test_eval_refuses_a_folder_holding_results(tiny_run, compose_cfg, path_override):
    before = {p: p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()}
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "progress=false", config_name="eval")
    with pytest.raises(UserError, match="already holds a run"):
        evaluate_checkpoint(cfg, tiny_run.run_dir)
    assert {p: p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_train_refuses_a_folder_holding_a_finished_run(tiny_run, compose_cfg, tiny_overrides, resume):
    before = {p: p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()}
    cfg = compose_cfg(*tiny_overrides, "trainer.epochs=2", f"trainer.resume={resume}")
    with pytest.raises(UserError) as info:
        train(cfg, tiny_run.run_dir)
    assert str(tiny_run.run_dir) in str(info.value)
    assert {p: p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_demo_experiment_learns(compose_cfg, path_override, tmp_path):
    # Its own data folder: the demo's 300 images per class would regenerate the session's tiny set.
    cfg = compose_cfg("experiment=demo", path_override("dataset.root", tmp_path / "data"), "trainer.progress=false")
    assert (cfg.trainer.epochs, cfg.dataset.synthetic.num_per_class) == (6, 300)  # the documented demo, unshrunk
    metrics = train(cfg, tmp_path / "run")
    assert metrics["epochs_run"] == 6
    assert metrics["val"]["accuracy"] >= 0.9
    assert metrics["test"]["accuracy"] >= 0.85


# -- the console scripts -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_config_groups(run_cli, tmp_path):
    proc = run_cli("lora-train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lora-train" in out
    for line in ("dataset: folder, malaria, smoking, synthetic", "experiment: demo, malaria_vgg16, smoking_resnet34",
                 "model: resnet34, vgg16", "optimizer: adamw, sgd", "schedule: decay, decay_noise, none"):
        assert line in out


@pytest.mark.slow
def test_train_and_eval_from_another_directory(run_cli, tiny_overrides, path_override, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("lora-train", *tiny_overrides, "lora.rank=4", path_override("hydra.run.dir", run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log", *TRAIN_FILES):
        assert (run_dir / name).is_file(), name
    assert "lora.rank=4" in (run_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")
    assert "done: best epoch" in (run_dir / "train.log").read_text(encoding="utf-8")
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "ok"
    assert metrics["params"]["trainable"] == resnet34_trainable(4)

    eval_dir = tmp_path / "eval"
    proc = run_cli("lora-eval", path_override("ckpt", run_dir), "progress=false",
                   path_override("hydra.run.dir", eval_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(eval_dir / "metrics.json")["test"] == metrics["test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "run"]  # nothing else written into the cwd


USER_ERRORS = [  # (script, arguments, text of the `error:` line): refused before Hydra starts, so no folder at all
    pytest.param("lora-train", ["lora.rank=0"], "lora.rank", id="bad-value"),
    pytest.param("lora-train", ["lora.targets=[layer9]"], "target pattern 'layer9'", id="bad-target"),
    pytest.param("lora-eval", [], "ckpt: is required", id="eval-without-ckpt"),
    pytest.param("lora-eval", ["ckpt=/nonexistent/run", "device=gpu"], "device: must be auto, cpu, cuda",
                 id="eval-bad-device"),
    pytest.param("lora-predict", ["input=."], "ckpt: is required", id="predict-without-ckpt"),
    pytest.param("lora-train", ["hydra.run.dirr=elsewhere"], "hydra.run.dirr", id="hydra-key-typo"),
]


@pytest.mark.parametrize("script, args, needle", USER_ERRORS)
def test_user_errors_end_with_one_error_line(run_main, tiny_overrides, path_override, tmp_path, script, args, needle):
    run_dir = tmp_path / "run"
    config = tiny_overrides if script == "lora-train" else ["progress=false"]
    proc = run_main(script, *config, *args, path_override("hydra.run.dir", run_dir), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("error: ")
    assert needle in line
    assert not run_dir.exists()


@pytest.mark.slow
def test_an_error_inside_the_job_ends_with_one_error_line_and_a_failed_metrics_json(run_cli, path_override,
                                                                                     tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("lora-eval", "ckpt=/nonexistent/run", "progress=false", path_override("hydra.run.dir", run_dir),
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("error: ") and "/nonexistent/run" in line
    metrics = read_json(run_dir / "metrics.json")  # failed inside the job: the run folder records it
    assert metrics["status"] == "failed"
    assert "/nonexistent/run" in metrics["error"]


def test_train_refuses_an_existing_run_folder_from_the_cli(run_main, tiny_run, tiny_overrides, path_override,
                                                           tmp_path):
    before = (tiny_run.run_dir / "metrics.json").read_bytes()
    proc = run_main("lora-train", *tiny_overrides, path_override("hydra.run.dir", tiny_run.run_dir), cwd=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("error: ")
    assert str(tiny_run.run_dir) in last_line(proc.stderr)
    assert (tiny_run.run_dir / "metrics.json").read_bytes() == before


def test_eval_predict_and_data_never_write_into_a_run_folder(run_main, tiny_run, synthetic_root, path_override,
                                                             tmp_path):
    before = {p: p.read_bytes() for p in tiny_run.run_dir.rglob("*") if p.is_file()}
    run = tiny_run.run_dir
    attempts = [  # the last hydra.run.dir wins in Hydra, and `++` is an override like any other
        ("lora-eval", [path_override("ckpt", run), path_override("hydra.run.dir", tmp_path / "new"),
                       path_override("hydra.run.dir", run)]),
        ("lora-eval", [path_override("ckpt", run), path_override("++hydra.run.dir", run)]),
        ("lora-predict", [path_override("ckpt", run), path_override("input", synthetic_root / "test"),
                          path_override("hydra.run.dir", run)]),
        ("lora-data", ["check", path_override("dataset.root", synthetic_root), path_override("hydra.run.dir", run)]),
    ]
    for script, args in attempts:
        proc = run_main(script, *args, "progress=false", cwd=tmp_path)
        assert proc.returncode == 2, (script, args, proc.stderr[-2000:])
        assert last_line(proc.stderr).startswith(f"error: run folder {run} already holds"), proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (run / ".hydra").exists() and not (tmp_path / "new").exists()


# -- sweeps ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory, run_cli, tiny_overrides, path_override):
    """lora-train -m ... lora.rank=2,4 into a fresh sweep folder: (completed process, sweep folder)."""
    cwd = tmp_path_factory.mktemp("sweep")
    sweep_dir = cwd / "ranks"
    proc = run_cli("lora-train", "-m", *tiny_overrides, "lora.rank=2,4", path_override("hydra.sweep.dir", sweep_dir),
                   cwd=cwd)
    return proc, sweep_dir


@pytest.mark.slow
def test_rank_sweep_writes_a_summary(rank_sweep):
    proc, sweep_dir = rank_sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep_dir / name).is_file(), name
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["status"], int(r["lora.rank"]), int(r["trainable"])) for r in rows] == [
        ("ok", 2, resnet34_trainable(2)), ("ok", 4, resnet34_trainable(4))]
    for row in rows:
        metrics = read_json(sweep_dir / row["job"] / "metrics.json")
        assert float(row["test_accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
    assert "2 ok, 0 failed" in (sweep_dir / "summary.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_second_sweep_into_the_same_folder_is_refused(run_main, rank_sweep, tiny_overrides, path_override):
    first, sweep_dir = rank_sweep
    assert first.returncode == 0
    before = (sweep_dir / "summary.csv").read_bytes()
    proc = run_main("lora-train", "-m", *tiny_overrides, "lora.rank=8,16", path_override("hydra.sweep.dir", sweep_dir),
                   cwd=sweep_dir.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith(f"error: sweep folder {sweep_dir} already holds a finished sweep")
    assert (sweep_dir / "summary.csv").read_bytes() == before
    rows = read_csv(sweep_dir / "summary.csv")
    assert all(int(r["trainable"]) == resnet34_trainable(int(r["lora.rank"])) for r in rows)


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_with_the_same_command(run_cli, rank_sweep, tiny_overrides, path_override,
                                                            tmp_path):
    first, done = rank_sweep
    assert first.returncode == 0
    # What Ctrl-C in job 1 leaves: job 0 finished, job 1 with last.pt and no metrics.json, no summary yet.
    sweep_dir = tmp_path / "ranks"
    shutil.copytree(done, sweep_dir)
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    (sweep_dir / "1" / "metrics.json").unlink()
    def job0() -> dict:  # Hydra rewrites .hydra/ and appends to train.log; the results must not change
        return {p: p.read_bytes() for p in (sweep_dir / "0").rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}

    kept = job0()
    sweep = ["-m", *tiny_overrides, "lora.rank=2,4"]
    other = run_cli("lora-train", "-m", *tiny_overrides, "lora.rank=2,8", path_override("hydra.sweep.dir", sweep_dir),
                    cwd=tmp_path)  # another sweep's overrides: refused, nothing touched
    assert other.returncode == 2 and "holds results of another sweep" in last_line(other.stderr), other.stderr[-2000:]
    proc = run_cli("lora-train", *sweep, path_override("hydra.sweep.dir", sweep_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job0() == kept
    assert "job 0 already ended" in (sweep_dir / "0" / "train.log").read_text(encoding="utf-8").splitlines()[-1]
    assert "resuming from" in (sweep_dir / "1" / "train.log").read_text(encoding="utf-8")
    rows = read_csv(sweep_dir / "summary.csv")
    assert [(r["status"], int(r["lora.rank"])) for r in rows] == [("ok", 2), ("ok", 4)]
    original = read_json(done / "1" / "metrics.json")
    assert read_json(sweep_dir / "1" / "metrics.json")["test"] == original["test"]  # the same finished weights


def test_interrupting_a_sweep_says_how_to_resume_the_sweep(tmp_path, capsys):
    job = tmp_path / "sweep" / "1"
    with pytest.raises(SystemExit) as exit_info:
        interrupted(job, ["lora.rank=4"], training=True, sweep_dir=tmp_path / "sweep",
                    argv=["-m", "lora.rank=2,4", "hydra.sweep.dir=old", "trainer.epochs=3"])
    assert exit_info.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-3] == f"interrupted: the sweep stopped in job 1; finished jobs are kept in {tmp_path / 'sweep'}."
    assert lines[-2] == "resume the sweep with:"
    assert lines[-1].strip() == f"lora-train -m lora.rank=2,4 trainer.epochs=3 hydra.sweep.dir={tmp_path / 'sweep'}"


@pytest.mark.slow
def test_sweep_with_a_failing_job_still_summarises(run_cli, tiny_overrides, path_override, tmp_path):
    sweep_dir = tmp_path / "sweep"
    missing = tmp_path / "missing.pth"
    weights = path_override("model.weights", missing).replace("model.weights=", "model.weights=null,", 1)
    proc = run_cli("lora-train", "-m", *tiny_overrides, weights, path_override("hydra.sweep.dir", sweep_dir),
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: 1 of 2 sweep jobs failed")
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["trainable"] == str(resnet34_trainable(8))
    assert str(missing) in rows[1]["error"]
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "summary.png").is_file()
    failed = read_json(sweep_dir / rows[1]["job"] / "metrics.json")
    assert failed["status"] == "failed"
    assert str(missing) in failed["error"]


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_run_ends_in_one_error_line_and_keeps_last_pt(tiny_overrides, tmp_path):
    """The real command, with os.fsync failing like a full disk from the 7th file written on (sitecustomize):
    exit 2, one `error:` line naming the disk and the file, and the last completed epoch's last.pt intact."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "_real, _calls = os.fsync, [0]\n"
        "def _fsync(fd):\n"
        "    _calls[0] += 1\n"
        "    if _calls[0] >= 7:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _real(fd)\n"
        "os.fsync = _fsync\n")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(hook), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([str(console_script("lora-train")), *tiny_overrides, "trainer.epochs=3",
                           f"hydra.run.dir={run}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: the disk is full: could not write {run}"), last_line
    assert f"{run / 'checkpoints' / 'last.pt'} (the last completed epoch) is intact: resume with lora-train" in last_line
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] >= 0 and not (run / "metrics.json").exists()
    assert not list(run.rglob(".*.tmp"))  # no half-written file left behind
