"""k-fold cross-validation (`lora-train cv.folds=5`): one ordinary training run per fold, then their summary.

The train+val pool of the dataset's split is divided into k folds (data.splits.kfold_assignment: stratified by
class; grouped by patient for malaria, the grouping of its ordinary split), and the test split stays fixed. Fold
k's run trains on the other folds, picks its best epoch and stops early on fold k (its `val` split), and is
evaluated on fold k and on the test split: a normal run folder `fold_<k>/` (splits.json, metrics.json, reports,
checkpoints: lora-eval reads it as any run), its config holding `cv.fold=k`.

The cross-validation folder holds cv.json (written first: the config, the pool with each image's fold, the test
split), the fold folders, and at the end metrics.json, cv_summary.{csv,md} and plots/cv_folds.png
(runs/crossval.py). Run again with the same config into the same folder, it resumes: folds that finished are
read back, the interrupted one continues from its last.pt, the rest run. The summary is computed from the fold
folders' files alone, so a resumed cross-validation writes the same summary as an uninterrupted one. Under
torchrun every process runs every fold (each fold's run is distributed as any run); only the first writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lora_cls.conf.checks import validate
from lora_cls.conf.load import flatten, is_neutral, stored_defaults, to_container
from lora_cls.data.layouts import prepare_splits, sample_groups
from lora_cls.data.splits import DatasetSplits, kfold_assignment
from lora_cls.engine import distributed
from lora_cls.errors import UserError
from lora_cls.files import write_json
from lora_cls.metrics.classification import classification_metrics, resolve_positive_class
from lora_cls.metrics.intervals import BOOTSTRAP, bootstrap_intervals, interval_methods, metric_intervals
from lora_cls.runs.crossval import CV_JSON, print_cv_summary, write_cv_summary
from lora_cls.runs.folder import RunDir, check_fresh_run_dir, read_metrics, run_metrics
from lora_cls.runs.reports import PREDICTIONS, read_split_predictions

log = logging.getLogger(__name__)
FORMAT = "lora-cls-cv/1"
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity", "loss")


def fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold_{fold}"


def _plan_config(cfg: DictConfig) -> dict[str, Any]:
    """The config a cross-validation is defined by (flat; cv.fold left out: it differs per fold)."""
    return {k: v for k, v in flatten(to_container(cfg)).items() if k != "cv.fold"}


def make_plan(cfg: DictConfig) -> dict[str, Any]:
    """cv.json: the config, the pool (train + val of the dataset's split) with each image's fold, the test split."""
    base = prepare_splits(cfg.dataset)
    pool = sorted(base.train + base.val)
    groups = sample_groups(cfg.dataset.name, [path for path, _ in pool])
    folds = kfold_assignment([label for _, label in pool], int(cfg.cv.folds), int(cfg.dataset.split_seed), groups)
    return {"format": FORMAT, "folds": int(cfg.cv.folds), "grouped_by": "patient" if groups else None,
            "config": _plan_config(cfg), "root": str(base.root), "classes": base.classes,
            "positive_class": base.positive_class, "skipped": base.skipped,
            "pool": [[path, label, fold] for (path, label), fold in zip(pool, folds)],
            "test": [[path, label] for path, label in base.test]}


def fold_splits(plan: dict[str, Any], fold: int) -> DatasetSplits:
    """Fold `fold`'s split: train = the other folds, val = this fold (held out), test = the fixed test split."""
    pool = [(str(p), int(label), int(f)) for p, label, f in plan["pool"]]
    return DatasetSplits(root=Path(plan["root"]), classes=list(plan["classes"]),
                         positive_class=plan["positive_class"],
                         train=[(p, label) for p, label, f in pool if f != fold],
                         val=[(p, label) for p, label, f in pool if f == fold],
                         test=[(str(p), int(label)) for p, label in plan["test"]], skipped=list(plan["skipped"]))


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); choose another hydra.run.dir") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise UserError(f"{path} is not a lora-cls cross-validation plan; choose another hydra.run.dir")
    return plan


def check_cv_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """A cross-validation folder is new (None), or holds this same cross-validation interrupted (its plan,
    cv.json, returned: it resumes). A finished one, another config's or another run's folder is refused."""
    run = RunDir(run_dir)
    plan_path = run.path / CV_JSON
    if not plan_path.is_file():
        check_fresh_run_dir(run_dir)
        return None
    if (metrics := read_metrics(run.metrics)) is not None and metrics.get("status") == "ok":
        raise UserError(f"run folder {run_dir} holds a finished cross-validation (metrics.json status ok); choose "
                        "another hydra.run.dir")
    plan = _read_plan(plan_path)
    defaults = {k: v for k, v in stored_defaults().items() if k != "cv.fold"}
    saved, now = {**defaults, **plan["config"]}, _plan_config(cfg)
    changed = sorted(k for k in set(saved) | set(now)
                     if k != "dataset.root" and not is_neutral(k) and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise UserError(f"cannot resume the cross-validation in {run_dir}: the config differs from its cv.json "
                        f"({detail}); resume with the same overrides")
    return plan


def cross_validate(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train and evaluate one run per fold (resuming an interrupted cross-validation), then write the summary;
    returns the cross-validation's metrics.json (val: the pooled held-out folds; test: the folds' mean)."""
    from lora_cls.tasks.train import train

    run_dir = Path(run_dir)
    validate(cfg)
    info = distributed.init_distributed()
    plan = None
    if info.is_main:
        plan = check_cv_dir(cfg, run_dir)
        if plan is None:
            plan = make_plan(cfg)
            write_json(run_dir / CV_JSON, plan, indent=1)
            log.info("cross-validation: %d folds of %d images (%s), test split %d images; plan in %s",
                     plan["folds"], len(plan["pool"]), "grouped by patient" if plan["grouped_by"] else "stratified",
                     len(plan["test"]), run_dir / CV_JSON)
    plan = distributed.broadcast(plan, info)
    finished = distributed.broadcast([_fold_finished(fold_dir(run_dir, k)) for k in range(plan["folds"])]
                                     if info.is_main else None, info)
    for fold in range(plan["folds"]):
        if finished[fold]:
            log.info("cross-validation: fold %d of %d ended earlier; kept", fold + 1, plan["folds"])
            continue
        log.info("cross-validation: fold %d of %d (%d images held out)", fold + 1, plan["folds"],
                 sum(f == fold for *_, f in plan["pool"]))
        fold_cfg = OmegaConf.merge(cfg, {"cv": {"fold": fold}})
        train(fold_cfg, fold_dir(run_dir, fold), splits=fold_splits(plan, fold))
    distributed.barrier(info)
    metrics = summarize(cfg, run_dir, plan)
    if info.is_main:
        write_json(run_dir / "metrics.json", metrics)
        write_cv_summary(run_dir, metrics, f"{cfg.model.name} {cfg.finetune} on {cfg.dataset.name}")
        if cfg.trainer.progress:
            print_cv_summary(metrics)
        log.info("cross-validation done: held-out accuracy %.4f ± %.4f, test accuracy %.4f ± %.4f (mean ± std "
                 "over %d folds); summary in %s", metrics["cv"]["mean"]["heldout"]["accuracy"],
                 metrics["cv"]["std"]["heldout"]["accuracy"], metrics["cv"]["mean"]["test"]["accuracy"],
                 metrics["cv"]["std"]["test"]["accuracy"], plan["folds"], run_dir / "cv_summary.md")
    return metrics


def _fold_finished(folder: Path) -> bool:
    metrics = read_metrics(RunDir(folder).metrics)
    return metrics is not None and metrics.get("status") == "ok"


def _predictions(folder: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probabilities (N, K)) of a fold's reports/<split>/predictions.csv."""
    rows = read_split_predictions(RunDir(folder).reports(split) / PREDICTIONS)
    if not rows:
        raise UserError(f"{RunDir(folder).reports(split) / PREDICTIONS} is missing or empty; delete {folder} and "
                        "run the same command again to train that fold anew")
    index = {c: i for i, c in enumerate(classes)}
    return (np.array([index[r["true"]] for r in rows]),
            np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]))


def _fold_row(fold: int, metrics: dict) -> dict[str, Any]:
    pick = lambda part: {k: part.get(k) for k in SUMMARY_METRICS if part.get(k) is not None}  # noqa: E731
    return {"fold": fold, "run": f"fold_{fold}", "images": metrics["val"].get("n"), "best_epoch": metrics.get(
        "best_epoch"), "heldout": pick(metrics["val"]), "test": pick(metrics["test"])}


def _mean_std(rows: list[dict], part: str) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k in SUMMARY_METRICS if all(k in r[part] for r in rows)]
    values = {k: np.array([r[part][k] for r in rows], dtype=np.float64) for k in keys}
    return ({k: round(float(v.mean()), 6) for k, v in values.items()},
            {k: round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 6) for k, v in values.items()})


def summarize(cfg: DictConfig, run_dir: Path, plan: dict[str, Any]) -> dict:
    """The cross-validation's metrics.json, from the fold folders' metrics.json and predictions.csv files:
    `cv` (per fold, mean and sample std (ddof 1) over the folds, for the held-out fold and the test split),
    `val` (the held-out folds pooled: every pool image predicted once, by the model that did not train on it, with
    its intervals) and `test` (the folds' mean, with the stratified-bootstrap interval of that mean)."""
    classes = list(plan["classes"])
    positive = resolve_positive_class(classes, plan["positive_class"]) if len(classes) == 2 else None
    fold_metrics = [read_metrics(RunDir(fold_dir(run_dir, k)).metrics) or {} for k in range(plan["folds"])]
    rows = [_fold_row(k, m) for k, m in enumerate(fold_metrics)]
    mean, std = {}, {}
    for part in ("heldout", "test"):
        mean[part], std[part] = _mean_std(rows, part)
    held = [_predictions(fold_dir(run_dir, k), "val", classes) for k in range(plan["folds"])]
    y_pool, p_pool = np.concatenate([y for y, _ in held]), np.concatenate([p for _, p in held])
    pooled = classification_metrics(y_pool, p_pool, classes, plan["positive_class"])
    pooled.update({"ci": metric_intervals(y_pool, p_pool, positive), "ci_method": interval_methods(),
                   "source": f"the {plan['folds']} held-out folds pooled"})
    tests = [_predictions(fold_dir(run_dir, k), "test", classes) for k in range(plan["folds"])]
    test = {**mean["test"], "n": len(tests[0][0]), "std": std["test"],
            "ci": {k: [round(lo, 6), round(hi, 6)] for k, (lo, hi) in
                   bootstrap_intervals(tests[0][0], [p for _, p in tests], positive, with_accuracy=True).items()},
            "ci_method": {"level": 0.95, "all": f"{BOOTSTRAP} of the folds' mean"},
            "source": f"mean over the {plan['folds']} fold models"}
    first = fold_metrics[0]
    timing = [m.get("timing") or {} for m in fold_metrics]
    return {**run_metrics(cfg), "params": first.get("params"), "best_epoch": None, "d": first.get("d"),
            "epochs_run": sum(int(m.get("epochs_run") or 0) for m in fold_metrics),
            "cv": {"folds": plan["folds"], "grouped_by": plan["grouped_by"], "pool": len(plan["pool"]),
                   "per_fold": rows, "mean": mean, "std": std},
            "val": pooled, "test": test,
            "timing": {"train_seconds": round(sum(t.get("train_seconds", 0.0) for t in timing), 3),
                       "train_images_per_second": round(float(np.mean([t.get("train_images_per_second", 0.0)
                                                                        for t in timing])), 3)},
            "device": first.get("device"), "precision": first.get("precision"),
            "processes": first.get("processes")}
