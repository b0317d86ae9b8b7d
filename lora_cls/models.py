"""Backbones by name, their weights and new head, fine-tune modes, BatchNorm policy and the parameter report.

Adding another torchvision classifier is one `MODELS` entry: its builder, its ImageNet weights, the qualified
name of its final Linear (replaced by the new head) and its preset LoRA targets. The rank is `lora.rank` for
every model (the seeds' VGG16 rank 5 is set by `experiment=malaria_vgg16`).
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from lora_cls.errors import UserError
from lora_cls.inject import inject_lora, select_targets
from lora_cls.lora import DECAY_ATTR, LoRALayer

FINETUNE_MODES = ("lora", "full", "linear")
BN_POLICIES = ("train", "frozen")
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    head: str
    targets: tuple[str, ...]


MODELS: dict[str, ModelSpec] = {
    # The seeds: conv1/conv2 of every residual block in layer3 and layer4 at rank 8 (464,898 trainable, 2.14%).
    "resnet34": ModelSpec(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, "fc",
                          ("layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2")),
    # The seeds: the three block5 convolutions at rank 5, head Linear(4096, 2) (84,994 trainable).
    "vgg16": ModelSpec(tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, "classifier.6",
                       ("features.24", "features.26", "features.28")),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def imagenet_cache_path(name: str) -> Path:
    """Where torchvision looks for (and caches) this model's ImageNet weights."""
    url = model_spec(name).weights.url
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
    url = model_spec(name).weights.url
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


def load_base_weights(model: nn.Module, name: str, weights: str | None) -> None:
    """Load `imagenet`, a state-dict path, or nothing (None/'null': random init) into the unmodified model.

    A state dict must fit the model except, possibly, its classification head (which is replaced anyway).
    """
    if weights is None or str(weights).lower() in ("null", "none", "random"):
        return
    state = _imagenet_state_dict(name) if weights == "imagenet" else _read_state_dict(Path(weights).expanduser())
    head = model_spec(name).head
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # State dicts saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked; torch's own loader accepts
    # them too (the counter only matters for momentum=None).
    missing = [k for k in own if k not in state and not k.startswith(head + ".")
               and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape and not k.startswith(head + ".")]
    if missing or unexpected or mismatched:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"wrong shape {len(mismatched)} (e.g. {', '.join(mismatched[:3])})" if mismatched else ""]))
        raise UserError(f"model.weights={weights} does not fit {name}: {detail}")
    state = {k: v for k, v in state.items() if not (k.startswith(head + ".") and v.shape != own[k].shape)}
    model.load_state_dict(state, strict=False)


def replace_head(model: nn.Module, head: str, num_classes: int) -> nn.Linear:
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"head {head} of the registry entry is {type(old).__name__}, not Linear")
    new = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def build_model(name: str, weights: str | None, num_classes: int) -> nn.Module:
    """The named torchvision classifier with `weights` loaded and a new Linear head for `num_classes`."""
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    spec = model_spec(name)
    model = spec.builder(weights=None)
    load_base_weights(model, name, weights)
    replace_head(model, spec.head, num_classes)
    return model


def check_targets(name: str, patterns: Sequence[str]) -> list[str]:
    """Resolve target patterns on a weightless copy of the model (meta device: no memory, no weights, fast),
    so a bad `lora.targets` fails with the config checks, before any data or run folder is made."""
    return list(_resolved_targets(name, tuple(patterns)))


@functools.lru_cache(maxsize=64)  # a sweep's precheck validates every job's config: one model build per value
def _resolved_targets(name: str, patterns: tuple[str, ...]) -> tuple[str, ...]:
    spec = model_spec(name)
    with torch.device("meta"):
        model = spec.builder(weights=None)
    return tuple(select_targets(model, list(patterns), exclude=[spec.head]))


def prepare_finetune(model: nn.Module, name: str, finetune: str, targets: Sequence[str] | None = None,
                     rank: int = 8, alpha: float | None = None, **lora_options) -> list[str]:
    """Set up `finetune` mode in place; return the names of the adapted layers (empty unless lora).

    lora: adapters on `targets` (the model's preset when None); trainable = adapters (A, B, C) and head.
    full: every parameter trainable. linear: only the head trainable (linear probe).
    """
    if finetune not in FINETUNE_MODES:
        raise UserError(f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {finetune!r}")
    spec = model_spec(name)
    adapted: list[str] = []
    if finetune == "full":
        model.requires_grad_(True)
        return adapted
    if finetune == "lora":
        alpha = float(rank) if alpha is None else alpha
        adapted = inject_lora(model, list(targets) if targets else list(spec.targets), rank, alpha,
                              exclude=[spec.head], **lora_options)
    model.requires_grad_(False)
    model.get_submodule(spec.head).requires_grad_(True)
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
