"""Adapters in a whole model: which layers get one (target patterns), putting them in, the shared decay factor d,
and taking them out again as plain layers (`merge_lora`, `export_low_rank`). The layers themselves are lora.py.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from lora_cls.errors import UserError
from lora_cls.lora import ADAPTER_FOR, DECAY_ATTR, DecayState, LoRALayer, LoRAOptions

# -- target selection -----------------------------------------------------------------------------------

def supported_layer_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Qualified names of every layer LoRA can adapt (Conv2d with groups=1, Linear), minus `exclude`."""
    excluded = set(exclude)
    return [n for n, m in model.named_modules()
            if type(m) in ADAPTER_FOR and n not in excluded and getattr(m, "groups", 1) == 1]


def _nearby(pattern: str, names: Sequence[str], n: int = 6) -> str:
    probe = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(probe, names, n=n, cutoff=0.4)
    if not close:
        head = pattern.split(".")[0]
        close = [x for x in names if x.split(".")[0] == head][:n] or list(names[:n])
    return ", ".join(close)


def select_targets(model: nn.Module, patterns: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """Resolve glob patterns over qualified module names to the layers to adapt, in model order.

    A pattern naming a container selects every supported layer inside it; of a pattern's matches only the
    top-most are expanded, so `layer3.*` means the blocks of layer3 and everything in them. A pattern that
    selects nothing, or that names an unsupported module (or an excluded one, such as the new head), is a
    UserError naming the pattern and nearby valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UserError("lora.targets is empty; name at least one layer pattern (e.g. 'layer4.*.conv1')")
    excluded = set(exclude)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    valid = supported_layer_names(model, excluded)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatchcase(n, pattern)]
        top = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
        if not top:
            raise UserError(f"target pattern {pattern!r} matches no module; nearby valid names: "
                            f"{_nearby(pattern, valid)}")
        for name in top:
            module = modules[name]
            if name in excluded:
                raise UserError(f"target pattern {pattern!r} selects {name}, the new classification head, "
                                "which is trained in full; remove it from lora.targets")
            inner = [(name, module)] if not list(module.children()) else [
                (f"{name}.{sub}", m) for sub, m in module.named_modules() if sub]
            found = False
            for qual, m in inner:
                if qual in excluded:
                    continue
                if type(m) in ADAPTER_FOR:
                    if getattr(m, "groups", 1) != 1:
                        raise UserError(f"target pattern {pattern!r} selects {qual}, a grouped convolution "
                                        f"(groups={m.groups}), which LoRA does not support here; "
                                        f"narrow the pattern. Nearby valid names: {_nearby(qual, valid)}")
                    chosen.add(qual)
                    found = True
            if not found:
                raise UserError(f"target pattern {pattern!r} selects {name} ({type(module).__name__}), which "
                                f"holds no layer LoRA supports (Conv2d, Linear); nearby valid names: "
                                f"{_nearby(pattern, valid)}")
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


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


def inject_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, *,
                exclude: Iterable[str] = (), **options) -> list[str]:
    """Replace the layers selected by `targets` with LoRA adapters, in place; return their names.

    `options` are the other LoRAOptions fields. The model gets one DecayState (attribute `lora_decay`) shared
    by all its adapters. Freezing is the caller's business (see models.prepare_finetune): this only adds layers.
    """
    opts = LoRAOptions(rank=rank, alpha=alpha, **options)
    names = select_targets(model, targets, exclude)
    decay = get_decay_state(model)
    owner_needed = decay is None
    if decay is None:
        decay = DecayState(1.0).to(next(model.parameters()).device)
    for name in names:
        base = model.get_submodule(name)
        layer = ADAPTER_FOR[type(base)](base, opts, decay)
        if owner_needed:
            layer.add_module(DECAY_ATTR, decay)
            owner_needed = False
        _set_submodule(model, name, layer)
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


def _export(model: nn.Module, convert) -> nn.Module:
    out = copy.deepcopy(model)
    out.eval()
    for name, layer in lora_layers(out):
        _set_submodule(out, name, convert(layer))
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every adapter is a plain layer with W' = d·W + s·BA and b' = d·b + C."""
    return _export(model, lambda layer: layer.to_merged())


def export_low_rank(model: nn.Module) -> nn.Module:
    """A copy in which every adapter (at d = 0) is two small plain layers and no frozen weight is kept."""
    return _export(model, lambda layer: layer.to_low_rank())
