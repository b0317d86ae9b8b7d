"""Adapters in a whole model: which layers get one (target patterns), putting them in, the shared decay factor d,
and taking them out again as plain layers (`merge_lora`, `export_low_rank`). The layers themselves are lora.py.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from lora_cls.adapters.attention import LoRAMultiheadAttention, make_weight_aware
from lora_cls.adapters.layer import (
    DECAY_ATTR,
    DecayState,
    LoRAConv2d,
    LoRALayer,
    adapter_class,
    is_depthwise,
    rank_for_groups,
)
from lora_cls.adapters.options import LoRAOptions
from lora_cls.errors import UserError

# -- target selection -----------------------------------------------------------------------------------
# A unit is what one target adapts: a Conv2d (plain or grouped), a Linear (subclasses included), or a whole
# nn.MultiheadAttention (its out_proj is read as a weight by the attention kernel, so it is not a unit alone).
# Depthwise convolutions are never units: an adapter there would have more parameters than the layer.


def layer_kind(module: nn.Module) -> str | None:
    """"conv", "grouped", "depthwise", "linear", "attention" (nn.MultiheadAttention), or None (not adaptable)."""
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    adapter = adapter_class(module)
    if adapter is LoRAConv2d:
        return "depthwise" if is_depthwise(module) else ("grouped" if module.groups > 1 else "conv")
    return "linear" if adapter is not None else None


def adaptable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, str]:
    """{qualified name: kind} of every unit LoRA can adapt, in model order, minus `exclude` and their insides."""
    excluded = tuple(exclude)
    inside = [n for n, m in model.named_modules() if isinstance(m, (nn.MultiheadAttention, LoRAMultiheadAttention))]
    found = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind in (None, "depthwise") or _under(name, excluded) or any(name.startswith(p + ".") for p in inside):
            continue
        found[name] = kind
    return found


def supported_layer_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Qualified names of every unit LoRA can adapt (see `adaptable_layers`), minus `exclude`."""
    return list(adaptable_layers(model, exclude))


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _nearby(pattern: str, names: Sequence[str], n: int = 6) -> str:
    probe = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(probe, names, n=n, cutoff=0.4)
    if not close:
        head = pattern.split(".")[0]
        close = [x for x in names if x.split(".")[0] == head][:n] or list(names[:n])
    return ", ".join(close)


def _pointwise_beside(model: nn.Module, name: str, valid: Sequence[str]) -> str:
    """The 1x1 convolutions of the block around a depthwise convolution (the layers to adapt instead)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth]) + "."
        near = [n for n in valid if n.startswith(prefix) and isinstance(m := model.get_submodule(n), nn.Conv2d)
                and tuple(m.kernel_size) == (1, 1)]
        if near:
            return ", ".join(near[:4])
    return _nearby(name, valid)


def select_targets(model: nn.Module, patterns: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """Resolve glob patterns over qualified module names to the units to adapt, in model order.

    A pattern naming a container selects every adaptable unit inside it (depthwise convolutions are skipped);
    of a pattern's matches only the top-most are expanded, so `layer3.*` means the blocks of layer3 and
    everything in them. A pattern that selects nothing, that names an unsupported module, a depthwise
    convolution, a projection inside nn.MultiheadAttention, or an excluded module (the new head) is a UserError
    naming the pattern and what to target instead.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UserError("lora.targets is empty; name at least one layer pattern (e.g. 'layer4.*.conv1')")
    excluded = list(exclude)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    units = adaptable_layers(model, excluded)
    valid = list(units)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatchcase(n, pattern)]
        top = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
        if not top:
            raise UserError(f"target pattern {pattern!r} matches no module; nearby valid names: "
                            f"{_nearby(pattern, valid)}")
        # A wildcard pattern passes over the depthwise convolutions it meets; one that selects only those, or
        # names one exactly, is refused.
        wildcard = any(c in pattern for c in "*?[")
        found = [n for name in top for n in _expand(model, pattern, name, units, excluded, valid, wildcard)]
        if not found:
            _expand(model, pattern, top[0], units, excluded, valid, False)
        chosen.update(found)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def _expand(model: nn.Module, pattern: str, name: str, units: dict[str, str], excluded: list[str],
            valid: list[str], wildcard: bool = False) -> list[str]:
    """The units a matched module stands for (itself, or those inside it), or a UserError saying why none."""
    module = model.get_submodule(name)
    if _under(name, excluded):
        raise UserError(f"target pattern {pattern!r} selects {name}, the new classification head, "
                        "which is trained in full; remove it from lora.targets")
    if name in units:
        return [name]
    kind = layer_kind(module)
    if kind == "depthwise" and wildcard:
        return []
    if kind == "depthwise":
        raise UserError(f"target pattern {pattern!r} selects {name}, a depthwise convolution (groups={module.groups}, "
                        "one input channel per group): an adapter there would have more parameters than the layer "
                        f"itself, so it is not adapted; adapt the pointwise convolutions beside it instead: "
                        f"{_pointwise_beside(model, name, valid)}")
    if kind == "linear":  # a projection inside nn.MultiheadAttention
        owner = name.rpartition(".")[0]
        raise UserError(f"target pattern {pattern!r} selects {name}, a projection that nn.MultiheadAttention "
                        f"reads as a weight; target the attention module {owner} (adapts its q/k/v "
                        "in-projection and out-projection)")
    inside = [n for n in units if n.startswith(name + ".")]
    if not inside:
        raise UserError(f"target pattern {pattern!r} selects {name} ({type(module).__name__}), which "
                        f"holds no layer LoRA supports (Conv2d, Linear, MultiheadAttention); nearby valid names: "
                        f"{_nearby(pattern, valid)}")
    return inside


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def layer_ranks(model: nn.Module, names: Sequence[str], rank: int,
                rank_pattern: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each adapted unit's rank: the first `rank_pattern` glob that matches its name (or a container above it),
    else `rank` (PEFT's rank_pattern). A grouped convolution needs a rank divisible by its groups."""
    if rank_pattern is not None and not isinstance(rank_pattern, Mapping):
        raise UserError(f"lora.rank_pattern: must be a mapping {{glob: rank}}, e.g. '{{\"layer4.*\": 16}}'; "
                        f"got {rank_pattern!r}")
    pattern = dict(rank_pattern or {})
    for key, value in pattern.items():
        if int(value) != value or value <= 0:
            raise UserError(f"lora.rank_pattern: rank for {key!r} must be a positive integer, got {value}")
    ranks, used = {}, set()
    for name in names:
        key = next((k for k in pattern if _matches(name, k)), None)
        used.add(key)
        ranks[name] = int(pattern[key]) if key is not None else int(rank)
        module = model.get_submodule(name)
        groups = getattr(module, "groups", 1)
        if ranks[name] % groups:
            raise UserError(f"{name} is a grouped convolution (groups={groups}): its rank must be divisible by "
                            f"{groups} (one update per group), got {ranks[name]}; rank "
                            f"{rank_for_groups(ranks[name], groups)} works, e.g. "
                            f"lora.rank_pattern='{{\"{name}\": {rank_for_groups(ranks[name], groups)}}}'")
    unused = [k for k in pattern if k not in used]
    if unused:
        raise UserError(f"lora.rank_pattern: {unused[0]!r} matches no adapted layer; adapted layers: "
                        f"{_nearby(unused[0], list(names))}")
    return ranks


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def get_decay_state(model: nn.Module) -> DecayState | None:
    """The DecayState shared by the model's adapters (None without adapters)."""
    for module in model.modules():
        if isinstance(module, LoRALayer):
            return module.decay
    return None


def inject_lora(model: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float | None = None, *,
                exclude: Iterable[str] = (), rank_pattern: Mapping[str, int] | None = None,
                names: Sequence[str] | None = None, options: LoRAOptions | None = None, **fields) -> list[str]:
    """Replace the units selected by `targets` (or the already resolved `names`) with LoRA adapters, in place;
    return their names.

    The adapters' settings are `options`, or LoRAOptions(rank, alpha (default: rank), **fields); `rank_pattern`
    sets per-layer ranks (`layer_ranks`). The model gets one DecayState (attribute `lora_decay` of its first
    adapter) shared by all its adapters. Freezing is the caller's business (see models.finetune.prepare_finetune):
    this only adds layers.
    """
    if options is None:
        options = LoRAOptions(rank=rank, alpha=float(rank) if alpha is None else alpha, **fields)
    elif fields:
        raise TypeError(f"inject_lora: give either options or LoRAOptions fields, not both ({', '.join(fields)})")
    opts, rank = options, options.rank
    names = list(names) if names is not None else select_targets(model, targets, exclude)
    ranks = layer_ranks(model, names, rank, rank_pattern)
    decay = get_decay_state(model)
    owner_needed = decay is None
    if decay is None:
        decay = DecayState(1.0).to(next(model.parameters()).device)
    for name in names:
        base = model.get_submodule(name)
        layer_opts = opts if ranks[name] == rank else dataclasses.replace(opts, rank=ranks[name])
        if isinstance(base, nn.MultiheadAttention):
            layer: nn.Module = LoRAMultiheadAttention(base, layer_opts, decay)
        else:
            layer = adapter_class(base)(base, layer_opts, decay)
        if owner_needed:
            next(m for m in layer.modules() if isinstance(m, LoRALayer)).add_module(DECAY_ATTR, decay)
            owner_needed = False
        _set_submodule(model, name, layer)
        parent_name = name.rpartition(".")[0]
        make_weight_aware(model.get_submodule(parent_name) if parent_name else model)
    return names


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def set_decay(model: nn.Module, d: float) -> None:
    """Set the one decay factor of a model's adapters."""
    state = get_decay_state(model)
    if state is None:
        raise ValueError("model has no LoRA adapters")
    state.set(d)


def set_merge_on_eval(model: nn.Module, enabled: bool) -> None:
    for _, layer in lora_layers(model):
        layer.merge_on_eval = enabled


def adapted_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-most adapted modules (a LoRALayer, or a LoRAMultiheadAttention holding two), in model order."""
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (LoRALayer, LoRAMultiheadAttention)) and not any(
                name.startswith(u + ".") for u, _ in units):
            units.append((name, module))
    return units


def _export(model: nn.Module, convert) -> nn.Module:
    out = copy.deepcopy(model)
    out.eval()
    for name, unit in adapted_units(out):
        _set_submodule(out, name, convert(unit))
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every adapter is a plain layer with W' = d·W + s·BA and b' = d·b + C."""
    return _export(model, lambda layer: layer.to_merged())


def merged_view(model: nn.Module) -> nn.Module:
    """`model` as evaluation runs it (docs/DESIGN.md §4): every adapter replaced by its merged plain layer
    (W' = d·W + s·BA, as `merge_lora`), every other module shared with `model`, not copied.

    Evaluation through it runs the base architecture's own layers, at the base model's speed (no per-call adapter
    bookkeeping); BatchNorm statistics recomputed through it are `model`'s own. Build it again after the weights
    change: the merged layers hold the values of the moment they were made. A model without adapters is
    returned as it is.
    """
    units = dict(adapted_units(model))
    if not units:
        return model
    with torch.no_grad():
        return _with_merged_units(model, "", units)


def _with_merged_units(module: nn.Module, name: str, units: dict[str, nn.Module]) -> nn.Module:
    if name in units:
        merged = units[name].to_merged()
        for layer in units[name].modules():  # the view holds the merged weights now: one copy, not two
            if isinstance(layer, LoRALayer):
                layer._merged_cache = None
        weight = getattr(units[name], "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and not weight.is_contiguous() and \
                weight.is_contiguous(memory_format=torch.channels_last):
            merged = merged.to(memory_format=torch.channels_last)  # as the model was placed (device.Runtime)
        return merged
    if name and not any(u.startswith(name + ".") for u in units):
        return module  # nothing adapted below: shared as it is
    shell = copy.copy(module)  # a shallow copy: parameters, buffers and hooks are the original's own
    shell._modules = {child_name: (None if child is None else
                                   _with_merged_units(child, f"{name}.{child_name}" if name else child_name, units))
                      for child_name, child in module._modules.items()}
    return shell


def export_low_rank(model: nn.Module) -> nn.Module:
    """A copy in which every adapter (at d = 0) is two small plain layers and no frozen weight is kept."""
    return _export(model, lambda layer: layer.to_low_rank())
