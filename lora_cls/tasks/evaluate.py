"""`evaluate_checkpoint(cfg, run_dir)`: lora-eval, a trained checkpoint on its run's split or on other data.

The model is rebuilt from the adapter file alone (`inference.from_checkpoint`) and evaluated on the split
its run wrote to splits.json, so the training run's test metrics are reproduced exactly.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from lora_cls.conf.checks import validate_eval
from lora_cls.data.layouts import prepare_splits
from lora_cls.data.loaders import ImageDataset
from lora_cls.data.splits import DatasetSplits, read_splits_json
from lora_cls.engine.explain import grad_cam_classes
from lora_cls.errors import UserError
from lora_cls.files import write_json
from lora_cls.runs import reports
from lora_cls.runs.console import print_metrics
from lora_cls.runs.folder import RunDir, check_fresh_run_dir, run_metrics
from lora_cls.runs.misclassified import write_errors
from lora_cls.tasks.inference import base_settings, from_checkpoint

log = logging.getLogger(__name__)
console = Console(stderr=True)


def _run_data_root(adapter_path: Path, train_cfg: DictConfig) -> Path:
    """The data folder a training run used: its splits.json's root, else its config's dataset.root."""
    splits_path = RunDir.of_checkpoint(adapter_path).splits
    if splits_path.is_file():
        try:
            return Path(read_splits_json(splits_path).root).resolve()
        except UserError:
            pass
    return Path(str(train_cfg.dataset.root)).expanduser().resolve()


def eval_splits(cfg: DictConfig, path: Path, train_cfg: DictConfig, meta: dict) -> DatasetSplits:
    """The split to evaluate: the run's own splits.json, or `dataset.root` (another copy, or other data)."""
    if not cfg.dataset.root:
        splits_path = RunDir.of_checkpoint(path).splits
        if not splits_path.is_file():
            raise UserError(f"no splits.json beside the checkpoint (looked for {splits_path}); pass dataset.root=")
        return read_splits_json(splits_path)
    classes = list(meta["classes"])
    # The generated synthetic set is a folder layout: another root is read as a plain folder.
    name = cfg.dataset.name or ("folder" if train_cfg.dataset.name == "synthetic" else train_cfg.dataset.name)
    ds_cfg = OmegaConf.merge(train_cfg.dataset, {"root": cfg.dataset.root, "name": name})
    splits = prepare_splits(ds_cfg, need=() if cfg.split == "all" else (cfg.split,))
    if cfg.split == "all" and splits.root == _run_data_root(path, train_cfg):
        raise UserError(f"split=all on {splits.root}, the data the run was trained on, would count its training "
                        "images; use split=test or val there, and split=all for other data")
    if splits.classes != classes:
        raise UserError(f"dataset.root={cfg.dataset.root} has classes {splits.classes}, but the checkpoint was "
                        f"trained on {classes}; evaluate on data with the same classes")
    # The run's positive class, not the layout's default (synthetic read as a folder would flip it).
    splits.positive_class = meta.get("positive_class", splits.positive_class)
    return splits


class ErrorOverlays:
    """errors.png's Grad-CAM: the overlay of the predicted class's heatmap on each mistake shown (`layer` is set
    once they are drawn)."""

    def __init__(self, clf, dataset: ImageDataset, layer: str | None) -> None:
        self.clf, self.dataset, self.asked, self.layer = clf, dataset, layer, None

    def __call__(self, indices: list[int]) -> dict:
        from lora_cls.runs.diagnostics import overlay

        found = self.clf.explain(torch.stack([self.dataset[i][0] for i in indices]), layer=self.asked)
        self.layer = found.layer
        return {i: overlay(image, heat) for i, image, heat in zip(indices, found.images, found.heatmaps)}


def explain_errors(cfg: DictConfig, clf, dataset: ImageDataset) -> ErrorOverlays | None:
    """explain=true: Grad-CAM overlays on errors.png (an error when grad-cam is missing); null: when installed."""
    if cfg.explain is False:
        return None
    if cfg.explain is None and importlib.util.find_spec("pytorch_grad_cam") is None:
        log.info("errors.png without Grad-CAM overlays: the grad-cam package is not installed (pip install "
                 "'lora-cls[explain]')")
        return None
    grad_cam_classes()  # explain=true without the package: the error that names it
    return ErrorOverlays(clf, dataset, cfg.explain_layer)


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path) -> dict:
    """lora-eval: evaluate a checkpoint on its run's split (or another dataset.root) and write reports."""
    run = RunDir(run_dir)
    validate_eval(cfg)
    check_fresh_run_dir(run.path)
    clf = from_checkpoint(cfg.ckpt, cfg.device, cfg.precision, tta=cfg.tta,  # precision null: the run's own
                          calibrate=bool(cfg.calibrate), base=base_settings(cfg))
    path, train_cfg, meta = clf.checkpoint, clf.config, clf.meta
    splits = eval_splits(cfg, path, train_cfg, meta)
    dataset = ImageDataset.from_config(splits.root, splits.split(cfg.split), train_cfg.dataset,
                                       skip_bad=cfg.dataset.skip_bad, geometry=clf.preprocessing.geometry)
    if dataset.skipped:
        log.warning("skipped %d undecodable image(s) (dataset.skip_bad=true): %s", len(dataset.skipped),
                    ", ".join(dataset.skipped[:5]) + (" ..." if len(dataset.skipped) > 5 else ""))
    out = clf.evaluate(dataset, cfg.batch_size, desc=cfg.split, progress=bool(cfg.progress))
    title = f"{train_cfg.model.name} {train_cfg.finetune} (eval)"
    split_result = reports.split_results(out, splits.classes, splits.positive_class, run.reports(cfg.split),
                                         f"{title} — {cfg.split}", clf.temperature,
                                         [p for p, _ in dataset.samples])
    explain = explain_errors(cfg, clf, dataset)
    errors = write_errors(run.reports(cfg.split), [str(splits.root / p) for p, _ in dataset.samples],
                          lambda i: dataset[i][0].permute(1, 2, 0).numpy(), out.y_true, out.probs, splits.classes,
                          explain)
    metrics = {**run_metrics(train_cfg), "checkpoint": str(path), "split": cfg.split,
               "data_root": str(splits.root), cfg.split: split_result, "device": str(clf.device),
               "precision": clf.precision.name, "tta": clf.tta, "calibrated": clf.calibrate,
               "temperature": clf.temperature, "best_epoch": meta.get("best_epoch"), "images": len(dataset),
               "skipped_images": dataset.skipped, "misclassified": errors,
               "explain_layer": getattr(explain, "layer", None)}
    write_json(run.metrics, metrics)
    if cfg.progress:
        print_metrics(split_result, f"{cfg.split} ({len(dataset)} images)", console=console)
    log.info("%s accuracy %.4f on %d images; reports in %s", cfg.split, split_result["accuracy"], len(dataset),
             run.reports(cfg.split))
    return metrics
