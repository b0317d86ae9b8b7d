"""The optimizer and the learning-rate schedule of a run (docs/DESIGN.md §4): fused AdamW/SGD over the trainable
parameters, an optional separate learning rate for the new head, linear warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from lora_cls.adapters.layer import track_optimizer
from lora_cls.errors import UserError


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9, nesterov: bool = True,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """`params`: parameters, or param groups (dicts with "params" and optionally their own "lr"); those that
    require no gradient are left out."""
    params = _trainable_groups(params)
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    # Fused kernels (CUDA, and CPU on torch >= 2.4: an AdamW step over ResNet34's 21.8M parameters drops from
    # 73 to 13 ms, docs/BENCHMARKS.md); foreach (one multi-tensor op per step) where fusing is unsupported.
    fuse = device is not None and device.type in ("cuda", "cpu")
    if name == "adamw":
        make = lambda **kind: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,  # noqa: E731
                                                betas=tuple(betas), **kind)
    elif name == "sgd":
        make = lambda **kind: torch.optim.SGD(params, lr=lr, momentum=momentum,  # noqa: E731
                                              nesterov=nesterov and momentum > 0, weight_decay=weight_decay, **kind)
    else:
        raise UserError(f"optimizer.name must be adamw or sgd; got {name!r}")
    if fuse:
        try:
            return track_optimizer(make(fused=True))
        except (RuntimeError, TypeError, ValueError):
            pass
    return track_optimizer(make(foreach=True))


def _trainable_groups(params: Iterable) -> list:
    items = list(params)
    if not items or not isinstance(items[0], dict):
        return [p for p in items if p.requires_grad]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [g for g in groups if g["params"]]


def param_groups(model: nn.Module, heads: Sequence[str], lr: float, head_lr_scale: float = 1.0,
                 lora_b_lr_ratio: float = 1.0) -> list[dict]:
    """Param groups at their learning rates: the heads' parameters at lr × head_lr_scale, every adapter's B at
    lr × lora_b_lr_ratio (LoRA+, Hayou et al. 2024: PEFT's `create_loraplus_optimizer` with `loraplus_lr_ratio`),
    DoRA's magnitudes at lr without weight decay (m is a scale starting at ‖W‖, not a change starting at 0: decay
    would shrink the pretrained layer), every other one at lr. With both factors 1 and no DoRA, one group in the
    model's parameter order, as before the options existed (so older last.pt optimizer states load); otherwise the
    groups base, heads, B, magnitudes (empty ones are dropped by build_optimizer)."""
    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    named = list(model.named_parameters())
    magnitude = [p for n, p in named if n.rsplit(".", 1)[-1] == "lora_magnitude"]
    if head_lr_scale == 1.0 and lora_b_lr_ratio == 1.0 and not magnitude:
        return [{"params": [p for _, p in named], "lr": lr}]
    head = [p for n, p in named if in_head(n)]
    b = [p for n, p in named if not in_head(n) and n.rsplit(".", 1)[-1] == "lora_B"]
    chosen = {id(p) for p in head + b + magnitude}
    return [{"params": [p for _, p in named if id(p) not in chosen], "lr": lr},
            {"params": head, "lr": lr * head_lr_scale}, {"params": b, "lr": lr * lora_b_lr_ratio},
            {"params": magnitude, "lr": lr, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over round(warmup_fraction·T) steps, then cosine down to min_lr_ratio."""
    warmup = round(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
