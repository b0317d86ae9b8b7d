"""k-fold cross-validation (`lora-train cv.folds=k`): folds that are disjoint, cover the pool, are stratified and
patient-grouped; every fold a normal run folder; a cross-validation killed mid-fold resumes to the same summary."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import path_value
from helpers import read_csv, train_cfg, without_timing
from test_layouts import make_malaria_tree

from lora_cls.data.layouts import malaria_patient
from lora_cls.data.splits import kfold_assignment, read_splits_json
from lora_cls.errors import UserError

# Two folds of a 12-per-class synthetic set (20 pool images), ResNet18, one step per epoch, deterministic.
CV_TINY = ["experiment=demo", "model.name=resnet18", "dataset.image_size=32", "dataset.synthetic.num_per_class=12", "trainer.epochs=2",
           "trainer.batch_size=16", "trainer.max_steps_per_epoch=1", "trainer.progress=false",
           "trainer.precision=32", "trainer.deterministic=true", "cv.folds=2"]


def test_stratified_folds_are_disjoint_cover_the_pool_and_keep_the_class_shares():
    labels = [0] * 50 + [1] * 20 + [2] * 13
    folds = kfold_assignment(labels, 5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4] and len(folds) == len(labels)  # every image in exactly one fold
    for fold in range(5):
        counts = Counter(label for label, f in zip(labels, folds) if f == fold)
        assert counts[0] == 10 and counts[1] == 4 and counts[2] in (2, 3)
    assert kfold_assignment(labels, 5, seed=0) == folds and kfold_assignment(labels, 5, seed=1) != folds
    with pytest.raises(UserError, match="cv.folds=5 needs at least 5 images of each class"):
        kfold_assignment([0] * 10 + [1] * 4, 5, seed=0)


def test_malaria_folds_never_split_a_patient_and_leave_the_test_patients_out(tmp_path):
    from lora_cls.tasks.crossval import fold_splits, make_plan

    make_malaria_tree(tmp_path / "cell_images")
    plan = make_plan(train_cfg("dataset=malaria", f"dataset.root={path_value(tmp_path)}", "cv.folds=3",
                               "dataset.val_fraction=0.15", "dataset.test_fraction=0.2"))
    assert plan["grouped_by"] == "patient"
    patients_of = {f: {malaria_patient(p) for p, _, g in plan["pool"] if g == f} for f in range(3)}
    assert all(not patients_of[a] & patients_of[b] for a in range(3) for b in range(a + 1, 3))
    test_patients = {malaria_patient(p) for p, _ in plan["test"]}
    assert not test_patients & set().union(*patients_of.values())
    for fold in range(3):
        split = fold_splits(plan, fold)
        assert {label for _, label in split.val} == {0, 1}  # stratified: both classes in every held-out fold
        assert not {p for p, _ in split.train} & {p for p, _ in split.val}
        assert sorted(split.train + split.val) == sorted((p, label) for p, label, _ in plan["pool"])
        assert split.test == [tuple(t) for t in plan["test"]]


def train_cfg_eval(ckpt):
    from conftest import compose_config

    return compose_config("eval", [f"ckpt={path_value(ckpt)}", "split=val", "progress=false", "explain=false"])


def no_figures(mp: pytest.MonkeyPatch) -> None:
    """PNGs are not drawn (1 s each on a loaded 2-core machine; test_reports and test_diagnostics check them)."""
    for module in ("lora_cls.runs.plots", "lora_cls.runs.diagnostics"):
        mp.setattr(f"{module}.save_figure", lambda fig, path: None)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """One uninterrupted 2-fold cross-validation (figures not drawn: test_reports checks them)."""
    from lora_cls.tasks.crossval import cross_validate

    root = tmp_path_factory.mktemp("cv")
    cfg = train_cfg(*CV_TINY, f"dataset.root={path_value(root / 'data')}")
    with pytest.MonkeyPatch.context() as mp:
        no_figures(mp)
        metrics = cross_validate(cfg, root / "cv")
    return cfg, root / "cv", metrics


@pytest.mark.slow
def test_every_fold_is_a_run_folder_and_the_summary_holds_mean_and_std(cv_run, tmp_path, monkeypatch):
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    no_figures(monkeypatch)
    cfg, run_dir, metrics = cv_run
    plan = json.loads((run_dir / "cv.json").read_text())
    held_out = []
    for fold in range(2):
        folder = run_dir / f"fold_{fold}"
        splits = read_splits_json(folder / "splits.json")
        assert sorted(splits.val) == sorted((p, label) for p, label, f in plan["pool"] if f == fold)
        assert not {p for p, _ in splits.train} & {p for p, _ in splits.val}
        held_out += splits.val
        fold_metrics = json.loads((folder / "metrics.json").read_text())
        assert fold_metrics["status"] == "ok" and (folder / "checkpoints" / "adapter.safetensors").is_file()
        row = metrics["cv"]["per_fold"][fold]
        assert row["heldout"]["accuracy"] == fold_metrics["val"]["accuracy"]
        assert row["test"]["accuracy"] == fold_metrics["test"]["accuracy"]
    assert sorted(held_out) == sorted((p, label) for p, label, _ in plan["pool"])  # the folds cover the pool
    # lora-eval reads a fold as any run: split=val is its held-out fold, reproduced exactly
    evaluated = evaluate_checkpoint(train_cfg_eval(run_dir / "fold_1"), tmp_path / "eval")
    assert evaluated["val"]["accuracy"] == metrics["cv"]["per_fold"][1]["heldout"]["accuracy"]
    accuracies = [r["test"]["accuracy"] for r in metrics["cv"]["per_fold"]]
    assert metrics["cv"]["mean"]["test"]["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert metrics["cv"]["std"]["test"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-6)
    assert metrics["val"]["n"] == len(plan["pool"])  # pooled held-out predictions: every pool image once
    lo, hi = metrics["test"]["ci"]["accuracy"]
    assert lo <= metrics["test"]["accuracy"] <= hi
    rows = read_csv(run_dir / "cv_summary.csv")
    assert [r[0] for r in rows[1:]] == ["0", "1", "mean", "std"]
    assert "± " in (run_dir / "cv_summary.md").read_text()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["cv"] == json.loads(json.dumps(metrics["cv"]))


@pytest.mark.slow
def test_a_cross_validation_killed_mid_fold_resumes_to_the_same_summary(cv_run, tmp_path, monkeypatch):
    from lora_cls.engine import trainer as engine
    from lora_cls.tasks.crossval import check_cv_dir, cross_validate

    cfg, reference, expected = cv_run
    no_figures(monkeypatch)
    # Fold 0 had ended before the kill: the reference's own (deterministic: the same as a new one), saving a run.
    (tmp_path / "cv").mkdir()
    shutil.copy(reference / "cv.json", tmp_path / "cv" / "cv.json")
    shutil.copytree(reference / "fold_0", tmp_path / "cv" / "fold_0")
    original, epochs = engine.Trainer.train_epoch, []

    def killed_in_fold_1(self):  # fold 1: epoch 1 done (its last.pt written), then the kill in epoch 2
        epochs.append(self.state.epoch)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(engine.Trainer, "train_epoch", killed_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(cfg, tmp_path / "cv")
    assert (tmp_path / "cv" / "fold_0" / "metrics.json").is_file()
    assert (tmp_path / "cv" / "fold_1" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "cv" / "fold_1" / "metrics.json").exists()
    with pytest.raises(UserError, match="config differs from its cv.json .*lora.rank"):
        check_cv_dir(train_cfg(*CV_TINY, f"dataset.root={cfg.dataset.root}", "lora.rank=4"), tmp_path / "cv")
    monkeypatch.setattr(engine.Trainer, "train_epoch", original)
    resumed = cross_validate(cfg, tmp_path / "cv")
    assert without_timing(resumed) == without_timing(expected)
    assert read_csv(tmp_path / "cv" / "cv_summary.csv") == read_csv(reference / "cv_summary.csv")
    with pytest.raises(UserError, match="holds a finished cross-validation"):
        check_cv_dir(cfg, tmp_path / "cv")


@pytest.mark.slow
def test_a_cross_validation_is_one_job_of_a_sweep_summary(cv_run, tmp_path):
    from lora_cls.cli.precheck import check_sweep_dir
    from lora_cls.runs.summary import write_sweep_summary

    _, run_dir, metrics = cv_run
    job = tmp_path / "sweep" / "0"
    shutil.copytree(run_dir, job)
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("- lora.rank=8\n- cv.folds=2\n")
    row = write_sweep_summary(tmp_path / "sweep")[0]
    assert (row["status"], row["val_accuracy"], row["test_accuracy"]) == (
        "ok", metrics["val"]["accuracy"], metrics["test"]["accuracy"])
    assert [row["val_accuracy_lo"], row["val_accuracy_hi"]] == metrics["val"]["ci"]["accuracy"]
    (tmp_path / "sweep" / "summary.csv").unlink()
    (job / "metrics.json").unlink()  # interrupted: only the plan and the fold folders are there
    with pytest.raises(UserError, match="no readable multirun.yaml"):
        check_sweep_dir(tmp_path / "sweep", ["lora.rank=8", "cv.folds=2"])


def test_folds_under_torchrun_every_rank_trains_the_same_folds_and_only_the_first_writes(tmp_path, monkeypatch):
    """The fold loop as the second of two torchrun processes sees it: the plan and which folds ended come from
    the first process (broadcast), it trains each fold on the same split, and writes nothing itself."""
    from lora_cls.engine import distributed
    from lora_cls.engine.distributed import DistInfo
    from lora_cls.tasks import crossval

    cfg = train_cfg(*CV_TINY, f"dataset.root={path_value(tmp_path / 'data')}")
    plan = crossval.make_plan(cfg)
    sent = [plan, [True, False]]  # what rank 0 broadcasts: its plan, and that fold 0 had ended
    trained = []
    monkeypatch.setattr(distributed, "init_distributed", lambda: DistInfo(1, 2, 1))
    monkeypatch.setattr(distributed, "broadcast", lambda obj, info: (obj is None or pytest.fail()) and sent.pop(0))
    monkeypatch.setattr(distributed, "barrier", lambda info: None)
    monkeypatch.setattr("lora_cls.tasks.train.train", lambda c, d, splits: trained.append((c.cv.fold, d, splits)))
    monkeypatch.setattr(crossval, "summarize", lambda cfg, run_dir, plan: {"cv": "summary"})
    assert crossval.cross_validate(cfg, tmp_path / "cv") == {"cv": "summary"}
    assert [(fold, folder.name) for fold, folder, _ in trained] == [(1, "fold_1")]
    assert trained[0][2].val == crossval.fold_splits(plan, 1).val
    assert not (tmp_path / "cv").exists()  # rank 1 wrote nothing: no cv.json, no metrics.json
