"""The value checks that types cannot express, each failure naming its key, and the runtime objects built from a checked config (`lora_options`, `decay_schedule`)."""

from __future__ import annotations

import importlib.util
import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lora_cls.adapters.schedule import DecaySchedule
from lora_cls.conf.load import unknown_keys
from lora_cls.conf.schema import (
    CLASS_WEIGHTS,
    COMPILE_MODES,
    EXPORT_FORMATS,
    MONITORS,
    OPTIMIZERS,
    PRECISIONS,
)
from lora_cls.data.layouts import DATASET_NAMES
from lora_cls.errors import UserError


def check_value(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def validate(cfg: DictConfig | Any) -> None:
    """Value checks for a composed training config; each failure names its key. The checks of lora.* and
    schedule.* are those of the runtime objects the run uses (`lora_options`, `decay_schedule`)."""
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg)
    check_value(not unknown, ".".join(unknown[0]) if unknown else "",
           "is not a lora-cls setting, so it would be ignored (added with `+`?); check its spelling in "
           "`lora-train --cfg job` and drop the `+`")
    d, lo, tr, op = cfg.dataset, cfg.lora, cfg.trainer, cfg.optimizer
    check_value(not OmegaConf.is_missing(d, "root"), "dataset.root",
           f"is required for dataset={d.name}; set dataset.root=<folder>")
    check_value(d.name in DATASET_NAMES, "dataset.name",
           f"unknown dataset {d.name!r}; choose one of {', '.join(DATASET_NAMES)}")
    from lora_cls.models.checks import check_model
    from lora_cls.models.finetune import BN_POLICIES, FINETUNE_MODES

    check_value(d.image_size >= 16, "dataset.image_size", f"must be >= 16, got {d.image_size}")
    check_model(cfg.model, d.image_size)  # model.source, model.name, model.aux_heads, the sizes the model runs at
    _check_data(d, cfg.model)
    lora_options(cfg)
    check_value(lo.bn in BN_POLICIES, "lora.bn", f"must be {' or '.join(BN_POLICIES)}, got {lo.bn!r}")
    check_value(lo.targets is None or len(lo.targets) > 0, "lora.targets", "is empty; use null for the model's preset")
    check_value(cfg.finetune in FINETUNE_MODES, "finetune",
           f"must be {', '.join(FINETUNE_MODES[:-1])} or {FINETUNE_MODES[-1]}, got {cfg.finetune!r}")
    if cfg.finetune == "lora":
        from lora_cls.models.checks import check_adapters

        check_adapters(cfg.model.name, list(lo.targets) if lo.targets else None, int(lo.rank),
                       dict(lo.rank_pattern) if lo.rank_pattern else None, cfg.model.source, cfg.model.aux_heads)
    if cfg.finetune == "lora" and not lo.allow_high_rank:
        _check_rank_is_low(cfg)
    _check_optimizer(op)
    check_value(tr.epochs == "auto" or (isinstance(tr.epochs, int) and not isinstance(tr.epochs, bool)
                                        and tr.epochs >= 1), "trainer.epochs",
                f"must be a positive integer or auto, got {tr.epochs!r}")
    check_value(tr.min_steps >= 1, "trainer.min_steps", f"must be >= 1, got {tr.min_steps}")
    check_value(tr.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {tr.batch_size}")
    if tr.batch_size == 1 and lo.bn == "train":
        from lora_cls.models.checks import min_train_batch

        smallest = min_train_batch(cfg.model.name, d.image_size, cfg.model.source)
        check_value(smallest == 1, "trainer.batch_size",
               f"1 is too small for {cfg.model.name} at {d.image_size} px: its last BatchNorm layers see 1x1 maps, "
               f"and training statistics need more than one value per channel; use trainer.batch_size={smallest} "
               "or more, a larger dataset.image_size, or lora.bn=frozen")
    check_value(tr.eval_batch_size is None or tr.eval_batch_size >= 1, "trainer.eval_batch_size", "must be >= 1")
    check_value(str(tr.precision) in PRECISIONS, "trainer.precision",
           f"must be one of {', '.join(PRECISIONS)}, got {tr.precision!r}")
    check_value(tr.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {tr.num_workers}")
    check_value(tr.early_stopping.monitor in MONITORS, "trainer.early_stopping.monitor",
           f"must be one of {', '.join(MONITORS)}, got {tr.early_stopping.monitor!r}")
    patience = tr.early_stopping.patience
    check_value(patience == "auto" or (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1),
                "trainer.early_stopping.patience", f"must be a positive integer or auto, got {patience!r}")
    check_value(tr.max_steps_per_epoch is None or tr.max_steps_per_epoch >= 1, "trainer.max_steps_per_epoch", "must be >= 1")
    check_device(tr.device, "trainer.device")
    _check_recipe(tr, op)
    _check_cv(cfg)
    check_loggers(cfg.get("logger"))


def _check_data(d: Any, model: Any) -> None:
    from lora_cls.data.augment import PRESETS
    from lora_cls.data.preprocess import FITS

    for key in ("val_fraction", "test_fraction"):
        check_value(0.0 <= d[key] < 1.0, f"dataset.{key}", f"must be in [0, 1), got {d[key]}")
    check_value(d.val_fraction + d.test_fraction < 1.0, "dataset.val_fraction",
                "val_fraction + test_fraction must leave some training data")
    check_value(d.cache.max_gb >= 0, "dataset.cache.max_gb", f"must be >= 0, got {d.cache.max_gb}")
    check_value(d.fit in FITS, "dataset.fit", f"must be {' or '.join(FITS)}, got {d.fit!r}")
    check_value(d.crop_pct is None or 0 < d.crop_pct <= 1, "dataset.crop_pct", f"must be in (0, 1], got {d.crop_pct}")
    check_value(model.preprocess in PREPROCESS, "model.preprocess",
                f"must be one of {', '.join(PREPROCESS)}, got {model.preprocess!r}")
    a = d.augment
    check_value(a.preset in PRESETS, "dataset.augment.preset", f"must be one of {', '.join(PRESETS)}, got {a.preset!r}")
    check_value(0 < a.scale <= 1, "dataset.augment.scale", f"must be in (0, 1], got {a.scale}")
    check_value(0 <= a.erasing <= 1, "dataset.augment.erasing", f"must be in [0, 1], got {a.erasing}")
    for key in ("mixup", "cutmix", "rotation", "color_jitter"):
        check_value(a[key] >= 0, f"dataset.augment.{key}", f"must be >= 0, got {a[key]}")


def _check_optimizer(op: Any) -> None:
    check_value(op.name in OPTIMIZERS, "optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}, got {op.name!r}")
    for key in ("lr", "lr_lora", "lr_full", "lr_linear"):
        check_value(op[key] is None and key == "lr" or (op[key] is not None and op[key] > 0), f"optimizer.{key}",
                    f"must be > 0{' or null' if key == 'lr' else ''}, got {op[key]}")
    check_value(op.lora_b_lr_ratio > 0, "optimizer.lora_b_lr_ratio", f"must be > 0, got {op.lora_b_lr_ratio}")
    check_value(op.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {op.weight_decay}")
    check_value(0.0 <= op.warmup_fraction < 1.0, "optimizer.warmup_fraction",
                f"must be in [0, 1), got {op.warmup_fraction}")
    check_value(0.0 <= op.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", f"must be in [0, 1], got {op.min_lr_ratio}")


def learning_rate(cfg: DictConfig | Any) -> float:
    """The run's peak learning rate: optimizer.lr, else the finetune mode's own (optimizer.lr_<mode>)."""
    op = cfg.optimizer
    return float(op.lr if op.lr is not None else op[f"lr_{cfg.finetune}"])


def training_length(cfg: DictConfig | Any, loader_steps: int) -> tuple[int, int]:
    """(epochs, optimizer steps per epoch) of a run whose training loader has `loader_steps` batches.

    trainer.epochs as set, each epoch one pass; or `auto`: 10 epochs of at least ceil(trainer.min_steps / 10) steps
    each, a small training set being gone through again (reshuffled) within an epoch, so it gets min_steps steps
    and 10 validations, and a large one the 10 plain epochs lora-cls always trained (docs/training.md).
    trainer.max_steps_per_epoch caps the steps either way."""
    tr = cfg.trainer
    epochs = AUTO_EPOCHS if tr.epochs == "auto" else int(tr.epochs)
    steps = loader_steps if tr.epochs != "auto" else max(loader_steps, math.ceil(int(tr.min_steps) / AUTO_EPOCHS))
    if tr.max_steps_per_epoch:
        steps = min(steps, int(tr.max_steps_per_epoch))
    return epochs, steps


def stopping_patience(cfg: DictConfig | Any, epochs: int) -> int:
    """trainer.early_stopping.patience, or for `auto` max(5, ceil(epochs / 4)): with epochs=auto a small dataset's
    epochs are a few steps each, and five of them would stop a run before it has learned."""
    patience = cfg.trainer.early_stopping.patience
    return int(patience) if patience != "auto" else max(5, math.ceil(epochs / 4))


AUTO_EPOCHS = 10
PREPROCESS = ("auto", "own", "imagenet")


def _check_recipe(tr: Any, op: Any) -> None:
    check_value(tr.compile_mode in COMPILE_MODES, "trainer.compile_mode",
           f"must be one of {', '.join(COMPILE_MODES)}, got {tr.compile_mode!r}")
    check_value(0.0 <= tr.label_smoothing < 1.0, "trainer.label_smoothing", f"must be in [0, 1), got {tr.label_smoothing}")
    check_value(tr.class_weights in CLASS_WEIGHTS, "trainer.class_weights",
           f"must be null or balanced, got {tr.class_weights!r}")
    check_value(0.0 <= tr.ema < 1.0, "trainer.ema", f"must be in [0, 1) (0: off; e.g. 0.999), got {tr.ema}")
    check_value(op.head_lr_scale > 0, "optimizer.head_lr_scale", f"must be > 0, got {op.head_lr_scale}")


def _check_cv(cfg: Any) -> None:
    cv = cfg.get("cv")
    if cv is None:
        return
    check_value(cv.folds == 0 or cv.folds >= 2, "cv.folds", f"must be 0 (off) or at least 2, got {cv.folds}")
    check_value(cv.fold is None or 0 <= cv.fold < max(cv.folds, 1), "cv.fold",
                f"is set by the cross-validation for its fold runs; leave it null (got {cv.fold})")
    check_value(not cv.folds or str(cfg.trainer.resume) in ("auto", "never"), "trainer.resume",
                "a cross-validation resumes its folds in its own folder: use auto (or never) with cv.folds, and "
                "the same hydra.run.dir")


def _check_rank_is_low(cfg: DictConfig | Any) -> None:
    from lora_cls.models.checks import full_rank_layers

    lo = cfg.lora
    full = full_rank_layers(cfg.model.name, list(lo.targets) if lo.targets else None, int(lo.rank),
                            cfg.model.source)
    if full:
        layer, limit = min(full, key=lambda item: item[1])
        raise UserError(f"lora.rank: {lo.rank} reaches the full rank of {len(full)} adapted layer(s) (e.g. {layer}: "
                        f"min(out, in·k·k) = {limit}), where LoRA is no longer low rank and trains more parameters "
                        f"than the layer itself; use lora.rank={limit - 1} or less, or lora.allow_high_rank=true")


def decay_schedule(cfg: DictConfig | Any) -> DecaySchedule:
    """The run's d(t) schedule from `cfg.schedule` (a UserError naming the key for a bad value)."""
    s = cfg.schedule
    return DecaySchedule(s.kind, s.start, s.end, s.d_min, s.noise_cutoff, s.noise_per_channel)


def lora_options(cfg: DictConfig | Any):
    """The adapters' LoRAOptions from `cfg.lora` and the schedule's extras (a UserError naming the key)."""
    from lora_cls.adapters.options import (
        LoRAOptions,  # torch: imported when a config is checked, not for --help
    )

    lo = cfg.lora
    return LoRAOptions(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora, init=lo.init,
                       fused=lo.fused, dora=bool(lo.get("dora", False)), **decay_schedule(cfg).adapter_options())


def check_device(value: Any, key: str) -> None:
    check_value(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)) is not None, key,
           f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def check_required(cfg: DictConfig | Any, key: str, example: str) -> None:
    """A mandatory value (`???` in the YAML) that the command line did not give."""
    check_value(not OmegaConf.is_missing(cfg, key), key, f"is required, e.g. {example}")


def _check_inference(cfg: Any) -> None:
    """device, precision and batch_size of lora-eval and lora-predict (null: the training run's)."""
    check_device(cfg.device, "device")
    check_value(cfg.precision is None or str(cfg.precision) in PRECISIONS, "precision",
           f"must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    check_value(cfg.batch_size is None or cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    check_value(cfg.tta in ("none", "flip"), "tta", f"must be none or flip, got {cfg.tta!r}")


def validate_eval(cfg: DictConfig | Any) -> None:
    check_required(cfg, "ckpt", "lora-eval ckpt=outputs/train/<run>")
    check_value(cfg.split in ("train", "val", "test", "all"), "split",
           f"must be val or test (or train, or all: every image of dataset.root), got {cfg.split!r}")
    check_value(cfg.split != "all" or bool(cfg.dataset.root), "split",
           "split=all evaluates every image of other data: give dataset.root=<folder> (on the run's own split it "
           "would count the training images)")
    _check_inference(cfg)


def validate_predict(cfg: Any) -> None:
    check_required(cfg, "ckpt", "lora-predict ckpt=outputs/train/<run> input=photos/")
    check_value((cfg.input is None) != (cfg.split is None), "input",
           "give either input=<image, folder or glob> or split=test (the run's own split), e.g. "
           "lora-predict ckpt=outputs/train/<run> input=photos/")
    check_value(cfg.split in (None, "train", "val", "test"), "split", f"must be train, val or test, got {cfg.split!r}")
    _check_inference(cfg)
    if cfg.show < 0:
        raise UserError(f"show: must be >= 0, got {cfg.show}")
    if cfg.input is not None and not str(cfg.input).strip():
        raise UserError("input: give an image, a folder or a glob such as 'photos/*.jpg'")


def validate_export(cfg: Any) -> None:
    check_required(cfg, "ckpt", "lora-export ckpt=outputs/train/<run> format=onnx")
    check_value(cfg.format in EXPORT_FORMATS, "format", f"must be one of {', '.join(EXPORT_FORMATS)}, got {cfg.format!r}")
    check_value(cfg.tolerance >= 0, "tolerance", f"must be >= 0, got {cfg.tolerance}")
    check_value(cfg.images >= 1, "images", f"must be >= 1, got {cfg.images}")
    check_value(not cfg.lowrank or cfg.format != "torchvision", "lowrank",
           "the torchvision format is the merged model; use format=lowrank for the low-rank one")


EXTRA = "tracking"  # pip install 'lora-cls[tracking]'


_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (blocked)
        return False


def check_loggers(logger: Any) -> None:
    """A UserError, before any folder is made, when a chosen logger's package is not installed."""
    for name, module in _PACKAGES.items():
        if logger is not None and logger.get(name) is not None and not _installed(module):
            raise UserError(f"logger={name} needs the {module} package, which is not installed; "
                            f"pip install 'lora-cls[{EXTRA}]' (or pip install {module})")
