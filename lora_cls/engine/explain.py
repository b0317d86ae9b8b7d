"""What the model looks at: Grad-CAM heatmaps (Selvaraju et al. 2017) with the `grad-cam` package
(pytorch-grad-cam, `pip install 'lora-cls[explain]'`).

Why that package: it is the reference implementation most papers' figures come from, it takes any nn.Module and
a target layer, and it has the `reshape_transform` hook that transformers need (their layers output tokens, not
feature maps), where Captum's LayerGradCam assumes (N, C, H, W) outputs. It needs opencv-python-headless, not a
display.

The target layer (`target_layer`): a name given by the user, else per family. Convolutional networks: the last
module in execution order that is, or holds, a Conv2d and outputs a feature map of at least MIN_SIDE × MIN_SIDE
(7 × 7: the last stage's map at the 224 px these models are built for) at the run's image size, outside the
head: at 224 px that is the last stage (ResNet's layer4), at the 32 px of the demo an earlier one (ResNet's layer1,
8 × 8; layer4's map would be 1 × 1, one value for the whole image). Vision
transformers (torchvision's, timm's): the last block's first LayerNorm, its tokens (class token dropped)
reshaped to a grid; Swin (torchvision's, timm's): the last stage, (N, H, W, C) permuted to (N, C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lora_cls.engine.loss import plain_logits
from lora_cls.errors import UserError

MIN_SIDE = 7
Reshape = Callable[[torch.Tensor], torch.Tensor] | None


def grad_cam_classes():
    """(GradCAM, ClassifierOutputTarget) of the grad-cam package, or the UserError that says how to install it."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise UserError("explain needs the grad-cam package, which is not installed: pip install "
                        "'lora-cls[explain]' (or pip install grad-cam)") from None
    return GradCAM, ClassifierOutputTarget


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Transformer tokens (N, T, C) → (N, C, h, w): the last h·w tokens (h = w = floor(sqrt(T))) on their grid,
    the class (and register) tokens before them dropped."""
    side = math.isqrt(x.shape[1])
    return x[:, x.shape[1] - side * side:, :].reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)


def channels_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """Swin's stage outputs (N, H, W, C) → (N, C, H, W)."""
    return x.permute(0, 3, 1, 2)


def _reshape_for(output: torch.Tensor) -> Reshape:
    """How a layer's output becomes (N, C, H, W): tokens and channels-last maps are turned, maps kept."""
    if output.dim() == 3:
        return tokens_to_grid
    if output.dim() == 4 and output.shape[1] == output.shape[2] and output.shape[3] > output.shape[1]:
        return channels_last_to_first
    if output.dim() == 4:
        return None
    raise UserError(f"explain_layer: that layer outputs a tensor of shape {tuple(output.shape)}, which is neither "
                    "a feature map (N, C, H, W) nor transformer tokens (N, T, C); choose a convolutional stage")


def _outputs(model: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    """Every named module's output on one blank image, in the order the modules finish."""
    found: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: found.__setitem__(name, out))
             for name, m in model.named_modules() if name]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: out for name, out in found.items() if isinstance(out, torch.Tensor)}


def _family_layer(model: nn.Module) -> tuple[str, Reshape] | None:
    """The target of transformer families (torchvision's and timm's ViT and Swin), else None."""
    def last(container: str) -> str:
        return f"{container}.{list(model.get_submodule(container).named_children())[-1][0]}"

    if hasattr(model, "encoder") and hasattr(model.encoder, "layers") and hasattr(model, "class_token"):
        return f"{last('encoder.layers')}.ln_1", tokens_to_grid  # torchvision ViT
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return f"{last('blocks')}.norm1", tokens_to_grid  # timm ViT, DeiT, ...
    name = type(model).__name__.lower()
    if "swin" in name and hasattr(model, "features"):
        return last("features"), channels_last_to_first  # torchvision Swin
    if "swin" in name and hasattr(model, "layers"):
        return last("layers"), channels_last_to_first  # timm Swin
    return None


def target_layer(model: nn.Module, image_size: int, name: str | None = None,
                 head: str | None = None) -> tuple[str, nn.Module, Reshape]:
    """(name, module, reshape transform) of the layer Grad-CAM looks at: `name` if given, else the family's
    (module docstring). `head`: the classifier head's name, never a target."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            near = [n for n in modules if n and (n.startswith(name.rsplit(".", 1)[0]) or name in n)][:8]
            raise UserError(f"explain_layer={name}: the model has no such module"
                            + (f"; nearby: {', '.join(near)}" if near else "; lora-models lists module names"))
        return name, modules[name], _reshape_for(_outputs(model, image_size)[name])
    family = _family_layer(model)
    if family is not None:
        return family[0], model.get_submodule(family[0]), family[1]
    outputs = _outputs(model, image_size)
    modules = dict(model.named_modules())

    def usable(n: str, out: torch.Tensor) -> bool:
        m = modules[n]
        in_head = head is not None and (n == head or n.startswith(head + "."))
        has_conv = isinstance(m, nn.Conv2d) or any(isinstance(c, nn.Conv2d) for c in m.modules())
        return has_conv and not in_head and out.dim() == 4

    maps = [(n, out) for n, out in outputs.items() if usable(n, out)]
    if not maps:
        raise UserError("explain: found no convolutional feature map in this model; set explain_layer=<module>")
    large = [n for n, out in maps if min(out.shape[-2:]) >= MIN_SIDE]
    chosen = large[-1] if large else max(maps, key=lambda item: min(item[1].shape[-2:]))[0]
    return chosen, modules[chosen], None


class _Logits(nn.Module):
    """The classifier as Grad-CAM needs it: images → float32 logits (aux outputs dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_logits(self.model(x)).float()


def grad_cam(model: nn.Module, x: torch.Tensor, classes: Sequence[int], layer: nn.Module,
             reshape: Reshape = None) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] (each scaled to its own maximum, at the input's resolution) of
    normalised images `x` (N, 3, H, W) for class `classes[i]` of image i, at `layer`."""
    GradCAM, ClassifierOutputTarget = grad_cam_classes()
    wrapped = _Logits(model)
    was_training = model.training
    # The input gets a gradient, so the layer's output has one though every weight is frozen.
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        cam = GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape)
        try:
            heatmaps = cam(input_tensor=x.detach().float().requires_grad_(True),
                           targets=[ClassifierOutputTarget(int(c)) for c in classes])
        finally:
            cam.activations_and_grads.release()
            model.zero_grad(set_to_none=True)
    model.train(was_training)
    return np.nan_to_num(np.asarray(heatmaps, dtype=np.float32))
