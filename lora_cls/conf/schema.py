"""Every config schema (train, eval, predict, export, data check), each key's default and one-line help written
once (`setting(default, help)`; docs/config.md is generated from them).

The YAML tree in lora_cls/conf fills these dataclasses with what differs from the defaults (conf/load.py registers
them with Hydra); a wrong type or an unknown key fails at composition, a wrong value (rank 0, negative lr, unknown
precision) fails in conf/checks.validate with the key's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lora_cls.adapters.options import LoRAOptions
from lora_cls.adapters.schedule import DecaySchedule

PRECISIONS = ("auto", "32", "bf16", "16")
OPTIMIZERS = ("adamw", "sgd")
EXPORT_FORMATS = ("torchvision", "lowrank", "onnx", "torchscript", "peft")
CLASS_WEIGHTS = (None, "balanced")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MONITORS = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss")


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: its default (or `factory` for a mutable one) and its one-line help, written once here.
    The config reference (docs/config.md, scripts/config_reference.py) is generated from these."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SyntheticConfig:
    """The generated offline set (dataset=synthetic): cells with or without a dark inclusion."""

    num_per_class: int = setting(300, "images per class (70/15/15 % train/val/test)")
    source_size: int = setting(64, "side of the generated PNG files, in pixels")
    seed: int = setting(0, "seed of the generator (another seed is another set, generated into another root)")


@dataclass
class AugmentConfig:
    """Training augmentation, per sample, on the batch's device (lora_cls.data.augment)."""

    preset: str = setting("light", "none | light (flip, rotation, colour jitter) | natural (photos at the pretrained "
                                   "size: random-resized crop, flip, TrivialAugmentWide, erasing) | microscopy (crop, "
                                   "flips, 90° turns); docs/BENCHMARKS.md \"Recipe\" measured them")
    hflip: bool = setting(True, "light: random horizontal flip (p = 0.5)")
    rotation: float = setting(10.0, "light: random rotation, uniform in ± this many degrees (reflection padding)")
    color_jitter: float = setting(0.1, "light, microscopy: brightness, contrast and saturation factors uniform in "
                                       "[1 - x, 1 + x]")
    scale: float = setting(0.35, "natural, microscopy: smallest area share of the random-resized crop")
    erasing: float = setting(0.25, "natural: probability of random erasing")
    mixup: float = setting(0.0, "MixUp alpha (0: off); the loss takes the mixed soft targets")
    cutmix: float = setting(0.0, "CutMix alpha (0: off); with mixup too, each batch takes one of them")


@dataclass
class CacheConfig:
    """The decoded-image cache (lora_cls.data.cache). Before it, max_gb capped the in-memory copy of a run's
    images; now it caps the cache folder on disk (older configs' 4.0 stays a valid cap)."""

    enabled: bool = setting(True, "decode every image once into the on-disk cache; false: decode every epoch")
    max_gb: float = setting(10.0, "size cap of the cache folder (GiB); least recently used entries are evicted")
    dir: str | None = setting(None, "cache folder; null: $LORA_CLS_CACHE_DIR, else ($XDG_CACHE_HOME or ~/.cache)"
                                    "/lora_cls/images")


@dataclass
class DatasetConfig:
    """The data a run trains and is evaluated on (one option of the `dataset` group sets what differs)."""

    name: str = setting("synthetic", "layout: synthetic | folder | smoking | malaria")
    root: str = setting(MISSING, "the dataset folder; each dataset option sets it, `folder` leaves it to you")
    image_size: int = setting(64, "the model's input side S, in pixels")
    fit: str = setting("crop", "crop (the short side resized to S / crop_pct, then the centre S × S crop, as "
                               "torchvision and timm do) | squash (resized to S × S, aspect ratio not kept)")
    crop_pct: float | None = setting(None, "S / resize side; null: the model's own (its weights' transforms or timm "
                                           "pretrained_cfg), 0.875 for random init")
    val_fraction: float = setting(0.15, "share of the pool carved out for validation where the layout has none")
    test_fraction: float = setting(0.15, "share of the pool carved out for testing where the layout has none")
    split_seed: int = setting(0, "seed of the stratified (or patient-grouped) split")
    positive_class: str | None = setting(None, "class whose sensitivity and ROC AUC are reported (binary "
                                               "tasks); null: the layout's default")
    skip_bad: bool = setting(False, "drop (and list) undecodable images instead of stopping")
    max_image_pixels: int | None = setting(89_478_485, "larger images are refused (decompression-bomb guard); "
                                                       "null: no limit")
    synthetic: SyntheticConfig = setting(help="the generated set (dataset=synthetic)", factory=SyntheticConfig)
    augment: AugmentConfig = setting(help="training augmentation", factory=AugmentConfig)
    cache: CacheConfig = setting(help="the decoded-image cache", factory=CacheConfig)


@dataclass
class ModelConfig:
    """The backbone: any torchvision classifier by name, or timm's with source=timm."""

    name: str = setting("resnet34", "model name (`lora-models` lists them)")
    weights: str | None = setting("imagenet", "imagenet | null (random init) | path to a torchvision-format state "
                                              "dict")
    source: str = setting("torchvision", "torchvision | timm (pip install 'lora-cls[timm]')")
    preprocess: str = setting("auto", "normalisation and resize filter: auto (the weights' own with "
                                      "weights=imagenet, else ImageNet statistics) | own (the model's own always) | "
                                      "imagenet")
    aux_heads: bool = setting(False, "GoogLeNet / Inception v3 only: train with their auxiliary heads")


_ADAPTER = LoRAOptions()  # the adapter defaults of lora_cls.adapters (one place for rank, dropout, init, ...)


@dataclass
class LoRAConfig:
    """The adapters: which layers, rank, scaling, initialisation; and the BatchNorm policy."""

    rank: int = setting(_ADAPTER.rank, "r, the rank of every adapter (per layer: rank_pattern)")
    alpha: float = setting("${.rank}", "s = alpha / rank; default: the rank (s = 1, kept constant across a rank "
                                       "sweep)")  # type: ignore[assignment]
    dropout: float = setting(_ADAPTER.dropout, "dropout on the adapter's input (training only)")
    rslora: bool = setting(_ADAPTER.rslora, "s = alpha / sqrt(rank) (rsLoRA)")
    init: str = setting(_ADAPTER.init, "kaiming | gaussian (A random, B = 0) | pissa (A, B: W's principal singular "
                                       "vectors) | olora (W's QR); pissa/olora freeze the residual W - s·B·A")
    dora: bool = setting(_ADAPTER.dora, "DoRA: each output channel of W + ΔW rescaled to a learned magnitude "
                                        "(needs schedule=none)")
    targets: list[str] | None = setting(None, "glob patterns over module names; null: the model's preset or the "
                                              "default rule (docs/models.md)")
    # Any, so that a command-line dict replaces the null
    rank_pattern: Any = setting(None, "per-layer ranks {glob: rank}, e.g. 'lora.rank_pattern={layer4.*: 16}' "
                                      "(the first glob matching a layer or a container above it)")
    bn: str = setting("train", "BatchNorm: train (running statistics update and are saved) | frozen (keep the "
                               "pretrained ones)")
    allow_high_rank: bool = setting(False, "allow a rank that reaches a layer's min(out, in·k·k), where LoRA is "
                                           "no longer low rank")
    fused: str = setting(_ADAPTER.fused, "auto | true | false: conv adapters in one convolution with the frozen "
                                         "one (same function; auto: where measured faster)")
    init_from: str | None = setting(None, "start the adapters, head and BatchNorm statistics from a PEFT LoRA "
                                          "folder; its layers, ranks, alpha, dora and rslora replace lora.*")


@dataclass
class OptimizerConfig:
    """The optimizer (fused AdamW or SGD) and its learning-rate schedule (linear warm-up, then cosine)."""

    name: str = setting("adamw", "adamw | sgd")
    lr: float | None = setting(None, "peak learning rate; null: the finetune mode's own (lr_lora, lr_full, "
                                     "lr_linear)")
    lr_lora: float = setting(5e-3, "finetune=lora's learning rate when lr is null (adapters start at zero change)")
    lr_full: float = setting(3e-4, "finetune=full's learning rate when lr is null")
    lr_linear: float = setting(1e-2, "finetune=linear's learning rate when lr is null")
    lora_b_lr_ratio: float = setting(1.0, "LoRA+: B's learning rate = lr × this (PEFT's loraplus_lr_ratio; 1: "
                                          "plain LoRA)")
    weight_decay: float = setting(1e-4, "decoupled weight decay (AdamW), L2 (SGD)")
    momentum: float = setting(0.9, "SGD only")
    nesterov: bool = setting(True, "SGD only")
    betas: list[float] = setting(help="AdamW only", factory=lambda: [0.9, 0.999])
    warmup_fraction: float = setting(0.05, "linear warm-up over this fraction of all steps, then cosine")
    min_lr_ratio: float = setting(0.01, "the cosine ends at lr × this")
    head_lr_scale: float = setting(1.0, "the new head's lr = lr × this (it starts from scratch, the adapters "
                                        "from zero change)")


@dataclass
class EarlyStoppingConfig:
    monitor: str = setting("val_accuracy", "val_accuracy | val_balanced_accuracy | val_macro_f1 | val_loss")
    patience: Any = setting("auto", "epochs without improvement before stopping, or auto: max(5, a quarter of the "
                                    "run's epochs); never before a decay reaches d_min")


@dataclass
class TrainerConfig:
    """How training runs: length, batch, device and precision, seeds, resume, and the recipe options."""

    epochs: Any = setting("auto", "training epochs, or auto: 10 epochs of at least min_steps / 10 steps (a small "
                                  "set is gone through again within an epoch); early stopping may end sooner")
    min_steps: int = setting(500, "epochs=auto: the fewest optimizer steps a run gets")
    batch_size: int = setting(32, "training batch (the global batch under torchrun)")
    eval_batch_size: int | None = setting(None, "evaluation batch; null: 2 × batch_size")
    precision: str = setting("auto", "auto (CUDA: bf16, or fp16 + GradScaler; CPU: bf16 where native) | 32 | "
                                     "bf16 | 16")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    channels_last: bool = setting(True, "model and batches in channels_last memory format")
    compile: bool = setting(False, "torch.compile the training step (docs/BENCHMARKS.md says where it pays)")
    compile_mode: str = setting("default", "torch.compile mode: default | reduce-overhead (CUDA graphs) | "
                                           "max-autotune | max-autotune-no-cudagraphs")
    num_workers: int = setting(2, "DataLoader workers when dataset.cache.enabled=false (0 when cached)")
    seed: int = setting(0, "seed of every RNG (and of the random base weights with model.weights=null)")
    deterministic: bool = setting(False, "remove run-to-run variation of the device's kernels (CUDA)")
    early_stopping: EarlyStoppingConfig = setting(help="early stopping", factory=EarlyStoppingConfig)
    max_steps_per_epoch: int | None = setting(None, "cap on optimizer steps per epoch (tests, quick looks)")
    resume: str = setting("auto", "auto (continue an interrupted run in hydra.run.dir) | never | <run folder or "
                                  "last.pt>")
    progress: bool = setting(True, "progress bars and console tables")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing (training loss only)")
    class_weights: str | None = setting(None, "null | balanced: loss weights N / (K · n_c) from the training "
                                              "split's class counts")
    ema: float = setting(0.0, "decay of an EMA of the trainable weights (e.g. 0.999), validated, saved and "
                              "evaluated instead; 0: off")


@dataclass
class CsvLoggerConfig:
    """history.csv, metrics.json and the reports of the run folder: always written, so nothing to set."""


@dataclass
class TensorBoardLoggerConfig:
    dir: str = setting("tensorboard", "event files; a relative path is inside the run folder")


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str | None = setting(None, "null: a local store in ./mlruns (sqlite file mlflow.db + "
                                             "artifacts/)")
    experiment: str = setting("lora-cls", "MLflow experiment name")
    run_name: str | None = setting(None, "null: the run folder's name (in a sweep: <sweep folder>/<job>)")


@dataclass
class LoggerConfig:
    """Experiment loggers beside the run folder (lora_cls/runs/tracking.py): `logger=[tensorboard,mlflow]`."""

    csv: CsvLoggerConfig | None = setting(help="the run folder alone (always written)", factory=CsvLoggerConfig)
    tensorboard: TensorBoardLoggerConfig | None = setting(None, "TensorBoard event files in the run folder")
    mlflow: MLflowLoggerConfig | None = setting(None, "an MLflow run per training run")


@dataclass
class CVConfig:
    """k-fold cross-validation (lora_cls/tasks/crossval.py): one run per fold on the train+val pool."""

    folds: int = setting(0, "k >= 2: train one model per fold of the train+val pool (stratified; patient-grouped "
                            "for malaria), each evaluated on its held-out fold and the fixed test split, into "
                            "fold_<k>/ run folders and a mean ± std summary; 0: one run, no cross-validation")
    fold: int | None = setting(None, "the fold a fold's own run holds out (set by the cross-validation; leave "
                                     "null)")


@dataclass
class TrainConfig:
    """The training config (lora-train). The YAML group options hold only what differs from these defaults; a key
    added later must default to the behaviour from before it existed: older checkpoints are read with it."""

    dataset: DatasetConfig = setting(help="the data", factory=DatasetConfig)
    model: ModelConfig = setting(help="the backbone", factory=ModelConfig)
    lora: LoRAConfig = setting(help="the adapters", factory=LoRAConfig)
    # the runtime object is its own schema (lora_cls/adapters/schedule.py holds its defaults and help)
    schedule: DecaySchedule = setting(help="the decay / noise schedule d(t)", factory=DecaySchedule)
    optimizer: OptimizerConfig = setting(help="the optimizer and LR schedule", factory=OptimizerConfig)
    trainer: TrainerConfig = setting(help="how training runs", factory=TrainerConfig)
    finetune: str = setting("lora", "lora | full (every parameter) | linear (the head only)")
    logger: LoggerConfig = setting(help="experiment loggers", factory=LoggerConfig)
    cv: CVConfig = setting(help="k-fold cross-validation", factory=CVConfig)


@dataclass
class EvalDatasetConfig:
    root: str | None = setting(None, "another copy of the data with the same classes; null: the run's split")
    name: str | None = setting(None, "its layout (folder | smoking | malaria); null: the run's (synthetic is read "
                                     "as folder)")
    skip_bad: bool | None = setting(None, "null: the training run's dataset.skip_bad")


@dataclass
class PeftBaseConfig:
    """The base model of a PEFT adapter folder (ckpt=<folder with adapter_config.json>) where the folder does not
    name it; a folder lora-export wrote names everything itself."""

    name: str | None = setting(None, "model name; null: the folder's base_model_name_or_path (torchvision/<name> or "
                                     "timm/<name>)")
    source: str | None = setting(None, "torchvision | timm; null: as base_model_name_or_path says")
    weights: str | None = setting("imagenet", "the base weights the adapter was trained on: imagenet | null "
                                              "(random, seeded by 0) | a state-dict path")
    image_size: int | None = setting(None, "input side S; null: 224")
    classes: list[str] | None = setting(None, "class names in logit order; null: 0, 1, ... (lora-eval: must match "
                                              "the data's)")


@dataclass
class EvalConfig:
    """lora-eval: a checkpoint on its run's split (or on other data)."""

    ckpt: str = setting(MISSING, "a lora-train run folder, its checkpoints/adapter.safetensors, or a PEFT LoRA "
                                 "folder")
    split: str = setting("test", "val | test | train | all (all needs dataset.root: every image of that folder)")
    dataset: EvalDatasetConfig = setting(help="other data to evaluate on", factory=EvalDatasetConfig)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str | None = setting(None, "null: the training run's precision")
    batch_size: int | None = setting(None, "null: the training run's eval batch size")
    tta: str = setting("none", "test-time augmentation: none | flip (the mean of the image's and its mirror's "
                               "probabilities)")
    calibrate: bool = setting(False, "probabilities at the run's fitted temperature, softmax(logits / T) (accuracy "
                                     "unchanged); false: the model's own, as training reported them")
    explain: bool | None = setting(None, "errors.png shows a Grad-CAM overlay on each mistake; null: when the "
                                         "grad-cam package is installed")
    explain_layer: str | None = setting(None, "the layer Grad-CAM looks at; null: the model family's last "
                                              "convolutional stage (docs/evaluation.md)")
    progress: bool = setting(True, "progress bars and console tables")
    base: PeftBaseConfig = setting(help="a PEFT folder's base model", factory=PeftBaseConfig)


@dataclass
class PredictConfig:
    """lora-predict: class predictions for new images."""

    ckpt: str = setting(MISSING, "a lora-train run folder, its checkpoints/adapter.safetensors, or a PEFT LoRA "
                                 "folder")
    input: str | None = setting(None, "an image, a folder (searched recursively) or a quoted glob such as "
                                      "'photos/*.jpg'")
    split: str | None = setting(None, "instead of input: train | val | test of the run's own splits.json")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    precision: str | None = setting(None, "null: the training run's precision")
    batch_size: int | None = setting(None, "null: the training run's eval batch size")
    skip_bad: bool = setting(False, "skip undecodable inputs (listed in predict.json) instead of stopping")
    tta: str = setting("none", "test-time augmentation: none | flip (the mean of the image's and its mirror's "
                               "probabilities)")
    calibrate: bool = setting(False, "probabilities at the run's fitted temperature, softmax(logits / T) (the "
                                     "predicted class is the same)")
    explain: bool = setting(False, "also write a Grad-CAM heatmap PNG per image into explain/ (pip install "
                                   "'lora-cls[explain]')")
    explain_layer: str | None = setting(None, "the layer Grad-CAM looks at; null: the model family's last "
                                              "convolutional stage (docs/evaluation.md)")
    show: int = setting(20, "rows of the console table; predictions.csv has them all")
    base: PeftBaseConfig = setting(help="a PEFT folder's base model", factory=PeftBaseConfig)
    progress: bool = setting(True, "progress bars")


@dataclass
class ExportConfig:
    """lora-export: a trained run as a model that runs without lora-cls, verified against it."""

    ckpt: str = setting(MISSING, "a lora-train run folder, its checkpoints/adapter.safetensors, or a PEFT LoRA "
                                 "folder")
    format: str = setting("torchvision", "torchvision | lowrank | onnx | torchscript | peft (a PEFT LoRA folder)")
    lowrank: bool = setting(False, "onnx/torchscript: the low-rank model (needs d = 0) instead of the merged one")
    tolerance: float = setting(1e-4, "max |logit difference| allowed against the trained model, × max(1, the "
                                     "largest |logit|)")
    images: int = setting(16, "test images of the run's splits.json the export is verified on")
    opset: int = setting(17, "ONNX opset")
    base: PeftBaseConfig = setting(help="a PEFT folder's base model", factory=PeftBaseConfig)


@dataclass
class DataCheckConfig:
    """lora-data check: what a dataset holds and what would spoil a run."""

    dataset: DatasetConfig = setting(help="the dataset, as lora-train reads it", factory=DatasetConfig)
    splits: str | None = setting(None, "a run folder or its splits.json: check the split that run used instead")
    patients: bool | None = setting(None, "patient-overlap check; null: on for dataset=malaria and for NIH-style "
                                          "names (*_IMG_*)")
    show: int = setting(20, "rows per problem table on the console (datacheck.json lists everything)")
    progress: bool = setting(True, "progress bars")


