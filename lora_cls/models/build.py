"""A classifier by name with its base weights and a new head for the task's classes."""

from __future__ import annotations

from torch import nn

from lora_cls.errors import UserError
from lora_cls.models.registry import AUX_HEADS, REFERENCE_SIZE, drop_aux_heads, model_spec
from lora_cls.models.weights import load_base_weights


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
                image_size: int = REFERENCE_SIZE, aux: bool = False) -> nn.Module:
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
        drop_aux_heads(model, AUX_HEADS[name])
    for head in (spec.head, *(spec.aux if aux else ())):
        replace_head(model, head, num_classes)
    return model
