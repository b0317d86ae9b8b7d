"""PEFT's LoRA format, both ways, as pure mappings (docs/DESIGN.md §7; files are runs/peft.py's business).

PEFT (`PeftModel.from_pretrained(base_model, folder)`) stores a LoRA adapter as `adapter_config.json` (a
LoraConfig) and `adapter_model.safetensors` with keys `base_model.model.<layer>.lora_A.weight`, `.lora_B.weight`,
DoRA's `.lora_magnitude_vector` ((1, out, 1, 1) on a convolution, (out,) on a Linear), and every tensor of the
`modules_to_save` (the new head, BatchNorm layers whose statistics trained) under its own name. On
nn.MultiheadAttention the packed in-projection's factors are `<attn>.lora_A/B.weight` and the out-projection's
`<attn>.base_layer.out_proj.lora_A/B.weight`: the same ΔW added to `in_proj_weight` as lora-cls's.

What maps exactly, and how:
- a grouped convolution: PEFT's A is an ungrouped convolution (r, C_in, k, k) read by a grouped B; lora-cls's
  per-group A is PEFT's A with zeros outside each group's block (so the update stays a grouped weight).
- pissa/olora: PEFT's base is the pretrained W, so W_res + s·B·A is written as W + s'·B'·A' with the rank-2r
  factors A' = [A; A0], B' = c·[B, -B0] per group (PEFT's own PiSSA-to-LoRA conversion), c = s/s' at rank 2r.
- per-layer ranks: `rank_pattern` with each layer's escaped name (PEFT matches `(.*\\.)?(key)$`); PEFT's
  `alpha_pattern` on import is folded into B (s_layer / s), lora-cls having one alpha.
What has no PEFT form is refused with the reason (`UserError`): a decay schedule (d ≠ 1, its bias C), DoRA on
nn.MultiheadAttention or a grouped convolution (PEFT has no DoRA there / forms its norm ungrouped), Swin's window
attention (its projections are read as weights, which PEFT's Linear adapters would not be), and, on import, a
PEFT method or option lora-cls does not have.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lora_cls.adapters.attention import LoRAMultiheadAttention, reads_weights
from lora_cls.adapters.inject import adapted_units, get_decay_state
from lora_cls.adapters.layer import LoRAConv2d, LoRALayer
from lora_cls.errors import UserError

PREFIX = "base_model.model."
# The tensors' meaning follows PEFT 0.22: before it, PEFT applied the out-projection LoRA of nn.MultiheadAttention
# twice, and PEFT >= 0.22 doubles B of a folder whose peft_version is older (or missing) to keep its outputs.
FORMAT_VERSION = "0.22.0"
# LoraConfig fields whose non-default value changes what the adapter computes, and lora-cls has no such thing.
UNSUPPORTED = {"use_qalora": False, "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
               "use_bdlora": None, "velora_config": None, "arrow_config": None, "monteclora_config": None}
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "astra")  # inits that change the base weight itself


# -- lora-cls → PEFT -------------------------------------------------------------------------------------------

def _refuse_export(model: nn.Module, units: list[tuple[str, nn.Module]]) -> None:
    decay = get_decay_state(model)
    if decay is not None and decay.value != 1.0 or any(isinstance(m, LoRALayer) and m.lora_C is not None
                                                       for m in model.modules()):
        raise UserError(f"this run used a decay schedule (d = {decay.value:g} at its best epoch, and the learnable "
                        "bias C): PEFT's frozen path is always W∗x + b, so neither d·W nor C has a PEFT form; "
                        "export format=torchvision (the merged model) instead")
    for name, unit in units:
        layer = unit.in_proj if isinstance(unit, LoRAMultiheadAttention) else unit
        if layer.lora_magnitude is not None and isinstance(unit, LoRAMultiheadAttention):
            raise UserError(f"{name}: PEFT has no DoRA on nn.MultiheadAttention ('does not support DoRA'); export "
                            "format=torchvision, or train without lora.dora on attention")
        if layer.lora_magnitude is not None and layer.groups > 1:
            raise UserError(f"{name}: PEFT forms DoRA's weight norm of a grouped convolution as if it were not "
                            "grouped, so it would compute another function; export format=torchvision")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if reads_weights(parent):
            raise UserError(f"{name}: Swin's window attention reads this projection as a weight; PEFT's Linear "
                            "adapter there would never be called; export format=torchvision")


def _factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """PEFT's (A, B, rank, scaling) of one layer: A ungrouped, pissa/olora rewritten against the pretrained W."""
    a, b, rank, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.rank, layer.scaling
    g = layer.groups
    if layer.lora_A0 is not None:  # W_res + s·B·A = W + s·(B·A - B0·A0), per group
        new_rank = 2 * rank
        new_s = layer.options.alpha / (math.sqrt(new_rank) if layer.options.rslora else new_rank)
        c = s / new_s
        a = torch.cat([a.reshape(g, rank // g, *a.shape[1:]), layer.lora_A0.reshape(g, rank // g, *a.shape[1:])],
                      dim=1).reshape(new_rank, *a.shape[1:])
        b_g = b.reshape(b.shape[0], rank // g, *b.shape[2:])
        b0 = layer.lora_B0.reshape_as(b_g)
        outs = b.shape[0] // g
        b = torch.cat([torch.cat([b_g[j * outs:(j + 1) * outs], -b0[j * outs:(j + 1) * outs]], dim=1)
                       for j in range(g)]) * c
        rank, s = new_rank, new_s
    if g > 1:  # per-group A as PEFT's ungrouped A: zeros outside each group's input channels
        per_in, per_r = a.shape[1], rank // g
        full = a.new_zeros(rank, per_in * g, *a.shape[2:])
        for j in range(g):
            full[j * per_r:(j + 1) * per_r, j * per_in:(j + 1) * per_in] = a[j * per_r:(j + 1) * per_r]
        a = full
    return a.contiguous(), b.contiguous(), rank, s


def to_peft(model: nn.Module, keep: list[str], base_model_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json's LoraConfig, adapter_model.safetensors' tensors) of a model with lora-cls adapters;
    `keep`: the modules PEFT saves whole (`modules_to_save`: heads, BatchNorm layers whose statistics trained)."""
    units = adapted_units(model)
    _refuse_export(model, units)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    options = None
    for name, unit in units:
        parts = ([(f"{name}.", unit.in_proj), (f"{name}.base_layer.out_proj.", unit.out_proj)]
                 if isinstance(unit, LoRAMultiheadAttention) else [(f"{name}.", unit)])
        for key, layer in parts:
            a, b, rank, s = _factors(layer)
            tensors[PREFIX + key + "lora_A.weight"], tensors[PREFIX + key + "lora_B.weight"] = a, b
            if layer.lora_magnitude is not None:
                m = layer.lora_magnitude.detach()
                tensors[PREFIX + key + "lora_magnitude_vector"] = m.view(1, -1, 1, 1) if a.dim() == 4 else m
            options = layer.options
        ranks[name], scalings[name] = rank, s
    state = model.state_dict()
    for module in keep:
        tensors.update({PREFIX + k: v for k, v in state.items() if k.startswith(module + ".")})
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = options.alpha if options else 8.0
    # alpha is lora-cls's for every layer; a rank-2r layer (pissa/olora) keeps s through its B (c above)
    config = {"peft_type": "LORA", "peft_version": FORMAT_VERSION, "task_type": None,
              "base_model_name_or_path": base_model_name,
              "r": rank, "lora_alpha": alpha, "target_modules": [n for n, _ in units],
              "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank}, "alpha_pattern": {},
              "use_rslora": bool(options and options.rslora), "use_dora": bool(options and options.dora),
              "lora_dropout": float(options.dropout if options else 0.0),
              "init_lora_weights": "gaussian" if options and options.init == "gaussian" else True,
              "modules_to_save": list(keep), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "lora_bias": False}
    return config, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# -- PEFT → lora-cls -------------------------------------------------------------------------------------------

def check_peft_config(config: Mapping[str, Any], source: str) -> None:
    """A UserError naming what lora-cls cannot read: another PEFT method, or a LoRA option it does not have."""
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise UserError(f"{source} holds a PEFT {kind or 'unknown'} adapter (peft_type {config.get('peft_type')!r}); "
                        "lora-cls reads LoRA adapters (peft_type LORA) only")
    for key, default in UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, {}, [], None):
            raise UserError(f"{source}: PEFT LoRA option {key}={value!r} is something lora-cls does not have; "
                            "only plain LoRA, rsLoRA, DoRA, rank_pattern and alpha_pattern are read")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(k) for k in RESIDUAL_INITS):
        raise UserError(f"{source} was saved with init_lora_weights={config.get('init_lora_weights')!r}: its base is "
                        "PEFT's residual model, not the pretrained weights; save it again with "
                        "save_pretrained(..., path_initial_model_for_weight_conversion=...) (PEFT's conversion to "
                        "plain LoRA) and load that")


def peft_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{adapted layer name: rank} from the tensors' keys (an attention module once, by its in-projection)."""
    found = {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight") and ".base_layer.out_proj." not in key:
            found[key.removeprefix(PREFIX).removesuffix(".lora_A.weight")] = int(t.shape[0])
    return found


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """A rank_pattern / alpha_pattern value for `name` as PEFT resolves it (the first key matching
    `(.*\\.)?(key)$`), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft(model: nn.Module, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
              source: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors in lora-cls's names for `model` (built with adapters on the same layers and ranks): per-group
    A of a grouped convolution, alpha_pattern folded into B, DoRA magnitudes as vectors, the rest by name."""
    own = model.state_dict()
    alpha = float(config.get("lora_alpha", 8))
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{source}: tensor {key!r} is not under {PREFIX!r}; not a PEFT model's adapter")
        name = key.removeprefix(PREFIX).replace(".base_layer.out_proj.", ".out_proj.")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_magnitude_vector)(?:\.weight)?", name)
        if match is None:  # a module PEFT saves whole: the head, BatchNorm layers
            out[name] = t
            continue
        layer_name, part = match.group(1) or match.group(3), match.group(2) or match.group(4)
        module = model.get_submodule(layer_name)
        if isinstance(module, LoRAMultiheadAttention):
            layer_name, module = f"{layer_name}.in_proj", module.in_proj
        if not isinstance(module, LoRALayer):
            raise UserError(f"{source}: {key} adapts {layer_name}, which lora-cls does not adapt that way")
        out.update(_layer_tensor(module, layer_name, part, t, alpha, config, source))
    unknown = [k for k in out if k not in own]
    if unknown:
        raise UserError(f"{source} does not fit the model ({', '.join(unknown[:3])} not in it); is it for another "
                        "model, or a base model other than the one named?")
    return out


def _older_than_format(config: Mapping[str, Any]) -> bool:
    version = str(config.get("peft_version") or "0")
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]] + [0, 0, 0]
    return parts[:3] < [int(p) for p in FORMAT_VERSION.split(".")]


def _layer_tensor(layer: LoRALayer, name: str, part: str, t: torch.Tensor, alpha: float,
                  config: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    if part == "lora_magnitude_vector":
        return {f"{name}.lora_magnitude": t.reshape(-1)}
    if part == "lora_B":
        owner = name.removesuffix(".in_proj").removesuffix(".out_proj")
        factor = float(pattern_value(config.get("alpha_pattern") or {}, owner, alpha)) / alpha
        if name.endswith(".out_proj") and _older_than_format(config):
            factor *= 2.0  # PEFT < 0.22 applied an attention out-projection's adapter twice (as PEFT reads it)
        return {f"{name}.lora_B": t * factor if factor != 1.0 else t}
    if isinstance(layer, LoRAConv2d) and layer.groups > 1:  # PEFT's ungrouped A must be zero off each group's block
        g, per_r, per_in = layer.groups, t.shape[0] // layer.groups, t.shape[1] // layer.groups
        blocks = [t[j * per_r:(j + 1) * per_r, j * per_in:(j + 1) * per_in] for j in range(g)]
        outside = t.clone()
        for j in range(g):
            outside[j * per_r:(j + 1) * per_r, j * per_in:(j + 1) * per_in] = 0
        if torch.count_nonzero(outside):
            raise UserError(f"{source}: {name} is a grouped convolution (groups={g}) whose PEFT lora_A reads every "
                            "input channel (PEFT trains it ungrouped), so its update is no grouped weight and cannot "
                            "be merged (PEFT cannot merge it either); leave grouped convolutions out of "
                            "target_modules, or export it with PEFT")
        t = torch.cat(blocks)
    return {f"{name}.lora_A": t}
