"""Classifiers by name: every torchvision classification model and, with the timm extra, timm's models. For each:
how it is built (image size, auxiliary heads), where its classification head is, which input sizes it runs
at, and its default LoRA targets (docs/DESIGN.md §4). models.py turns these into a model with weights and head.

Shapes are found on the meta device (no memory, no weights), so a config check can build any model, even the
largest, in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lora_cls.adapters.inject import adaptable_layers, select_targets
from lora_cls.errors import UserError

SOURCES = ("torchvision", "timm")
TIMM_MISSING = "model.source=timm needs timm, an optional extra: pip install 'lora-cls[timm]' (or pip install timm)"
AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
REFERENCE_SIZE = 224  # where output strides are measured for the default-target rule
SIZE_CANDIDATES = (16, 32, 48, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512)
STAGE_STRIDE = 16  # CNN default targets: layers whose output is at stride >= 16 (the last two stages)


@dataclass(frozen=True)
class ModelSpec:
    """A classifier by name: `build(image_size, aux)` makes it with random weights and its original 1000-class
    head; `head` and `aux` are the qualified names of its classification head and auxiliary heads; `targets` are
    its LoRA targets when `lora.targets` is null (the seeds' preset, or the default rule's layers at rank 8:
    `default_target_names` for other ranks)."""

    source: str
    name: str
    build: Callable[..., nn.Module]
    head: str
    aux: tuple[str, ...] = ()
    weights_url: str | None = None
    targets: tuple[str, ...] = ()

    def builder(self, weights=None, image_size: int = REFERENCE_SIZE, aux: bool = False) -> nn.Module:
        """The model with random weights (`weights` is ignored: models.weights loads them), on the meta device
        when the caller is inside `with torch.device("meta")`."""
        if torch.get_default_device().type == "meta":  # a caller's `with torch.device("meta")`: shapes only
            with torch.device("cpu"):
                return on_meta(lambda: self.build(image_size, aux))
        return self.build(image_size, aux)


def torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return list(tvm.list_models(module=tvm))


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(TIMM_MISSING) from None
    return timm


def check_name(source: str, name: str) -> None:
    """A UserError naming the closest names when `name` is not a classifier of `source`."""
    if source not in SOURCES:
        raise UserError(f"model.source: must be {' or '.join(SOURCES)}, got {source!r}")
    known = torchvision_names() if source == "torchvision" else _timm().list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=6, cutoff=0.5)
        raise UserError(f"model.name: unknown {source} model {name!r}"
                        + (f"; close matches: {', '.join(close)}" if close else "")
                        + "; `lora-models` lists the torchvision models (`lora-models --source timm <pattern>` timm's)")


def _torchvision_build(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    def build(image_size: int = REFERENCE_SIZE, aux: bool = True) -> nn.Module:
        kwargs: dict = {}
        if name.startswith("vit_"):
            kwargs["image_size"] = image_size  # position embeddings for this size (interpolated on load)
        elif name.startswith("maxvit"):
            kwargs["input_size"] = (image_size, image_size)
        elif name in AUX_HEADS:
            kwargs.update(aux_logits=True, init_weights=True)  # built with aux heads; removed after loading
        model = tvm.get_model(name, weights=None, **kwargs)
        if name in AUX_HEADS and not aux:
            drop_aux_heads(model, AUX_HEADS[name])
        return model

    return build


def drop_aux_heads(model: nn.Module, aux: tuple[str, ...]) -> None:
    """GoogLeNet / Inception v3 without auxiliary heads: plain logits in training too."""
    for name in aux:
        setattr(model, name, None)
    model.aux_logits = False


def _timm_build(name: str) -> tuple[Callable[..., nn.Module], dict]:
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}

    def build(image_size: int = REFERENCE_SIZE, aux: bool = True) -> nn.Module:
        kwargs = {"img_size": image_size} if cfg.get("fixed_input_size") else {}
        return timm.create_model(name, pretrained=False, **kwargs)

    return build, cfg


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules with parameters and buffers on the meta device, even when a constructor computes with real
    tensors (RegNet's widths): each tensor is created on the CPU without being filled, then replaced."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def param(self, name, p):
        register_parameter(self, name, None if p is None else nn.Parameter(p.to("meta"), p.requires_grad))

    def buffer(self, name, t, persistent=True):
        register_buffer(self, name, None if t is None else t.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = param, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        with meta_device():
            return build()


def _heads(model: nn.Module, aux_names: tuple[str, ...], classes: int = 1000) -> tuple[str, tuple[str, ...]]:
    """The last Linear or 1x1 Conv2d producing `classes` outputs (the head), and those inside aux modules."""
    found = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == classes and tuple(m.kernel_size) == (1, 1))]
    main = [n for n in found if not any(n == a or n.startswith(a + ".") for a in aux_names)]
    if not main:
        raise UserError(f"found no classification head (a final Linear or 1x1 Conv2d with {classes} outputs)")
    return main[-1], tuple(n for n in found if n not in main)


def _architecture(source: str, name: str) -> ModelSpec:
    """The named model's builder, head and auxiliary heads (found on a meta-device copy), without targets."""
    check_name(source, name)
    if source == "torchvision":
        import torchvision.models as tvm

        build = _torchvision_build(name)
        head, aux = _heads(on_meta(build), AUX_HEADS.get(name, ()))
        return ModelSpec(source, name, build, head, aux, tvm.get_model_weights(name).DEFAULT.url)
    build, cfg = _timm_build(name)
    heads = cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return ModelSpec(source, name, build, heads[0], heads[1:], cfg.get("hf_hub_id") or cfg.get("url"))


# -- input sizes ------------------------------------------------------------------------------------------


# -- default targets ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def input_statistics(name: str, source: str = "torchvision") -> dict:
    """What the model's pretrained weights expect of an image: {mean, std, crop_pct, interpolation, source} from
    the torchvision weights' `transforms()` (resize and crop sizes give crop_pct) or timm's pretrained_cfg."""
    if source == "torchvision":
        import torchvision.models as tvm

        weights = tvm.get_model_weights(name).DEFAULT
        t = weights.transforms()
        return {"mean": tuple(t.mean), "std": tuple(t.std), "crop_pct": t.crop_size[0] / t.resize_size[0],
                "interpolation": t.interpolation.value, "source": f"torchvision:{weights}"}
    cfg = _timm().models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": float(cfg.get("crop_pct", 0.875)), "interpolation": str(cfg.get("interpolation", "bicubic")),
            "source": f"timm:{cfg.get('architecture', name)}.{cfg.get('tag', '')}".rstrip(".")}


def is_transformer(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())


def _output_heights(model: nn.Module, names: list[str], size: int) -> dict[str, int | None]:
    """Each named layer's output height on a size×size meta input (None: no spatial dims, e.g. after pooling)."""
    heights: dict[str, int | None] = {}

    def hook(name: str, module: nn.Module):
        def record(_m, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(module, nn.Conv2d):
                heights[name] = out.shape[2]
            else:  # Linear: (N, C) after pooling, or channels-last (N, H, W, C) inside a CNN block
                heights[name] = out.shape[1] if out.dim() == 4 else None
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n, model.get_submodule(n))) for n in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return heights


def default_targets(model: nn.Module, exclude: tuple[str, ...], rank: int,
                    rank_pattern: Mapping[str, int] | None = None, size: int = REFERENCE_SIZE) -> list[str]:
    """The rule applied when lora.targets is null (README "Models"): transformers (a model with attention
    modules) get every Linear and nn.MultiheadAttention outside the head; CNNs get the Conv2d and Linear
    layers whose output is at stride >= 16 (the last two stages) or after pooling. Depthwise convolutions are
    never adapted; a grouped convolution only where its rank is divisible by its groups; no layer whose
    rank would reach min(out, in·k·k), where LoRA is no longer low rank."""
    from lora_cls.adapters.inject import _matches

    units = adaptable_layers(model, exclude)
    if is_transformer(model):
        names = [n for n, kind in units.items() if kind in ("linear", "attention")]
    else:
        heights = _output_heights(model, list(units), size)
        names = [n for n in units if n in heights and (heights[n] is None or heights[n] * STAGE_STRIDE <= size)]
    pattern = dict(rank_pattern or {})

    def layer_rank(name: str) -> int:
        return next((int(r) for k, r in pattern.items() if _matches(name, k)), int(rank))

    def fits(name: str) -> bool:  # a rank that divides the groups and stays below min(out, in·k·k)
        module = model.get_submodule(name)
        w = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
        r = layer_rank(name)
        return r % getattr(module, "groups", 1) == 0 and r < min(w.shape[0], w[0].numel())

    return [n for n in names if fits(n)]


def summarize(names: list[str], most: int = 8) -> str:
    """Layer names as a few patterns: numbered components become * ('layer3.*.conv1'), and numbered names
    too ('denselayer*') when that is still more than `most` patterns."""
    def collapse(pattern: str) -> list[str]:
        out: list[str] = []
        for name in names:
            p = re.sub(pattern, "*", name)
            if p not in out:
                out.append(p)
        return out

    patterns = collapse(r"(?<=[._-])\d+(?=\.|$)|^\d+(?=\.|$)")
    if len(patterns) > most:
        patterns = collapse(r"(?<=[.\w])\d+(?=\.|$)")
    return ", ".join(patterns)


PRESETS: dict[str, tuple[str, ...]] = {
    # The seeds: conv1/conv2 of every residual block in layer3 and layer4 at rank 8 (464,898 trainable, 2.14%).
    "resnet34": ("layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2"),
    # The seeds: the three block5 convolutions at rank 5, head Linear(4096, 2) (84,994 trainable).
    "vgg16": ("features.24", "features.26", "features.28"),
}


@functools.lru_cache(maxsize=256)
def model_spec(name: str, source: str = "torchvision") -> ModelSpec:
    """The named model's spec; a UserError naming close matches for an unknown name."""
    spec = _architecture(source, name)
    preset = PRESETS.get(name) if source == "torchvision" else None
    return dataclasses.replace(spec, targets=tuple(preset or default_target_names(spec, 8)))


def default_target_names(spec: ModelSpec, rank: int, rank_pattern: Mapping[str, int] | None = None) -> list[str]:
    """The preset, or the default rule's layers (default_targets) at this rank."""
    if spec.source == "torchvision" and spec.name in PRESETS:
        return list(_resolved_targets(spec.name, PRESETS[spec.name]))
    return _default_targets(spec, int(rank), tuple(sorted((rank_pattern or {}).items())))


@functools.lru_cache(maxsize=256)
def _default_targets(spec: ModelSpec, rank: int, rank_pattern: tuple) -> list[str]:
    model = on_meta(lambda: spec.builder())
    return default_targets(model, (spec.head, *spec.aux), rank, dict(rank_pattern))


def model_heads(spec: ModelSpec, aux: bool) -> list[str]:
    """The heads that are trained in full (and never adapted)."""
    return [spec.head, *(spec.aux if aux else ())]


@functools.lru_cache(maxsize=8)
def _meta_model(spec: ModelSpec) -> nn.Module:
    return on_meta(lambda: spec.builder(aux=True))


@functools.lru_cache(maxsize=64)  # a sweep's precheck validates every job's config: one model build per value
def _resolved_targets(name: str, patterns: tuple[str, ...], source: str = "torchvision",
                      aux: bool = False) -> tuple[str, ...]:
    spec = model_spec(name, source)
    return tuple(select_targets(_meta_model(spec), list(patterns), exclude=model_heads(spec, True)))
