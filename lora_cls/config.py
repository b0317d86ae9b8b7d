"""Typed config schema (registered with Hydra's ConfigStore) and the value checks that types cannot express.

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

from lora_cls.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32", "bf16", "16")
DATASETS = ("synthetic", "folder", "smoking", "malaria")
OPTIMIZERS = ("adamw", "sgd")
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
    enabled: bool = True
    max_gb: float = 4.0


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
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class ModelConfig:
    name: str = "resnet34"
    weights: str | None = "imagenet"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = "${.rank}"  # type: ignore[assignment]  # s = alpha / rank = 1 unless set, as in the YAML
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    targets: list[str] | None = None
    bn: str = "train"


@dataclass
class ScheduleConfig:
    kind: str = "none"
    start: float = 0.1
    end: float = 0.9
    d_min: float = 0.0
    noise_cutoff: float = 0.3
    noise_per_channel: bool = False


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
    num_workers: int = 2
    seed: int = 0
    deterministic: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    max_steps_per_epoch: int | None = None
    resume: str = "auto"
    progress: bool = True


@dataclass
class TrainConfig:
    """The training config. These defaults equal the YAML tree's (a test compares them), and a key added later
    must default to the behaviour from before it existed: older checkpoints are read with it."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    finetune: str = "lora"


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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


def validate(cfg: DictConfig | Any) -> None:
    """Value checks for a composed training config; each failure names its key."""
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg)
    _check(not unknown, ".".join(unknown[0]) if unknown else "",
           "is not a lora-cls setting, so it would be ignored (added with `+`?); check its spelling in "
           "`lora-train --cfg job` and drop the `+`")
    d, lo, tr, op, sc = cfg.dataset, cfg.lora, cfg.trainer, cfg.optimizer, cfg.schedule
    _check(not OmegaConf.is_missing(d, "root"), "dataset.root",
           f"is required for dataset={d.name}; set dataset.root=<folder>")
    _check(d.name in DATASETS, "dataset.name", f"unknown dataset {d.name!r}; choose one of {', '.join(DATASETS)}")
    from lora_cls.models import MODELS

    _check(cfg.model.name in MODELS, "model.name",
           f"unknown model {cfg.model.name!r}; choose one of {', '.join(sorted(MODELS))}")
    _check(d.image_size >= 16, "dataset.image_size", f"must be >= 16, got {d.image_size}")
    for key in ("val_fraction", "test_fraction"):
        _check(0.0 <= d[key] < 1.0, f"dataset.{key}", f"must be in [0, 1), got {d[key]}")
    _check(d.val_fraction + d.test_fraction < 1.0, "dataset.val_fraction",
           "val_fraction + test_fraction must leave some training data")
    _check(d.cache.max_gb >= 0, "dataset.cache.max_gb", f"must be >= 0, got {d.cache.max_gb}")
    _check(lo.rank >= 1, "lora.rank", f"must be a positive integer, got {lo.rank}")
    _check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    _check(lo.init in ("kaiming", "gaussian"), "lora.init", f"must be kaiming or gaussian, got {lo.init!r}")
    _check(lo.bn in ("train", "frozen"), "lora.bn", f"must be train or frozen, got {lo.bn!r}")
    _check(lo.targets is None or len(lo.targets) > 0, "lora.targets", "is empty; use null for the model's preset")
    if lo.targets and cfg.finetune == "lora":
        from lora_cls.models import check_targets

        check_targets(cfg.model.name, list(lo.targets))
    _check(cfg.finetune in ("lora", "full", "linear"), "finetune",
           f"must be lora, full or linear, got {cfg.finetune!r}")
    _check(sc.kind in ("none", "decay", "decay_noise"), "schedule.kind",
           f"must be none, decay or decay_noise, got {sc.kind!r}")
    _check(0.0 <= sc.start <= sc.end <= 1.0, "schedule.start", f"need 0 <= start <= end <= 1, got {sc.start}, {sc.end}")
    _check(0.0 <= sc.d_min <= 1.0, "schedule.d_min", f"must be in [0, 1], got {sc.d_min}")
    _check(op.name in OPTIMIZERS, "optimizer.name", f"must be one of {', '.join(OPTIMIZERS)}, got {op.name!r}")
    _check(op.lr > 0, "optimizer.lr", f"must be > 0, got {op.lr}")
    _check(op.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {op.weight_decay}")
    _check(0.0 <= op.warmup_fraction < 1.0, "optimizer.warmup_fraction", f"must be in [0, 1), got {op.warmup_fraction}")
    _check(0.0 <= op.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", f"must be in [0, 1], got {op.min_lr_ratio}")
    _check(tr.epochs >= 1, "trainer.epochs", f"must be >= 1, got {tr.epochs}")
    _check(tr.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {tr.batch_size}")
    _check(tr.eval_batch_size is None or tr.eval_batch_size >= 1, "trainer.eval_batch_size", "must be >= 1")
    _check(str(tr.precision) in PRECISIONS, "trainer.precision",
           f"must be one of {', '.join(PRECISIONS)}, got {tr.precision!r}")
    _check(tr.num_workers >= 0, "trainer.num_workers", f"must be >= 0, got {tr.num_workers}")
    _check(tr.early_stopping.monitor in MONITORS, "trainer.early_stopping.monitor",
           f"must be one of {', '.join(MONITORS)}, got {tr.early_stopping.monitor!r}")
    _check(tr.early_stopping.patience >= 1, "trainer.early_stopping.patience", "must be >= 1")
    _check(tr.max_steps_per_epoch is None or tr.max_steps_per_epoch >= 1, "trainer.max_steps_per_epoch", "must be >= 1")
    check_device(tr.device, "trainer.device")


def check_device(value: Any, key: str) -> None:
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)) is not None, key,
           f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def check_required(cfg: DictConfig | Any, key: str, example: str) -> None:
    """A mandatory value (`???` in the YAML) that the command line did not give."""
    _check(not OmegaConf.is_missing(cfg, key), key, f"is required, e.g. {example}")


def validate_eval(cfg: DictConfig | Any) -> None:
    check_required(cfg, "ckpt", "lora-eval ckpt=outputs/train/<run>")
    check_device(cfg.device, "device")
    _check(cfg.split in ("train", "val", "test", "all"), "split",
           f"must be val or test (or train, or all: every image of dataset.root), got {cfg.split!r}")
    _check(cfg.split != "all" or bool(cfg.dataset.root), "split",
           "split=all evaluates every image of other data: give dataset.root=<folder> (on the run's own split it "
           "would count the training images)")
    _check(cfg.precision is None or str(cfg.precision) in PRECISIONS, "precision",
           f"must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    _check(cfg.batch_size is None or cfg.batch_size >= 1, "batch_size", "must be >= 1")


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
