"""Backbones by name, their weights and new head, fine-tune modes, BatchNorm policy and the parameter report.

Any torchvision classifier (and, with the timm extra, any timm model) is built by name (zoo.py: builder, head,
auxiliary heads, input sizes, the default-target rule). `PRESETS` keeps the seeds' explicit LoRA targets; every
other model gets the default rule. The rank is `lora.rank` for every model (the seeds' VGG16 rank 5 is set by
`experiment=malaria_vgg16`), or per layer with `lora.rank_pattern`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lora_cls.adapters.inject import inject_lora
from lora_cls.adapters.layer import DECAY_ATTR, LoRALayer
from lora_cls.adapters.options import LoRAOptions
from lora_cls.errors import UserError
from lora_cls.models.registry import default_target_names, model_heads, model_spec

log = logging.getLogger(__name__)
FINETUNE_MODES = ("lora", "full", "linear")
BN_POLICIES = ("train", "frozen")


def prepare_finetune(model: nn.Module, name: str, finetune: str, targets: Sequence[str] | None = None,
                     rank: int = 8, alpha: float | None = None, *, options: LoRAOptions | None = None,
                     source: str = "torchvision", aux: bool = False, rank_pattern: Mapping[str, int] | None = None,
                     **fields) -> list[str]:
    """Set up `finetune` mode in place; return the names of the adapted layers (empty unless lora).

    lora: adapters on `targets` (the preset or default rule when None), with `options` (or LoRAOptions(rank,
    alpha, **fields)), ranks by `rank_pattern`; trainable = adapters (A, B, C) and heads. full: every parameter
    trainable. linear: only the heads (linear probe).
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
        if options is None:
            options = LoRAOptions(rank=rank, alpha=float(rank) if alpha is None else alpha, **fields)
        names = None if targets else default_target_names(spec, options.rank, rank_pattern)
        adapted = inject_lora(model, list(targets or ()), exclude=model_heads(spec, True), rank_pattern=rank_pattern,
                              names=names, options=options)
    model.requires_grad_(False)
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for p in (module.lora_A, module.lora_B, module.lora_C, module.lora_magnitude):
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
    """What an adapter file holds, copied to the CPU: every trainable tensor, the decay factor, the starting factors
    A0, B0 of a pissa/olora init (what rebuilds the frozen residual), and the BatchNorm buffers when they train
    (bn="train")."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = p
    for mod_name, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if (is_bn and bn == "train") or mod_name.endswith(DECAY_ATTR) or isinstance(module, LoRALayer):
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


