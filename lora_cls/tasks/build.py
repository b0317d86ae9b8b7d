"""From a validated config to the objects a run needs, and a trained model back from its adapter file.

Training: `train_runtime` (device, precision, processes), `load_data` (splits and loaders), `build_classifier`
(the model with adapters), `build_trainer` (optimizer, schedules and the engine's settings). lora-eval and
lora-predict use `load_model_from_checkpoint`, which needs nothing of the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from lora_cls.adapters.options import FROM_WEIGHTS
from lora_cls.conf.checks import (
    decay_schedule,
    learning_rate,
    lora_options,
    stopping_patience,
    training_length,
)
from lora_cls.conf.load import stored_train_config
from lora_cls.data.augment import TrainAugment
from lora_cls.data.layouts import prepare_splits
from lora_cls.data.loaders import build_loaders
from lora_cls.data.preprocess import IMAGENET_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from lora_cls.data.splits import DatasetSplits
from lora_cls.engine import distributed
from lora_cls.engine.device import Runtime, resolve_device, resolve_precision, seed_everything
from lora_cls.engine.optim import build_optimizer, param_groups, warmup_cosine
from lora_cls.engine.timing import Stopwatch
from lora_cls.engine.trainer import Trainer, TrainerSettings
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.models.finetune import prepare_finetune
from lora_cls.models.registry import input_statistics, model_heads, model_spec, summarize
from lora_cls.runs import checkpoint as ckpt

log = logging.getLogger(__name__)


def eval_batch_size(cfg: DictConfig) -> int:
    return int(cfg.trainer.eval_batch_size or 2 * cfg.trainer.batch_size)


def train_runtime(cfg: DictConfig, info: distributed.DistInfo) -> Runtime:
    """Device (one GPU per process under torchrun), precision and seeds of a training run."""
    tr = cfg.trainer
    device = distributed.device_for(info, resolve_device(tr.device))
    seed_everything(int(tr.seed), bool(tr.deterministic), device)
    return Runtime(device, resolve_precision(tr.precision, device), bool(tr.channels_last), info,
                   bool(tr.progress) and info.is_main)


def preprocessing(cfg: DictConfig) -> Preprocessing:
    """The run's preprocessing (docs/DESIGN.md §5): the model's own normalisation, resize filter and crop ratio
    (torchvision weights' transforms(), timm's pretrained_cfg) when it trains from those weights
    (model.preprocess=auto with model.weights=imagenet, or own), ImageNet's statistics and crop ratio otherwise;
    dataset.fit and dataset.crop_pct as set."""
    d, m = cfg.dataset, cfg.model
    own = m.preprocess == "own" or (m.preprocess == "auto" and m.weights == "imagenet")
    stats = input_statistics(m.name, m.source) if own else {"source": "imagenet"}
    crop_pct = d.crop_pct if d.crop_pct is not None else stats.get("crop_pct", IMAGENET_CROP_PCT)
    return Preprocessing.of(int(d.image_size), d.fit, float(crop_pct), stats.get("interpolation", "bilinear"),
                            stats.get("mean", IMAGENET_MEAN), stats.get("std", IMAGENET_STD), stats["source"])


def load_data(cfg: DictConfig, runtime: Runtime, prep: Preprocessing | None = None,
              splits: DatasetSplits | None = None) -> tuple[DatasetSplits, dict[str, DataLoader]]:
    """The run's splits (the dataset's, or `splits` as given: a cross-validation fold) and their loaders
    (undecodable files either fail here or are dropped from the splits), the images stored as `prep` says
    (default: the run's `preprocessing`)."""
    splits = splits if splits is not None else prepare_splits(cfg.dataset)
    workers = int(cfg.trainer.num_workers)
    if workers and multiprocessing.current_process().daemon:
        # A launcher's worker process (joblib) is daemonic and may not start DataLoader workers.
        log.info("running inside a daemonic launcher process: loading data without DataLoader workers")
        workers = 0
    prep = prep or preprocessing(cfg)
    loaders = build_loaders(splits, cfg.dataset, int(cfg.trainer.batch_size), workers, int(cfg.trainer.seed),
                            pin_memory=runtime.device.type == "cuda", geometry=prep.geometry)
    return splits, loaders


def build_classifier(cfg: DictConfig, num_classes: int, from_file: bool = False) -> tuple[nn.Module, list[str], dict]:
    """The configured model with its adapters (or baseline mode) and the identity of its frozen base weights.

    The random state is seeded first, so `model.weights=null` gives the same base weights in lora-eval.
    `from_file`: a checkpoint fills the adapters next, so a pissa/olora init computes no decomposition and
    `lora.init_from` is not read (docs/DESIGN.md §7).
    """
    torch.manual_seed(int(cfg.trainer.seed))
    name, source, aux = cfg.model.name, cfg.model.source, bool(cfg.model.aux_heads)
    model = build_model(name, cfg.model.weights, num_classes, source=source, image_size=int(cfg.dataset.image_size),
                        aux=aux)
    identity = {"weights": cfg.model.weights, "init_seed": int(cfg.trainer.seed),
                "sha256": ckpt.base_fingerprint(model, model_spec(name, source).head)}
    rank_pattern = dict(cfg.lora.rank_pattern) if cfg.lora.rank_pattern else None
    options = dataclasses.replace(lora_options(cfg), from_file=from_file)
    started = time.perf_counter()
    adapted = prepare_finetune(model, name, cfg.finetune, targets=cfg.lora.targets, options=options,
                               source=source, aux=aux, rank_pattern=rank_pattern)
    if cfg.finetune == "lora" and options.init in FROM_WEIGHTS and not from_file:
        log.info("lora.init=%s: %d layers decomposed in %.1f s (the frozen weights are now the residuals)",
                 options.init, len(adapted), time.perf_counter() - started)
    if cfg.lora.get("init_from") and not from_file and cfg.finetune == "lora":
        from lora_cls.tasks.peft import apply_init_from

        apply_init_from(model, cfg)
    if cfg.finetune == "lora" and not cfg.lora.targets:
        log.info("default targets of %s at rank %s: %d layers (%s)", name, cfg.lora.rank, len(adapted),
                 summarize(adapted))
    return model, adapted, identity


def compiled(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """torch.compile for the training step (evaluation runs the merged plain model eagerly: engine.evaluate).

    reduce-overhead captures the step in CUDA graphs (static shapes: the train loader drops its last partial
    batch); on the CPU there are no CUDA graphs, so it compiles in the default mode there.
    """
    if mode == "reduce-overhead" and device.type != "cuda":
        log.warning("trainer.compile_mode=reduce-overhead captures CUDA graphs, and this run is on %s: compiling "
                    "in the default mode", device)
        mode = "default"
    log.info("torch.compile (mode %s): the first step compiles and takes longer", mode)
    return torch.compile(model, mode=mode)


def rank_train_loader(loader: DataLoader, seed: int, info: distributed.DistInfo) -> DataLoader:
    """For N processes: the same global batches as one process would draw, each rank taking its slice."""
    if not info.enabled:
        return loader
    global_batch = int(loader.batch_size)
    distributed.per_rank_batch(global_batch, info)
    # Seeded exactly as the single-process loader (data.loaders.build_loaders: train generator = seed + 0), and
    # shared by loader and sampler in the same order, so the shuffles are those of a 1-process run.
    generator = torch.Generator().manual_seed(seed)
    batches = BatchSampler(RandomSampler(loader.dataset, generator=generator), global_batch, loader.drop_last)
    return DataLoader(loader.dataset, batch_sampler=distributed.RankSliceBatchSampler(batches, info),
                      generator=generator, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


def build_trainer(cfg: DictConfig, model: nn.Module, runtime: Runtime, loaders: dict[str, DataLoader],
                  splits: DatasetSplits, timing: Stopwatch | None = None, prep: Preprocessing | None = None) -> Trainer:
    """Place the model (compiled, wrapped in DDP as configured) and set up its augmentation (for `prep`, default
    the run's preprocessing), optimizer, schedules and engine (timed on `timing`, the run's stopwatch)."""
    tr, op, info = cfg.trainer, cfg.optimizer, runtime.dist
    runtime.place(model)
    run_model = compiled(model, tr.compile_mode, runtime.device) if tr.compile else model
    if info.enabled:
        # Gradients of the trainable parameters only are averaged: frozen weights never enter DDP's buckets.
        device = runtime.device
        run_model = DistributedDataParallel(run_model, device_ids=[device.index] if device.type == "cuda" else None)
    preprocess = train_augment(cfg, prep or preprocessing(cfg), len(splits.classes), info).to(runtime.device)
    train_loader = rank_train_loader(loaders["train"], int(tr.seed), info)
    epochs, steps_per_epoch = training_length(cfg, len(train_loader))
    heads = model_heads(model_spec(cfg.model.name, cfg.model.source), bool(cfg.model.aux_heads))
    lr = learning_rate(cfg)
    groups = param_groups(model, heads, lr, op.head_lr_scale, op.lora_b_lr_ratio)
    optimizer = build_optimizer(groups, op.name, lr, op.weight_decay, tuple(op.betas), op.momentum, op.nesterov,
                                runtime.device)
    total_steps = steps_per_epoch * epochs
    if tr.epochs == "auto":
        log.info("trainer.epochs=auto: %d epochs of %d steps (%d steps; trainer.min_steps=%d, %d batches per pass "
                 "over the training set)", epochs, steps_per_epoch, total_steps, tr.min_steps, len(train_loader))
    schedule = decay_schedule(cfg)
    if (unreached := schedule.unreached(total_steps)) is not None:
        log.warning(unreached)
    settings = TrainerSettings(
        runtime=runtime, epochs=epochs, steps_per_epoch=steps_per_epoch,
        lr_factor=warmup_cosine(total_steps, op.warmup_fraction, op.min_lr_ratio), schedule=schedule,
        classes=tuple(splits.classes), positive_class=splits.positive_class, eval_batch_size=eval_batch_size(cfg),
        bn=cfg.lora.bn, monitor=tr.early_stopping.monitor, patience=stopping_patience(cfg, epochs),
        label_smoothing=float(tr.label_smoothing), class_weight=class_weights(cfg, splits), ema=float(tr.ema))
    return Trainer(run_model, optimizer, preprocess, settings, train_loader, loaders["val"].dataset, timing)


def train_augment(cfg: DictConfig, prep: Preprocessing, num_classes: int,
                  info: distributed.DistInfo = distributed.DistInfo()) -> TrainAugment:
    """The run's augmentation (dataset.augment) for `prep`, its random stream seeded by trainer.seed and the
    process rank (DDP ranks augment independently)."""
    a = cfg.dataset.augment
    return TrainAugment(prep, a.preset, hflip=bool(a.hflip), rotation=float(a.rotation),
                        color_jitter=float(a.color_jitter), scale=float(a.scale), erasing=float(a.erasing),
                        mixup=float(a.mixup), cutmix=float(a.cutmix), num_classes=num_classes,
                        seed=int(cfg.trainer.seed) * 1009 + info.rank)


def class_weights(cfg: DictConfig, splits: DatasetSplits) -> tuple[float, ...] | None:
    """trainer.class_weights=balanced: w_c = N / (K · n_c) over the training split (sklearn's "balanced"; a
    class with no training image gets 1). The weighted loss then counts every class as much as any other."""
    if cfg.trainer.class_weights != "balanced":
        return None
    counts = list(splits.class_counts()["train"].values())
    total, k = sum(counts), len(counts)
    weights = tuple(total / (k * n) if n else 1.0 for n in counts)
    log.info("class weights (balanced, from the training counts): %s",
             ", ".join(f"{c} {w:.3f}" for c, w in zip(splits.classes, weights)))
    return weights


def load_model_from_checkpoint(path: str | Path, base: dict | None = None) -> tuple[nn.Module, DictConfig, dict]:
    """Rebuild the trained model from an adapter file alone (its metadata holds config, classes, base identity),
    or from a PEFT LoRA folder (its base model named by the folder or by `base`: tasks/peft.py)."""
    from lora_cls.runs.peft import is_peft_folder

    if is_peft_folder(path):
        from lora_cls.tasks.peft import load_peft_model

        return load_peft_model(path, base)
    tensors, meta = ckpt.load_adapter(path)
    try:
        stored, classes, identity = meta["config"], list(meta["classes"]), meta["base_weights"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint {path} lacks lora-cls metadata ({exc})") from None
    train_cfg = stored_train_config(stored, f"checkpoint {path}")
    model, _, got_identity = build_classifier(train_cfg, len(classes), from_file=True)
    if got_identity["sha256"] != identity.get("sha256"):
        raise UserError(f"checkpoint {path} was trained on other base weights (model.weights={identity.get('weights')}); "
                        "make the same base weights available (e.g. the same ImageNet file) and try again")
    ckpt.apply_adapter(model, tensors, f"checkpoint {path}")
    return model, train_cfg, meta
