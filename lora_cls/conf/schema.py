"""Every config schema (train, eval, predict, data check; registered with Hydra's ConfigStore), the value checks
that types cannot express, and the runtime objects built from a checked config (`lora_options`, `decay_schedule`).

The YAML tree in lora_cls/conf fills these dataclasses; a wrong type or an unknown key fails at composition,
a wrong value (rank 0, negative lr, unknown precision) fails in `validate` with the key's name.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_cls.adapters.schedule import DecaySchedule
from lora_cls.errors import UserError

log = logging.getLogger(__name__)
CONFIG_MODULE = "lora_cls.conf"  # the packaged YAML tree (config_path="pkg://lora_cls.conf")

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
class CsvLoggerConfig:
    """history.csv, metrics.json and the reports of the run folder: always written, so nothing to set."""


@dataclass
class TensorBoardLoggerConfig:
    dir: str = "tensorboard"  # event files; a relative path is inside the run folder


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str | None = None  # null: a local store in ./mlruns (sqlite file mlflow.db + artifacts/)
    experiment: str = "lora-cls"
    run_name: str | None = None  # null: the run folder's name (in a sweep: <sweep folder>/<job>)


@dataclass
class LoggerConfig:
    csv: CsvLoggerConfig | None = field(default_factory=CsvLoggerConfig)
    tensorboard: TensorBoardLoggerConfig | None = None
    mlflow: MLflowLoggerConfig | None = None


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


@functools.cache
def register_configs() -> None:
    """The schemas in Hydra's ConfigStore, once per process (the YAML tree's `*_schema` defaults name them)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="datacheck_schema", node=DataCheckConfig)
    cs.store(name="export_schema", node=ExportConfig)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The packaged config `config_name` composed with `overrides`, as the commands compose it (no Hydra run:
    for tests, scripts and the Python API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


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
