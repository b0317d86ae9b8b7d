"""What a run does, start to end: config → (data, model with adapters) → engine → reports and checkpoints.

`train(cfg, run_dir)` and `evaluate_checkpoint(cfg, run_dir)` are plain functions (no Hydra), callable from tests.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Subset

from lora_cls import checkpoint as ckpt
from lora_cls import distributed, reports
from lora_cls.augment import BatchAugment
from lora_cls.config import (
    flatten,
    schema_defaults,
    stored_train_config,
    to_container,
    validate,
    validate_eval,
)
from lora_cls.data import (
    DatasetSplits,
    ImageDataset,
    build_loaders,
    prepare_splits,
    read_splits_json,
    write_splits_json,
)
from lora_cls.engine import (
    EvalOutput,
    Trainer,
    build_optimizer,
    evaluate,
    resolve_device,
    resolve_precision,
    warmup_cosine,
)
from lora_cls.errors import UserError
from lora_cls.metrics import classification_metrics
from lora_cls.models import (
    build_model,
    model_spec,
    parameter_report,
    prepare_finetune,
    print_parameter_report,
)
from lora_cls.schedule import DecaySchedule

log = logging.getLogger(__name__)
console = Console(stderr=True)



def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every RNG; with `deterministic`, also remove the run-to-run variation of the device's kernels.

    On CUDA that means PyTorch's deterministic mode (cuDNN autotuning and atomics vary between runs). On CPU
    the oneDNN kernels give bit-identical results for a fixed thread count (tests/test_reliability.py pins
    this), while torch.use_deterministic_algorithms would swap them for reference kernels about 50x slower
    (measured: 1.2 s against 0.025 s for a ResNet34 forward at 32 px), so only the thread count is fixed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
    elif deterministic:
        torch.set_num_threads(torch.get_num_threads())


def schedule_from(cfg: DictConfig) -> DecaySchedule:
    s = cfg.schedule
    return DecaySchedule(s.kind, s.start, s.end, s.d_min, s.noise_cutoff, s.noise_per_channel)


def build_classifier(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, list[str], dict]:
    """The configured model with its adapters (or baseline mode) and the identity of its frozen base weights.

    The random state is seeded first, so `model.weights=null` gives the same base weights in lora-eval.
    """
    torch.manual_seed(int(cfg.trainer.seed))
    name = cfg.model.name
    model = build_model(name, cfg.model.weights, num_classes)
    identity = {"weights": cfg.model.weights, "init_seed": int(cfg.trainer.seed),
                "sha256": ckpt.base_fingerprint(model, model_spec(name).head)}
    lo = cfg.lora
    adapted = prepare_finetune(model, name, cfg.finetune, targets=lo.targets, rank=lo.rank, alpha=lo.alpha,
                               dropout=lo.dropout, rslora=lo.rslora, init=lo.init,
                               **schedule_from(cfg).adapter_options())
    return model, adapted, identity


def split_metrics(out: EvalOutput, splits: DatasetSplits) -> dict:
    return classification_metrics(out.y_true, out.probs, splits.classes, splits.positive_class, loss=out.loss)


def write_split_outputs(run_dir: Path, split: str, out: EvalOutput, splits: DatasetSplits, title: str) -> dict:
    metrics = split_metrics(out, splits)
    reports.write_split_reports(run_dir / "reports" / split, out.y_true, out.y_pred, splits.classes,
                                splits.positive_class, title=f"{title} — {split}")
    return metrics


def eval_loader(dataset: ImageDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _base_metrics(cfg: DictConfig) -> dict:
    return {"status": "ok", "error": None, "finetune": cfg.finetune, "dataset": cfg.dataset.name,
            "model": cfg.model.name}


def failed_metrics(cfg: DictConfig | None, error: str) -> dict:
    base = _base_metrics(cfg) if cfg is not None else {}
    return {**base, "status": "failed", "error": error}


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train per `cfg`, write the run folder (DESIGN.md §6), and return metrics.json's content."""
    run_dir = Path(run_dir)
    validate(cfg)
    resume = prepare_run_dir(cfg, run_dir)
    resume_from = None if resume is None else resume[0]
    tr = cfg.trainer
    info = distributed.init_distributed()
    main_process = info.is_main
    device = distributed.device_for(info, resolve_device(tr.device))
    seed_everything(int(tr.seed), bool(tr.deterministic), device)
    precision = resolve_precision(tr.precision, device)
    progress = bool(tr.progress) and main_process

    splits = prepare_splits(cfg.dataset)
    workers = int(tr.num_workers)
    if workers and multiprocessing.current_process().daemon:
        # A launcher's worker process (joblib) is daemonic and may not start DataLoader workers.
        log.info("running inside a daemonic launcher process: loading data without DataLoader workers")
        workers = 0
    loaders = build_loaders(splits, cfg.dataset, int(tr.batch_size), workers, int(tr.seed),
                            pin_memory=device.type == "cuda")
    if main_process:
        write_splits_json(splits, run_dir / "splits.json")
    log.info("data: %s at %s, classes %s, train/val/test = %d/%d/%d", cfg.dataset.name, splits.root,
             splits.classes, len(splits.train), len(splits.val), len(splits.test))

    model, adapted, identity = build_classifier(cfg, len(splits.classes))
    params = parameter_report(model)
    if progress:
        print_parameter_report(params, f"{cfg.model.name} · finetune={cfg.finetune}", console=console)
    log.info("params: total %d, trainable %d (%.4f%%), %d adapted layers", params["total"], params["trainable"],
             params["trainable_pct"], len(adapted))
    channels_last = bool(tr.channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    run_model: nn.Module = torch.compile(model) if tr.compile else model
    if info.enabled:
        # Gradients of the trainable parameters only are averaged: frozen weights never enter DDP's buckets.
        run_model = DistributedDataParallel(run_model, device_ids=[device.index] if device.type == "cuda" else None)

    aug = cfg.dataset.augment
    preprocess = BatchAugment(aug.hflip, aug.rotation, aug.color_jitter).to(device)
    train_loader = rank_train_loader(loaders["train"], int(tr.seed), info)
    steps_per_epoch = len(train_loader)
    if tr.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(tr.max_steps_per_epoch))
    op = cfg.optimizer
    optimizer = build_optimizer(model.parameters(), op.name, op.lr, op.weight_decay, tuple(op.betas), op.momentum,
                                op.nesterov, device)
    total_steps = steps_per_epoch * int(tr.epochs)
    if (unreached := schedule_from(cfg).unreached(total_steps)) is not None:
        log.warning(unreached)

    def evaluate_split(split: str) -> EvalOutput:
        return sharded_evaluate(model, loaders[split].dataset, _eval_batch_size(cfg), preprocess, device, precision,
                                channels_last, split, progress, info, len(splits.classes))

    trainer = Trainer(run_model, train_loader, None, preprocess, optimizer,
                      warmup_cosine(total_steps, op.warmup_fraction, op.min_lr_ratio),
                      schedule_from(cfg), device, precision, int(tr.epochs), steps_per_epoch, bn=cfg.lora.bn,
                      channels_last=channels_last, monitor=tr.early_stopping.monitor,
                      patience=int(tr.early_stopping.patience), progress=progress,
                      metrics_fn=lambda out: split_metrics(out, splits),
                      bn_loader=eval_loader(loaders["train"].dataset, _eval_batch_size(cfg)),
                      validate_fn=lambda: evaluate_split("val"),
                      reduce_fn=(lambda t: distributed.all_reduce_sum(t, info)) if info.enabled else None)

    metadata = {"config": to_container(cfg), "classes": splits.classes, "positive_class": splits.positive_class,
                "base_weights": identity, "eval_batch_size": _eval_batch_size(cfg), "precision": precision.name}
    adapter_path = run_dir / "checkpoints" / ckpt.ADAPTER_NAME
    last_path = run_dir / "checkpoints" / ckpt.LAST_NAME
    best_state: dict[str, torch.Tensor] = {}
    if resume is not None:
        best_state.update(restore_resume_state(resume[1], model, trainer))
        log.info("resuming from %s: %d of %d epochs done (global step %d)", resume_from, trainer.state.epoch,
                 tr.epochs, trainer.state.global_step)
        if resume_from != last_path:  # continuing another folder's run: carry its best adapter over
            ckpt.save_adapter(adapter_path, best_state, {**metadata, "best_epoch": trainer.state.best_epoch})
    elif main_process:
        ckpt.save_last(last_path, _resume_state(cfg, model, trainer, best_state))

    def on_epoch_end(row: dict, improved: bool) -> None:
        if improved:
            best_state.clear()
            best_state.update(ckpt.adapter_state(model, cfg.lora.bn))
        if not main_process:  # every process keeps the best state; only the first writes files
            return
        if improved:
            ckpt.save_adapter(adapter_path, best_state, {**metadata, "best_epoch": row["epoch"], "d": row["d"]})
        ckpt.save_last(last_path, _resume_state(cfg, model, trainer, best_state))
        reports.write_history(run_dir / "history.csv", trainer.state.history)
        reports.plot_curves(trainer.state.history, run_dir / "plots" / "curves.png", trainer.state.best_epoch)

    state = trainer.fit(on_epoch_end)

    # Evaluate the best epoch's weights (with the d they were validated at) on val and test.
    ckpt.apply_adapter(model, best_state, "best-epoch state")
    title = f"{cfg.model.name} {cfg.finetune} on {cfg.dataset.name}"
    results = {}
    for split in ("val", "test"):
        out = evaluate_split(split)
        results[split] = (write_split_outputs(run_dir, split, out, splits, title) if main_process
                          else split_metrics(out, splits))
    metrics = {**_base_metrics(cfg),
               "params": {k: params[k] for k in ("total", "trainable", "trainable_pct")},
               "best_epoch": state.best_epoch, "d": _best_d(state.history, state.best_epoch),
               "epochs_run": state.epoch, "val": results["val"],
               "test": results["test"],
               "timing": {"train_seconds": round(state.train_seconds, 3),
                          "train_images_per_second": round(state.train_images / max(state.train_seconds, 1e-9), 3)},
               "device": str(device), "precision": precision.name, "adapted_layers": len(adapted),
               "processes": info.world_size, "skipped_images": splits.skipped}
    if not main_process:
        return metrics
    reports.write_json(run_dir / "metrics.json", metrics)
    if progress:
        reports.print_metrics(results["test"], f"test ({len(splits.test)} images, best epoch {state.best_epoch})",
                              console=console)
    log.info("done: best epoch %d (d %.3g), val accuracy %.4f, test accuracy %.4f; run folder %s", state.best_epoch,
             metrics["d"], results["val"]["accuracy"], results["test"]["accuracy"], run_dir)
    return metrics


def _best_d(history: list[dict], best_epoch: int) -> float:
    """The decay factor the best epoch was validated, saved and evaluated at (1.0 without a decay schedule)."""
    return next((float(row["d"]) for row in history if row["epoch"] == best_epoch), 1.0)


def rank_train_loader(loader: DataLoader, seed: int, info: distributed.DistInfo) -> DataLoader:
    """For N processes: the same global batches as one process would draw, each rank taking its slice."""
    if not info.enabled:
        return loader
    global_batch = int(loader.batch_size)
    distributed.per_rank_batch(global_batch, info)
    # Seeded exactly as the single-process loader (data.build_loaders: train generator = seed + 0), and shared
    # by loader and sampler in the same order, so the shuffles are those of a 1-process run.
    generator = torch.Generator().manual_seed(seed)
    batches = BatchSampler(RandomSampler(loader.dataset, generator=generator), global_batch, loader.drop_last)
    return DataLoader(loader.dataset, batch_sampler=distributed.RankSliceBatchSampler(batches, info),
                      generator=generator, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


def sharded_evaluate(model: nn.Module, dataset, batch_size: int, preprocess: nn.Module, device: torch.device,
                     precision, channels_last: bool, desc: str, progress: bool, info: distributed.DistInfo,
                     num_classes: int) -> EvalOutput:
    """Evaluate this process's unpadded shard and gather every shard: each sample is counted exactly once."""
    if not info.enabled:
        return evaluate(model, eval_loader(dataset, batch_size), preprocess, device, precision, channels_last,
                        desc=desc, progress=progress)
    indices = distributed.shard(len(dataset), info)
    if len(indices):
        out = evaluate(model, eval_loader(Subset(dataset, indices), batch_size), preprocess, device, precision,
                       channels_last, desc=desc, progress=progress)
    else:
        out = EvalOutput(0.0, np.zeros(0, dtype=np.int64), np.zeros((0, num_classes), np.float32), 0.0)
    loss_sum = np.array([out.loss * len(out.y_true)])
    y_true, probs, losses = distributed.gather_arrays([out.y_true, out.probs, loss_sum], info)
    return EvalOutput(loss=float(losses.sum() / len(y_true)), y_true=y_true, probs=probs, seconds=out.seconds)


def _eval_batch_size(cfg: DictConfig) -> int:
    return int(cfg.trainer.eval_batch_size or 2 * cfg.trainer.batch_size)


# Keys that may differ between a run and its resumption (they do not change what is computed).
RESUME_FREE_KEYS = {"trainer.resume", "trainer.progress", "trainer.num_workers", "dataset.root"}


def _resume_state(cfg: DictConfig, model: nn.Module, trainer: Trainer, best: dict) -> dict[str, Any]:
    """last.pt: everything needed to continue (plain containers and tensors, readable with weights_only=True)."""
    s = trainer.state
    loader_rng = trainer.train_loader.generator
    return {"format": ckpt.FORMAT, "config": flatten(to_container(cfg)),
            "trainable": ckpt.adapter_state(model, cfg.lora.bn), "best_state": dict(best),
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(), "epoch": s.epoch, "global_step": s.global_step,
            "best_metric": s.best_metric, "best_epoch": s.best_epoch,
            "epochs_without_improvement": s.epochs_without_improvement, "train_seconds": s.train_seconds,
            "train_images": s.train_images, "history": s.history, "rng": ckpt.rng_state(),
            "loader_rng": loader_rng.get_state() if loader_rng is not None else None, "time": time.time()}


def resume_source(resume: str, run_dir: Path) -> Path | None:
    """The last.pt to continue from: `auto` = the run folder's own, if it holds an unfinished run."""
    if resume.lower() in ("never", "none", "null", "false", "no"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / ckpt.LAST_NAME
        if not last.is_file():
            return None
        if (metrics := reports.read_metrics(run_dir / "metrics.json")) is not None:
            if metrics.get("status") == "ok":
                raise UserError(f"run folder {run_dir} holds a finished run (metrics.json status ok); nothing to "
                                "resume. Choose another hydra.run.dir for a new run")
        return last
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / ckpt.LAST_NAME
    if not path.is_file():
        raise UserError(f"trainer.resume={resume}: no last.pt there; pass a run folder or its checkpoints/last.pt")
    return path


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> tuple[Path, dict] | None:
    """A training run's folder is new, or holds an unfinished run to resume: then (its last.pt, the loaded state).

    Everything that can refuse a resume is checked here, before anything is written: lora-train calls this
    before Hydra writes .hydra/ into the folder, so a refused resume leaves the interrupted run as it was.
    """
    resume_from = resume_source(str(cfg.trainer.resume), Path(run_dir))
    if resume_from is None:
        reports.check_fresh_run_dir(Path(run_dir))
        return None
    state = ckpt.load_last(resume_from)
    if not isinstance(state, dict) or state.get("format") != ckpt.FORMAT or not isinstance(state.get("config"), dict):
        raise UserError(f"{resume_from} is not a lora-cls last.pt")
    # A key the interrupted run's lora-cls did not have yet meant its schema default; a key the schema does not
    # know (a `+key=` override from before those were refused) was never read, so it cannot differ.
    defaults = schema_defaults()
    saved = {**defaults, **{k: v for k, v in state["config"].items() if k in defaults}}
    now = flatten(to_container(cfg))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise UserError(f"cannot resume: the config differs from the interrupted run's ({detail}); resume with the "
                        "same overrides")
    return resume_from, state


def restore_resume_state(state: dict, model: nn.Module, trainer: Trainer) -> dict:
    """Put a last.pt (checked by prepare_run_dir) back into model, optimizer, schedulers, trainer state and RNGs;
    return the best state."""
    ckpt.apply_adapter(model, state["trainable"], "resume state")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    s = trainer.state
    s.epoch, s.global_step = int(state["epoch"]), int(state["global_step"])
    s.best_metric, s.best_epoch = state["best_metric"], int(state["best_epoch"])
    s.epochs_without_improvement = int(state["epochs_without_improvement"])
    s.train_seconds, s.train_images = float(state["train_seconds"]), int(state["train_images"])
    s.history = list(state["history"])
    if state.get("loader_rng") is not None and trainer.train_loader.generator is not None:
        trainer.train_loader.generator.set_state(state["loader_rng"])
    ckpt.set_rng_state(state["rng"])
    return dict(state["best_state"])


# -- lora-eval ----------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / ckpt.ADAPTER_NAME, path / ckpt.ADAPTER_NAME):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path} holds no checkpoints/{ckpt.ADAPTER_NAME}; pass a lora-train run folder or the file")
    return path


def load_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, DictConfig, dict]:
    """Rebuild the trained model from an adapter file alone (its metadata holds config, classes, base identity)."""
    tensors, meta = ckpt.load_adapter(path)
    try:
        stored, classes, identity = meta["config"], list(meta["classes"]), meta["base_weights"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint {path} lacks lora-cls metadata ({exc})") from None
    train_cfg = stored_train_config(stored, f"checkpoint {path}")
    model, _, got_identity = build_classifier(train_cfg, len(classes))
    if got_identity["sha256"] != identity.get("sha256"):
        raise UserError(f"checkpoint {path} was trained on other base weights (model.weights={identity.get('weights')}); "
                        "make the same base weights available (e.g. the same ImageNet file) and try again")
    ckpt.apply_adapter(model, tensors, f"checkpoint {path}")
    return model, train_cfg, meta


def _run_data_root(adapter_path: Path, train_cfg: DictConfig) -> Path:
    """The data folder a training run used: its splits.json's root, else its config's dataset.root."""
    splits_path = adapter_path.parent.parent / "splits.json"
    if splits_path.is_file():
        try:
            return Path(read_splits_json(splits_path).root).resolve()
        except UserError:
            pass
    return Path(str(train_cfg.dataset.root)).expanduser().resolve()


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path) -> dict:
    """lora-eval: evaluate a checkpoint on its run's split (or another dataset.root) and write reports."""
    run_dir = Path(run_dir)
    validate_eval(cfg)
    reports.check_fresh_run_dir(run_dir)
    path = resolve_checkpoint(cfg.ckpt)
    model, train_cfg, meta = load_model_from_checkpoint(path)
    classes = list(meta["classes"])
    if cfg.dataset.root:
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
    else:
        splits_path = path.parent.parent / "splits.json"
        if not splits_path.is_file():
            raise UserError(f"no splits.json beside the checkpoint (looked for {splits_path}); pass dataset.root=")
        splits = read_splits_json(splits_path)
    samples = splits.split(cfg.split)
    device = resolve_device(cfg.device, "device")
    precision = resolve_precision(cfg.precision or meta.get("precision", "auto"), device)
    ds = train_cfg.dataset
    skip_bad = ds.skip_bad if cfg.dataset.skip_bad is None else cfg.dataset.skip_bad
    dataset = ImageDataset(splits.root, samples, int(ds.image_size), cache=bool(ds.cache.enabled),
                           max_cache_bytes=int(float(ds.cache.max_gb) * 2**30), skip_bad=bool(skip_bad))
    if dataset.skipped:
        log.warning("skipped %d undecodable image(s) (dataset.skip_bad=true): %s", len(dataset.skipped),
                    ", ".join(dataset.skipped[:5]) + (" ..." if len(dataset.skipped) > 5 else ""))
    channels_last = bool(train_cfg.trainer.channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    batch_size = int(cfg.batch_size or meta.get("eval_batch_size") or _eval_batch_size(train_cfg))
    preprocess = BatchAugment(False, 0.0, 0.0).to(device)
    out = evaluate(model, eval_loader(dataset, batch_size), preprocess, device, precision, channels_last,
                   desc=cfg.split, progress=bool(cfg.progress))
    title = f"{train_cfg.model.name} {train_cfg.finetune} (eval)"
    split_result = write_split_outputs(run_dir, cfg.split, out, splits, title)
    metrics = {**_base_metrics(train_cfg), "checkpoint": str(path), "split": cfg.split,
               "data_root": str(splits.root), cfg.split: split_result, "device": str(device),
               "precision": precision.name, "best_epoch": meta.get("best_epoch"), "images": len(dataset),
               "skipped_images": dataset.skipped}
    reports.write_json(run_dir / "metrics.json", metrics)
    if cfg.progress:
        reports.print_metrics(split_result, f"{cfg.split} ({len(dataset)} images)", console=console)
    log.info("%s accuracy %.4f on %d images; reports in %s", cfg.split, split_result["accuracy"], len(dataset),
             run_dir / "reports" / cfg.split)
    return metrics

