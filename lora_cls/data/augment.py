"""Training augmentation on the batch, on whatever device the batch is on (docs/DESIGN.md §5).

Loaders yield the stored uint8 batches (N, 3, R, R); the engine moves a batch to its device and calls a
`TrainAugment`: in train mode it augments per sample and normalises to the model's S × S input, in eval mode it is
the model's `EvalTransform` (centre crop, normalise). Doing this on the device keeps the DataLoader free of
per-image work on the host, which is what makes the cached, worker-less loading in `lora_cls.data` fast.

Presets (`dataset.augment.preset`): `none`; `light` (lora-cls before round 22: `BatchAugment`'s flip, rotation
and colour jitter of the S × S centre crop); `natural` (photos: random-resized crop, horizontal flip,
TrivialAugmentWide, random erasing); `microscopy` (orientation carries no meaning: random-resized crop, horizontal
and vertical flips, 90° rotations, light colour jitter). MixUp/CutMix (`mixup`, `cutmix` > 0) mix a batch and its
one-hot targets (soft targets for the loss). The operations are torchvision.transforms.v2's, applied per sample
(one draw of parameters per image: v2 applied to a batch tensor draws one set for the whole batch); the choice
over kornia.augmentation is measured in docs/BENCHMARKS.md ("Augmentation library", scripts/bench_augment.py).
Every random draw comes from the augmentation's own generator, seeded by (trainer.seed, process rank) and saved
in last.pt, so a resumed run continues the same stream and DDP ranks draw independently.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_cls.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    Preprocessing,
    centre_crop,
    like,
    normalize,
)
from lora_cls.errors import UserError

# The luma weights of torchvision's rgb_to_grayscale, so jitter matches torchvision's ColorJitter.
_LUMA = (0.2989, 0.587, 0.114)


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
                 generator: torch.Generator | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if rotation < 0 or color_jitter < 0:
            raise ValueError(f"rotation ({rotation}) and color_jitter ({color_jitter}) must be >= 0")
        self.hflip = bool(hflip)
        self.rotation = float(rotation)
        self.color_jitter = float(color_jitter)
        self.generator = generator
        self.mean, self.std = tuple(mean), tuple(std)

    def extra_repr(self) -> str:
        return f"hflip={self.hflip}, rotation={self.rotation}, color_jitter={self.color_jitter}"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        if not self.training:
            return normalize(x, self.mean, self.std)
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
        return like(normalize(out, self.mean, self.std), x)


PRESETS = ("none", "light", "natural", "microscopy")


class TrainAugment(nn.Module):
    """Stored uint8 batches (N, 3, R, R) → the model's float32 input (N, 3, S, S): augmented per `preset` in train
    mode, `EvalTransform` in eval mode. `mix(x, y)` returns the batch and its targets (MixUp/CutMix soft targets
    (N, K) in train mode when mixup or cutmix > 0, else `y` unchanged).

    `hflip`, `rotation` and `color_jitter` are the light preset's (color_jitter is also the microscopy preset's
    jitter); `scale` is the smallest area share of a random-resized crop; `erasing` the probability of random
    erasing (natural).
    """

    def __init__(self, preprocessing: Preprocessing, preset: str = "light", *, hflip: bool = True,
                 rotation: float = 10.0, color_jitter: float = 0.1, scale: float = 0.35, erasing: float = 0.25,
                 mixup: float = 0.0, cutmix: float = 0.0, num_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise UserError(f"dataset.augment.preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.preprocessing, self.preset = preprocessing, preset
        self.eval_transform = EvalTransform(preprocessing)
        self.generator = torch.Generator().manual_seed(int(seed))
        p = preprocessing
        self.light = BatchAugment(hflip, rotation, color_jitter, self.generator, p.mean, p.std)
        self.per_sample = self._pipeline(preset, p, scale, color_jitter)
        self.erasing = erasing if preset == "natural" else 0.0
        self.mixer = self._mixer(mixup, cutmix, num_classes)
        self.settings = dict(preset=preset, hflip=hflip, rotation=rotation, color_jitter=color_jitter, scale=scale,
                             erasing=self.erasing, mixup=mixup, cutmix=cutmix)

    @staticmethod
    def _pipeline(preset: str, p: Preprocessing, scale: float, color_jitter: float):
        from torchvision.transforms import InterpolationMode, v2

        interpolation = InterpolationMode(p.interpolation)
        crop = v2.RandomResizedCrop(p.image_size, scale=(scale, 1.0), interpolation=interpolation, antialias=True)
        if preset == "natural":
            return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=interpolation)])
        if preset == "microscopy":
            jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else v2.Identity()
            return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), _Rotate90(), jitter])
        return None

    @staticmethod
    def _mixer(mixup: float, cutmix: float, num_classes: int):
        from torchvision.transforms import v2

        chosen = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
        return None if not chosen else (chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        if not self.training or self.preset == "none":
            return self.eval_transform(x)
        p = self.preprocessing
        if self.preset == "light":
            return self.light(centre_crop(x, p.image_size))
        with self._own_random_state():
            out = torch.stack([self.per_sample(image) for image in x])
            out = normalize(out, p.mean, p.std)
            if self.erasing > 0:
                from torchvision.transforms import v2

                erase = v2.RandomErasing(p=self.erasing)
                out = torch.stack([erase(image) for image in out])
        return like(out, x)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch and its targets: MixUp/CutMix in train mode when configured (soft targets (N, K) float32)."""
        if not self.training or self.mixer is None:
            return x, y
        with self._own_random_state():
            mixed, target = self.mixer(x, y)
        return like(mixed, x), target.float()

    @contextlib.contextmanager
    def _own_random_state(self):
        """torchvision draws from the global CPU generator: inside, that is this augmentation's own stream."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.generator.get_state())
            try:
                yield
            finally:
                self.generator.set_state(torch.get_rng_state())

    def rng_state(self) -> torch.Tensor:
        """The generator's state (what last.pt keeps)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class _Rotate90(nn.Module):
    """A rotation by k · 90° with k uniform in {0, 1, 2, 3} (one draw per image, from the global generator)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image
