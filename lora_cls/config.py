"""Every config schema (train, eval, predict, data check; registered with Hydra's ConfigStore), the value checks
that types cannot express, and the runtime objects built from a checked config (`lora_options`, `decay_schedule`).

The YAML tree in lora_cls/conf fills these dataclasses; a wrong type or an unknown key fails at composition,
a wrong value (rank 0, negative lr, unknown precision) fails in `validate` with the key's name.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_cls.data.layouts import DATASET_NAMES
from lora_cls.errors import UserError
from lora_cls.schedule import DecaySchedule
from lora_cls.tracking import LoggerConfig, check_loggers

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32", "bf16", "16")
OPTIMIZERS = ("adamw", "sgd")
EXPORT_FORMATS = ("torchvision", "lowrank", "onnx", "torchscript")
CLASS_WEIGHTS = (None, "balanced")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MONITORS = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss")


@dataclass
class SyntheticConfig:
    num_per_class: int = 300
    source_size: int = 64
    seed: int = 0


@dataclass
class AugmentConfig:
    hflip: bool = True
    rotation: float = 10.0
    color_jitter: float = 0.1


@dataclass
class CacheConfig:
    """The decoded-image cache (lora_cls.data.cache). Before it, max_gb capped the in-memory copy of a run's
    images; now it caps the cache folder on disk (older configs' 4.0 stays a valid cap)."""

    enabled: bool = True
    max_gb: float = 10.0
    dir: str | None = None  # null: $LORA_CLS_CACHE_DIR, else ($XDG_CACHE_HOME or ~/.cache)/lora_cls/images


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    root: str = MISSING  # each dataset option sets it; `folder` leaves it to the user (`???`)
    image_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    positive_class: str | None = None
    skip_bad: bool = False
    max_image_pixels: int | None = 89_478_485  # larger images are refused as undecodable; null: no limit
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class ModelConfig:
    name: str = "resnet34"
    weights: str | None = "imagenet"
    source: str = "torchvision"  # torchvision | timm (the optional extra)
    aux_heads: bool = False  # GoogLeNet / Inception v3: train with their auxiliary heads


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = "${.rank}"  # type: ignore[assignment]  # s = alpha / rank = 1 unless set, as in the YAML
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    targets: list[str] | None = None
    # per-layer ranks {glob: rank} (PEFT's rank_pattern); Any, so that a command-line dict replaces the null
    rank_pattern: Any = None
    bn: str = "train"
    allow_high_rank: bool = False  # allow a rank that reaches a layer's min(out, in·k·k) (no longer low rank)
    fused: str = "auto"  # conv adapters in one convolution with the frozen one: auto | true | false (same function)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    head_lr_scale: float = 1.0  # the new head's lr = lr x this (it starts from scratch, the adapters from zero change)


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_accuracy"
    patience: int = 5


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    num_workers: int = 2
    seed: int = 0
    deterministic: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    max_steps_per_epoch: int | None = None
    resume: str = "auto"
    progress: bool = True
    label_smoothing: float = 0.0  # cross-entropy target smoothing (training loss only)
    class_weights: str | None = None  # null | balanced: loss weights N / (K * n_c) from the training counts
    ema: float = 0.0  # decay of an exponential moving average of the trainable weights (e.g. 0.999); 0: off


@dataclass
class TrainConfig:
    """The training config. These defaults equal the YAML tree's (a test compares them), and a key added later
    must default to the behaviour from before it existed: older checkpoints are read with it."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    schedule: DecaySchedule = field(default_factory=DecaySchedule)  # the runtime object is its own schema
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    finetune: str = "lora"
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the `logger=` group (lora_cls/tracking.py)


@dataclass
class EvalDatasetConfig:
    root: str | None = None
    name: str | None = None
    skip_bad: bool | None = None  # null: the training run's dataset.skip_bad


@dataclass
class EvalConfig:
    ckpt: str = MISSING
    split: str = "test"
    dataset: EvalDatasetConfig = field(default_factory=EvalDatasetConfig)
    device: str = "auto"
    precision: str | None = None
    batch_size: int | None = None
    progress: bool = True


@dataclass
class PredictConfig:
    ckpt: str = MISSING  # a lora-train run folder or its checkpoints/adapter.safetensors
    input: str | None = None  # an image, a folder (searched recursively) or a glob
    split: str | None = None  # instead of input: train, val or test of the run's own splits.json
    device: str = "auto"
    precision: str | None = None  # null: the training run's precision
    batch_size: int | None = None  # null: the training run's eval batch size
    skip_bad: bool = False  # skip undecodable inputs (listed in predict.json) instead of stopping
    show: int = 20  # rows of the console table
    progress: bool = True


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # a lora-train run folder or its checkpoints/adapter.safetensors
    format: str = "torchvision"  # torchvision | lowrank | onnx | torchscript
    lowrank: bool = False  # onnx/torchscript: the low-rank model (d = 0) instead of the merged one
    tolerance: float = 1e-4  # max |logit difference| allowed against the trained model, × max(1, largest |logit|)
    images: int = 16  # test images the export is verified on
    opset: int = 17  # ONNX opset


@dataclass
class DataCheckConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    splits: str | None = None  # a run folder or splits.json: check the split that run used
    patients: bool | None = None  # null: on for dataset=malaria and for file names all carrying _IMG_
    show: int = 20  # rows per problem table on the console (datacheck.json lists everything)
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="datacheck_schema", node=DataCheckConfig)
    cs.store(name="export_schema", node=ExportConfig)


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
    from lora_cls.models import BN_POLICIES, FINETUNE_MODES, check_model

    check_value(d.image_size >= 16, "dataset.image_size", f"must be >= 16, got {d.image_size}")
    check_model(cfg.model, d.image_size)  # model.source, model.name, model.aux_heads, the sizes the model runs at
    for key in ("val_fraction", "test_fraction"):
        check_value(0.0 <= d[key] < 1.0, f"dataset.{key}", f"must be in [0, 1), got {d[key]}")
    check_value(d.val_fraction + d.test_fraction < 1.0, "dataset.val_fraction",
           "val_fraction + test_fraction must leave some training data")
    check_value(d.cache.max_gb >= 0, "dataset.cache.max_gb", f"must be >= 0, got {d.cache.max_gb}")
    lora_options(cfg)
    check_value(lo.bn in BN_POLICIES, "lora.bn", f"must be {' or '.join(BN_POLICIES)}, got {lo.bn!r}")
    check_value(lo.targets is None or len(lo.targets) > 0, "lora.targets", "is empty; use null for the model's preset")
    check_value(cfg.finetune in FINETUNE_MODES, "finetune",
           f"must be {', '.join(FINETUNE_MODES[:-1])} or {FINETUNE_MODES[-1]}, got {cfg.finetune!r}")
    if cfg.finetune == "lora":
        from lora_cls.models import check_adapters

        check_adapters(cfg.model.name, list(lo.targets) if lo.targets else None, int(lo.rank),
                       dict(lo.rank_pattern) if lo.rank_pattern else None, cfg.model.source, cfg.model.aux_heads)
    if cfg.finetune == "lora" and not lo.allow_high_rank:
        _check_rank_is_low(cfg)
    check_value(op.name in OPTIMIZERS, "optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}, got {op.name!r}")
    check_value(op.lr > 0, "optimizer.lr", f"must be > 0, got {op.lr}")
    check_value(op.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {op.weight_decay}")
    check_value(0.0 <= op.warmup_fraction < 1.0, "optimizer.warmup_fraction", f"must be in [0, 1), got {op.warmup_fraction}")
    check_value(0.0 <= op.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", f"must be in [0, 1], got {op.min_lr_ratio}")
    check_value(tr.epochs >= 1, "trainer.epochs", f"must be >= 1, got {tr.epochs}")
    check_value(tr.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {tr.batch_size}")
    if tr.batch_size == 1 and lo.bn == "train":
        from lora_cls.models import min_train_batch

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
    check_value(tr.early_stopping.patience >= 1, "trainer.early_stopping.patience", "must be >= 1")
    check_value(tr.max_steps_per_epoch is None or tr.max_steps_per_epoch >= 1, "trainer.max_steps_per_epoch", "must be >= 1")
    check_device(tr.device, "trainer.device")
    _check_recipe(tr, op)
    check_loggers(cfg.get("logger"))


def _check_recipe(tr: Any, op: Any) -> None:
    check_value(tr.compile_mode in COMPILE_MODES, "trainer.compile_mode",
           f"must be one of {', '.join(COMPILE_MODES)}, got {tr.compile_mode!r}")
    check_value(0.0 <= tr.label_smoothing < 1.0, "trainer.label_smoothing", f"must be in [0, 1), got {tr.label_smoothing}")
    check_value(tr.class_weights in CLASS_WEIGHTS, "trainer.class_weights",
           f"must be null or balanced, got {tr.class_weights!r}")
    check_value(0.0 <= tr.ema < 1.0, "trainer.ema", f"must be in [0, 1) (0: off; e.g. 0.999), got {tr.ema}")
    check_value(op.head_lr_scale > 0, "optimizer.head_lr_scale", f"must be > 0, got {op.head_lr_scale}")


def _check_rank_is_low(cfg: DictConfig | Any) -> None:
    from lora_cls.models import full_rank_layers

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
    from lora_cls.lora import LoRAOptions  # torch: imported when a config is checked, not for --help

    lo = cfg.lora
    return LoRAOptions(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora, init=lo.init,
                       fused=lo.fused, **decay_schedule(cfg).adapter_options())


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


@functools.cache
def _schema_tree() -> dict:
    return to_container(OmegaConf.structured(TrainConfig))


def unknown_keys(tree: Any, schema: dict | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) in a nested mapping that the training schema does not have."""
    schema = _schema_tree() if schema is None else schema
    found: list[tuple[str, ...]] = []
    for key, value in (tree.items() if isinstance(tree, (dict, DictConfig)) else []):
        if key not in schema:
            found.append((*prefix, str(key)))
        elif isinstance(schema[key], dict):
            found += unknown_keys(value, schema[key], (*prefix, str(key)))
    return found


def stored_train_config(stored: Any, source: str) -> DictConfig:
    """A training config read back from a checkpoint, on today's schema.

    Keys added to the schema since the file was written take their schema defaults (so a new key's default in
    the dataclasses must reproduce the behaviour from before it existed). A key the schema does not know was
    never read by lora-cls (a `+key=` override before those were refused, or a hand edit): it is dropped with a
    warning. A value of the wrong type, or anything that is not a config, is a UserError.
    """
    if not isinstance(stored, dict):
        raise UserError(f"{source} holds no lora-cls training config (got {type(stored).__name__})")
    stored = copy.deepcopy(stored)
    dropped = unknown_keys(stored)
    for *parents, leaf in dropped:
        node = stored
        for part in parents:
            node = node[part]
        del node[leaf]
    if dropped:
        log.warning("%s: ignoring config key(s) that lora-cls does not know: %s", source,
                    ", ".join(".".join(path) for path in dropped))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored)
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise UserError(f"{source} holds a config this lora-cls cannot read (key {key}: "
                        f"{str(exc).splitlines()[0]})") from None
    return cfg  # type: ignore[return-value]


def schema_defaults() -> dict[str, Any]:
    """The training schema's defaults as flat dotted keys (what a key absent from an older file meant)."""
    return flatten(copy.deepcopy(_schema_tree()))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (lists stay values)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts/lists (for metadata and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
