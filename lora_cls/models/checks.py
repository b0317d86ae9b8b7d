"""The meta-device checks of a config: model name, input size, targets, per-layer ranks, the rank limit and the smallest training batch, all without weights or memory."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lora_cls.errors import UserError
from lora_cls.models.registry import (
    SIZE_CANDIDATES,
    _meta_model,
    _resolved_targets,
    default_target_names,
    model_spec,
    on_meta,
)


def check_model(model_cfg, image_size: int) -> None:
    """model.source, model.name, model.aux_heads and the input size (UserErrors naming their keys)."""
    spec = model_spec(model_cfg.name, model_cfg.source)
    if model_cfg.aux_heads and not spec.aux:
        raise UserError(f"model.aux_heads: {model_cfg.name} has no auxiliary heads (GoogLeNet and Inception v3 do)")
    check_image_size(model_cfg.source, model_cfg.name, int(image_size))


def check_targets(name: str, patterns: Sequence[str], source: str = "torchvision", aux: bool = False) -> list[str]:
    """Resolve target patterns on a weightless copy of the model (meta device: no memory, no weights, fast),
    so a bad `lora.targets` fails with the config checks, before any data or run folder is made."""
    return list(_resolved_targets(name, tuple(patterns), source, aux))


def check_adapters(name: str, patterns: Sequence[str] | None, rank: int, rank_pattern: Mapping[str, int] | None,
                   source: str = "torchvision", aux: bool = False) -> list[str]:
    """Targets (the default rule when None) and per-layer ranks checked on the meta device; the adapted names."""
    from lora_cls.adapters.inject import layer_ranks

    spec = model_spec(name, source)
    names = (list(_resolved_targets(name, tuple(patterns), source, aux)) if patterns
             else default_target_names(spec, rank, rank_pattern))
    layer_ranks(_meta_model(spec), names, rank, rank_pattern)
    return names


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


@functools.lru_cache(maxsize=512)
def runs_at(source: str, name: str, size: int) -> str | None:
    """None when the model builds and runs on a size×size input, else why not (shapes only, meta device)."""
    spec = model_spec(name, source)
    try:
        model = on_meta(lambda: spec.build(size, aux=False)).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def check_image_size(source: str, name: str, size: int) -> None:
    """A UserError (key dataset.image_size) naming sizes that work when the model cannot run at `size`."""
    why = runs_at(source, name, size)
    if why is None:
        return
    working = [s for s in SIZE_CANDIDATES if runs_at(source, name, s) is None]
    hint = f"sizes that work include {', '.join(map(str, working[:6]))}" if working else "no tried size works"
    raise UserError(f"dataset.image_size: {name} does not run on {size}x{size} images ({why}); {hint}")
