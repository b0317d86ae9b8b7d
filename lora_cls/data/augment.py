"""Batch augmentation and ImageNet normalisation as tensor ops, on whatever device the batch is on.

Loaders yield uint8 batches (N, 3, H, W); the engine moves a batch to its device and calls a `BatchAugment`
(train mode augments then normalises, eval mode only normalises). Doing this per batch on the device keeps
the DataLoader free of per-image Python transforms, which is what makes the cached, worker-less loading in
`lora_cls.data` fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The luma weights of torchvision's rgb_to_grayscale, so jitter matches torchvision's ColorJitter.
_LUMA = (0.2989, 0.587, 0.114)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 or float (N, 3, H, W) in [0, 255] → float32 (N, 3, H, W), (x/255 − mean) / std per channel.

    The memory format of `x` is kept (channels_last stays channels_last).
    """
    mean, std = _stats(x)
    return _like(((x.float() - mean) / std), x)


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`out` in the memory format of `ref` (channels_last or contiguous)."""
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of float (N, C, H, W) by `degrees` (N,) about its centre (counter-clockwise as
    displayed, y axis pointing down), bilinear, one affine_grid + grid_sample for the whole batch.

    Padding is "reflection": corners are filled with mirrored content rather than black, so the amount of
    black corner is not a cue that correlates with the rotation and the image statistics stay natural.
    """
    n, _, h, w = x.shape
    angle = degrees.to(device=x.device, dtype=torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rotation in pixel units expressed in grid_sample's normalised [-1, 1] coordinates, where x is scaled
    # by W/2 and y by H/2: the off-diagonal terms carry the aspect ratio.
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin * (h / w), zero], 1),
                         torch.stack([sin * (w / h), cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


class BatchAugment(nn.Module):
    """Random flip, rotation and colour jitter of a batch, then ImageNet normalisation.

    forward: uint8 or float (N, 3, H, W) in [0, 255] → float32 (N, 3, H, W), normalised, in the memory
    format of the input. In train mode, per sample: horizontal flip with p = 0.5 (`hflip`), rotation by an
    angle uniform in ±`rotation` degrees (`rotate`, reflection padding), then brightness, contrast and
    saturation factors each uniform in [1 − `color_jitter`, 1 + `color_jitter`] applied in that order,
    clamping to [0, 255] after each (as torchvision's ColorJitter, in a fixed order). In eval mode: only
    `normalize`.

    Random numbers come from `generator` (or the global RNG) in a fixed order, whichever options are on:
    five `torch.rand(N)` draws, for flip (< 0.5 flips), angle, brightness, contrast, saturation. They are
    drawn on the generator's device and moved to the batch, so a CPU generator gives the same
    augmentation of a batch on CPU and CUDA.
    """

    def __init__(self, hflip: bool, rotation: float, color_jitter: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rotation < 0 or color_jitter < 0:
            raise ValueError(f"rotation ({rotation}) and color_jitter ({color_jitter}) must be >= 0")
        self.hflip = bool(hflip)
        self.rotation = float(rotation)
        self.color_jitter = float(color_jitter)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"hflip={self.hflip}, rotation={self.rotation}, color_jitter={self.color_jitter}"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        if not self.training:
            return normalize(x)
        generator = generator if generator is not None else self.generator
        device = generator.device if generator is not None else x.device
        n = x.shape[0]
        u = [torch.rand(n, generator=generator, device=device).to(x.device) for _ in range(5)]
        out = x.float()
        if self.hflip:
            flip = (u[0] < 0.5).view(n, 1, 1, 1)
            out = torch.where(flip, out.flip(-1), out)
        if self.rotation > 0:
            out = rotate(out, (2 * u[1] - 1) * self.rotation).clamp_(0, 255)
        if self.color_jitter > 0:
            lo = max(0.0, 1 - self.color_jitter)
            brightness, contrast, saturation = (lo + (1 + self.color_jitter - lo) * v.view(n, 1, 1, 1)
                                                for v in u[2:])
            out = (out * brightness).clamp_(0, 255)
            mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * contrast + mean).clamp_(0, 255)
            grey = _grey(out)
            out = ((out - grey) * saturation + grey).clamp_(0, 255)
        return _like(normalize(out), x)
