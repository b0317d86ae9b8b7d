"""Backbones by name, their weights and new head, fine-tune modes, BatchNorm policy and the parameter report.

Any torchvision classifier (and, with the timm extra, any timm model) is built by name (zoo.py: builder, head,
auxiliary heads, input sizes, the default-target rule). `PRESETS` keeps the seeds' explicit LoRA targets; every
other model gets the default rule. The rank is `lora.rank` for every model (the seeds' VGG16 rank 5 is set by
`experiment=malaria_vgg16`), or per layer with `lora.rank_pattern`.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_cls import zoo
from lora_cls.errors import UserError
from lora_cls.inject import inject_lora, select_targets
from lora_cls.lora import DECAY_ATTR, LoRALayer

log = logging.getLogger(__name__)
FINETUNE_MODES = ("lora", "full", "linear")
BN_POLICIES = ("train", "frozen")
DOWNLOAD_TIMEOUT_S = 30
AUX_LOSS_WEIGHT = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}  # torchvision's reference recipes

PRESETS: dict[str, tuple[str, ...]] = {
    # The seeds: conv1/conv2 of every residual block in layer3 and layer4 at rank 8 (464,898 trainable, 2.14%).
    "resnet34": ("layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2"),
    # The seeds: the three block5 convolutions at rank 5, head Linear(4096, 2) (84,994 trainable).
    "vgg16": ("features.24", "features.26", "features.28"),
}


@dataclass(frozen=True)
class ModelSpec:
    """builder(weights=None, image_size=224, aux=False): the model with random weights and its original head;
    targets: the preset, or the default rule's layers at rank 8 (`default_target_names` for other ranks)."""

    builder: Callable[..., nn.Module]
    weights_url: str | None
    head: str
    targets: tuple[str, ...]
    aux: tuple[str, ...] = ()
    source: str = "torchvision"
    name: str = ""


@functools.lru_cache(maxsize=256)
def model_spec(name: str, source: str = "torchvision") -> ModelSpec:
    """The named model's spec; a UserError naming close matches for an unknown name."""
    c = zoo.classifier(source, name)

    def builder(weights=None, image_size: int = zoo.REFERENCE_SIZE, aux: bool = False) -> nn.Module:
        if torch.get_default_device().type == "meta":  # a caller's `with torch.device("meta")`: shapes only
            with torch.device("cpu"):
                return zoo.on_meta(lambda: c.build(image_size, aux))
        return c.build(image_size, aux)

    preset = PRESETS.get(name) if source == "torchvision" else None
    spec = ModelSpec(builder, c.weights_url, c.head, preset or (), c.aux, source, name)
    if preset is None:
        spec = ModelSpec(builder, c.weights_url, c.head, tuple(default_target_names(spec, 8)), c.aux, source, name)
    return spec


def default_target_names(spec: ModelSpec, rank: int, rank_pattern: Mapping[str, int] | None = None) -> list[str]:
    """The preset, or the default rule's layers (zoo.default_targets) at this rank."""
    if spec.source == "torchvision" and spec.name in PRESETS:
        return list(_resolved_targets(spec.name, PRESETS[spec.name]))
    return _default_targets(spec, int(rank), tuple(sorted((rank_pattern or {}).items())))


@functools.lru_cache(maxsize=256)
def _default_targets(spec: ModelSpec, rank: int, rank_pattern: tuple) -> list[str]:
    model = zoo.on_meta(lambda: spec.builder())
    return zoo.default_targets(model, (spec.head, *spec.aux), rank, dict(rank_pattern))


def imagenet_cache_path(name: str) -> Path:
    """Where torchvision looks for (and caches) this model's ImageNet weights."""
    url = model_spec(name).weights_url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _download_imagenet(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    url = model_spec(name).weights_url
    path = imagenet_cache_path(name)
    if not path.exists():
        try:
            _download_imagenet(url, path)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise UserError(
                f"ImageNet weights for {name} are not cached and could not be downloaded ({exc}). "
                f"Download {url} on a machine with network access and place it at {path} "
                f"(or set TORCH_HOME), or pass model.weights=<path to a state dict>, or model.weights=null "
                "for random initialisation") from None
    return _read_state_dict(path)


def _timm_pretrained(spec: ModelSpec, model: nn.Module) -> None:
    """timm's pretrained weights from the Hugging Face hub cache (downloaded if the hub can be reached)."""
    import timm.models

    try:
        timm.models.load_pretrained(model, num_classes=model.pretrained_cfg.get("num_classes", 1000))
    except Exception as exc:  # offline, or no weights for this name: the user's to supply
        raise UserError(
            f"timm weights for {spec.name} are not cached and could not be downloaded ({type(exc).__name__}). "
            f"Download https://huggingface.co/{spec.weights_url}/resolve/main/model.safetensors on a machine with "
            f"network access into the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface), or pass "
            "model.weights=<path to that file>, or model.weights=null for random initialisation") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"model.weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix, not a crash
        raise UserError(f"model.weights file {path} is not a readable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights file {path} does not hold a state dict of tensors")
    return state


def _fit_to_model(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position embeddings of a ViT built for another size, interpolated (torchvision / timm's own filter)."""
    if spec.source == "timm":
        fit = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        return fit(state, model) if fit is not None else state
    own = model.state_dict()
    key = "encoder.pos_embedding"
    if key in state and key in own and state[key].shape != own[key].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        log.info("model.weights: position embeddings interpolated from %s to %s", tuple(state[key].shape),
                 tuple(own[key].shape))
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    return state


def load_base_weights(model: nn.Module, name: str, weights: str | None, source: str = "torchvision") -> None:
    """Load `imagenet`, a state-dict path, or nothing (None/'null': random init) into the unmodified model.

    A state dict must fit the model except, possibly, its classification heads (which are replaced anyway; a
    head of another shape is skipped, and the log says so).
    """
    if weights is None or str(weights).lower() in ("null", "none", "random"):
        return
    spec = model_spec(name, source)
    if weights == "imagenet" and source == "timm":
        _timm_pretrained(spec, model)
        return
    state = _imagenet_state_dict(name) if weights == "imagenet" else _read_state_dict(Path(weights).expanduser())
    state = _fit_to_model(model, spec, {k.removeprefix("module."): v for k, v in state.items()})
    heads = tuple(h + "." for h in (spec.head, *spec.aux))
    own = model.state_dict()
    # State dicts saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked; torch's own loader accepts
    # them too (the counter only matters for momentum=None).
    missing = [k for k in own if k not in state and not k.startswith(heads) and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape and not k.startswith(heads)]
    if missing or unexpected or mismatched:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"wrong shape {len(mismatched)} (e.g. {', '.join(mismatched[:3])})" if mismatched else ""]))
        raise UserError(f"model.weights={weights} does not fit {name}: {detail}")
    skipped = [k for k, v in state.items() if k.startswith(heads) and v.shape != own[k].shape]
    if skipped:
        log.info("model.weights: head not loaded (%s in the file has another class count: %s); the new head "
                 "starts from random", ", ".join(skipped), ", ".join(str(tuple(state[k].shape)) for k in skipped))
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)


def replace_head(model: nn.Module, head: str, num_classes: int) -> nn.Module:
    """A new trainable head for `num_classes`: a Linear for a Linear, a 1x1 Conv2d for SqueezeNet's conv head."""
    old = model.get_submodule(head)
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, **factory)
    elif isinstance(old, nn.Conv2d) and tuple(old.kernel_size) == (1, 1):
        new = nn.Conv2d(old.in_channels, num_classes, 1, **factory)
    else:
        raise TypeError(f"head {head} is {type(old).__name__}, not a Linear or 1x1 Conv2d")
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def build_model(name: str, weights: str | None, num_classes: int, *, source: str = "torchvision",
                image_size: int = zoo.REFERENCE_SIZE, aux: bool = False) -> nn.Module:
    """The named classifier with `weights` loaded and new heads for `num_classes` (auxiliary heads of GoogLeNet
    and Inception v3 kept, with new heads, only when `aux`). ViTs and MaxViT are built for `image_size`."""
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    spec = model_spec(name, source)
    model = spec.builder(image_size=image_size, aux=True)  # aux heads are in the weight files
    load_base_weights(model, name, weights, source)
    if weights == "imagenet" and hasattr(model, "transform_input"):
        model.transform_input = True  # torchvision's GoogLeNet/Inception weights expect their own input scaling
    if spec.aux and not aux and source == "torchvision":
        zoo.drop_aux_heads(model, zoo.AUX_HEADS[name])
    for head in (spec.head, *(spec.aux if aux else ())):
        replace_head(model, head, num_classes)
    return model


def check_model(model_cfg, image_size: int) -> None:
    """model.source, model.name, model.aux_heads and the input size (UserErrors naming their keys)."""
    spec = model_spec(model_cfg.name, model_cfg.source)
    if model_cfg.aux_heads and not spec.aux:
        raise UserError(f"model.aux_heads: {model_cfg.name} has no auxiliary heads (GoogLeNet and Inception v3 do)")
    zoo.check_image_size(model_cfg.source, model_cfg.name, int(image_size))


def model_heads(spec: ModelSpec, aux: bool) -> list[str]:
    """The heads that are trained in full (and never adapted)."""
    return [spec.head, *(spec.aux if aux else ())]


def loss_and_logits(outputs, y: torch.Tensor, class_weight: torch.Tensor | None = None,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and plain logits of a model's output: a tensor, or GoogLeNet/Inception's (logits, aux...)
    tuple while training with auxiliary heads (loss = main + w·Σ aux, w = 0.3 GoogLeNet, 0.4 Inception v3).
    `class_weight` (K,) and `label_smoothing` are those of F.cross_entropy (a weighted mean over the batch)."""
    import torch.nn.functional as F

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=label_smoothing)

    logits = plain_logits(outputs)
    loss = ce(logits)
    if isinstance(outputs, tuple):
        weight = AUX_LOSS_WEIGHT.get(type(outputs).__name__, 0.3)
        for aux in outputs[1:]:
            if isinstance(aux, torch.Tensor):
                loss = loss + weight * ce(aux)
    return loss, logits


def plain_logits(outputs) -> torch.Tensor:
    """The main logits of a model's output (the first element of an auxiliary-heads tuple)."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def check_targets(name: str, patterns: Sequence[str], source: str = "torchvision", aux: bool = False) -> list[str]:
    """Resolve target patterns on a weightless copy of the model (meta device: no memory, no weights, fast),
    so a bad `lora.targets` fails with the config checks, before any data or run folder is made."""
    return list(_resolved_targets(name, tuple(patterns), source, aux))


def check_adapters(name: str, patterns: Sequence[str] | None, rank: int, rank_pattern: Mapping[str, int] | None,
                   source: str = "torchvision", aux: bool = False) -> list[str]:
    """Targets (the default rule when None) and per-layer ranks checked on the meta device; the adapted names."""
    from lora_cls.inject import layer_ranks

    spec = model_spec(name, source)
    names = (list(_resolved_targets(name, tuple(patterns), source, aux)) if patterns
             else default_target_names(spec, rank, rank_pattern))
    layer_ranks(_meta_model(spec), names, rank, rank_pattern)
    return names


@functools.lru_cache(maxsize=8)
def _meta_model(spec: ModelSpec) -> nn.Module:
    return zoo.on_meta(lambda: spec.builder(aux=True))


@functools.lru_cache(maxsize=64)  # a sweep's precheck validates every job's config: one model build per value
def _resolved_targets(name: str, patterns: tuple[str, ...], source: str = "torchvision",
                      aux: bool = False) -> tuple[str, ...]:
    spec = model_spec(name, source)
    return tuple(select_targets(_meta_model(spec), list(patterns), exclude=model_heads(spec, True)))


def full_rank_layers(name: str, patterns: Sequence[str] | None, rank: int,
                     source: str = "torchvision") -> list[tuple[str, int]]:
    """The adapted layers (the preset's when `patterns` is None) whose rank limit min(out, in·k·k) `rank`
    reaches: there an adapter is no longer low rank and trains more parameters than the layer holds."""
    targets = tuple(patterns or model_spec(name, source).targets)
    return [(layer, limit) for layer, limit in _rank_limits(name, targets, source) if rank >= limit]


@functools.lru_cache(maxsize=64)
def _rank_limits(name: str, patterns: tuple[str, ...], source: str = "torchvision") -> tuple[tuple[str, int], ...]:
    spec = model_spec(name, source)
    with torch.device("meta"):
        model = spec.builder(weights=None)
    limits = []
    for layer in _resolved_targets(name, patterns, source):
        module = model.get_submodule(layer)
        # (out, in/groups, k, k) or (out, in); nn.MultiheadAttention: the packed (3E, E) in-projection
        weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        limits.append((layer, min(weight.shape[0], weight[0].numel())))
    return tuple(limits)


@functools.lru_cache(maxsize=64)
def min_train_batch(name: str, image_size: int, source: str = "torchvision") -> int:
    """The smallest training batch this model takes at `image_size` with BatchNorm in training mode: 2 when some
    BatchNorm sees 1×1 maps (one value per channel is no batch statistic), else 1. A weightless forward on the
    meta device: no memory, no weights."""
    with torch.device("meta"):
        model = model_spec(name, source).builder(weights=None, image_size=image_size).train()
        try:
            model(torch.empty(1, 3, image_size, image_size))
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            return 2
    return 1


def prepare_finetune(model: nn.Module, name: str, finetune: str, targets: Sequence[str] | None = None,
                     rank: int = 8, alpha: float | None = None, *, source: str = "torchvision", aux: bool = False,
                     rank_pattern: Mapping[str, int] | None = None, **lora_options) -> list[str]:
    """Set up `finetune` mode in place; return the names of the adapted layers (empty unless lora).

    lora: adapters on `targets` (the preset or default rule when None), ranks by `rank_pattern`; trainable =
    adapters (A, B, C) and heads. full: every parameter trainable. linear: only the heads (linear probe).
    """
    if finetune not in FINETUNE_MODES:
        raise UserError(f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {finetune!r}")
    spec = model_spec(name, source)
    heads = model_heads(spec, aux)
    adapted: list[str] = []
    if finetune == "full":
        model.requires_grad_(True)
        return adapted
    if finetune == "lora":
        alpha = float(rank) if alpha is None else alpha
        names = None if targets else default_target_names(spec, rank, rank_pattern)
        adapted = inject_lora(model, list(targets or ()), rank, alpha, exclude=model_heads(spec, True),
                              rank_pattern=rank_pattern, names=names, **lora_options)
    model.requires_grad_(False)
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for p in (module.lora_A, module.lora_B, module.lora_C):
                if p is not None:
                    p.requires_grad_(True)
    return adapted


def set_train_mode(model: nn.Module, training: bool, bn: str = "train") -> None:
    """model.train(training), except that bn='frozen' keeps BatchNorm on its pretrained running statistics."""
    if bn not in BN_POLICIES:
        raise UserError(f"lora.bn must be one of {', '.join(BN_POLICIES)}; got {bn!r}")
    model.train(training)
    if training and bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def trainable_state(model: nn.Module, bn: str) -> dict[str, torch.Tensor]:
    """What an adapter file holds, copied to the CPU: every trainable tensor, the decay factor, and the BatchNorm
    buffers when they train (bn="train")."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = p
    for mod_name, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if (is_bn and bn == "train") or mod_name.endswith(DECAY_ATTR):
            for buf_name, buf in module.named_buffers(recurse=False):
                state[f"{mod_name}.{buf_name}"] = buf
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def parameter_report(model: nn.Module) -> dict:
    """Total / trainable parameter counts overall and per top-level block (feeds metrics.json `params`)."""
    def counts(module: nn.Module) -> tuple[int, int]:
        params = list(module.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    total, trainable = counts(model)
    blocks = {}
    for name, child in model.named_children():
        t, tr = counts(child)
        if t:
            blocks[name] = {"total": t, "trainable": tr}
    return {"total": total, "trainable": trainable,
            "trainable_pct": round(100.0 * trainable / total, 4) if total else 0.0, "blocks": blocks}


def print_parameter_report(report: dict, title: str = "Parameters", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("block")
    table.add_column("total", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("trainable %", justify="right")
    for name, c in report["blocks"].items():
        pct = 100.0 * c["trainable"] / c["total"] if c["total"] else 0.0
        table.add_row(name, f"{c['total']:,}", f"{c['trainable']:,}", f"{pct:.2f}")
    table.add_section()
    table.add_row("all", f"{report['total']:,}", f"{report['trainable']:,}", f"{report['trainable_pct']:.2f}",
                  style="bold")
    (console or Console()).print(table)
