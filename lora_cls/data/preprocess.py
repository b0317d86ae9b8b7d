"""A model's own preprocessing (docs/DESIGN.md §5): how an image file becomes the float tensor the model reads.

`Preprocessing` holds the model's input size S, how images are fitted (the short side resized to R and centre-cropped
to S, torchvision's and timm's convention, or squashed to S × S as lora-cls did before), the resize filter, and
the normalisation mean/std. It is resolved once per run (tasks/build.py: the torchvision weights' `transforms()`,
timm's `pretrained_cfg`, ImageNet statistics for random init) and recorded in the adapter's metadata and in an
export's model.json, so training, lora-eval, lora-predict, the Python API and every export use the same one.

The decoded-image cache stores each image as the R × R square (`geometry`); `EvalTransform` cuts the centre S × S
crop and normalises, on the batch's device. Training's augmentation (data/augment.py) crops within the square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lora_cls.data.decode import Geometry, centre_offset
from lora_cls.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_PCT = 0.875  # torchvision's 224 of 256 and timm's default
FITS = ("crop", "squash")


@dataclass(frozen=True)
class Preprocessing:
    """image_size S (the model's input side), resize R (crop: the short side resized to R, then the centre S × S
    crop; squash: R = S, the whole image resized to S × S), interpolation of the resize, mean and std of the
    normalisation ((x/255 − mean)/std per channel), and where the statistics came from (`source`)."""

    image_size: int
    resize: int
    fit: str = "crop"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "imagenet"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise UserError(f"dataset.fit: must be {' or '.join(FITS)}, got {self.fit!r}")
        if self.resize < self.image_size or (self.fit == "squash" and self.resize != self.image_size):
            raise ValueError(f"resize {self.resize} does not fit image size {self.image_size} ({self.fit})")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def of(cls, image_size: int, fit: str = "crop", crop_pct: float = IMAGENET_CROP_PCT,
           interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
           source: str = "imagenet") -> Preprocessing:
        """Resize side R = floor(S / crop_pct) (timm's rule; torchvision's 224 → 256 is crop_pct 0.875)."""
        if not 0 < crop_pct <= 1:
            raise UserError(f"dataset.crop_pct: must be in (0, 1], got {crop_pct}")
        resize = int(image_size) if fit == "squash" else max(int(image_size), math.floor(image_size / crop_pct))
        return cls(int(image_size), resize, fit, interpolation, tuple(mean), tuple(std), source)

    @classmethod
    def legacy(cls, image_size: int) -> Preprocessing:
        """What lora-cls did before each model had its own: squashed to S × S, bilinear, ImageNet statistics (runs
        whose adapter metadata records no preprocessing were trained so)."""
        return cls(int(image_size), int(image_size), "squash")

    @property
    def crop_pct(self) -> float:
        return self.image_size / self.resize

    @property
    def geometry(self) -> Geometry:
        """What the decoded-image cache stores: the R × R square (crop) or the S × S image (squash)."""
        return Geometry(self.resize, self.image_size if self.fit == "crop" else None, self.interpolation)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "crop_pct": round(self.crop_pct, 6)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, image_size: int) -> Preprocessing:
        """From adapter metadata or model.json; files from before model-specific preprocessing: `legacy`."""
        if not data:
            return cls.legacy(image_size)
        fields = {k: data[k] for k in ("image_size", "resize", "fit", "interpolation", "mean", "std", "source")
                  if k in data}
        return cls(**fields)

    def describe(self) -> str:
        how = (f"short side to {self.resize} ({self.interpolation}), centre crop {self.image_size}"
               if self.fit == "crop" else f"squashed to {self.image_size} ({self.interpolation})")
        stats = "/".join(f"{m:g}" for m in self.mean) + " ± " + "/".join(f"{s:g}" for s in self.std)
        return f"{how}; mean ± std {stats} ({self.source})"


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
              ) -> torch.Tensor:
    """uint8 or float (N, 3, H, W) in [0, 255] → float32 (N, 3, H, W), (x/255 − mean) / std per channel, in the
    memory format of `x` (channels_last stays channels_last)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255
    return like((x.float() - m) / s, x)


def like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`out` in the memory format of `ref` (channels_last or contiguous)."""
    if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centred size × size crop of a batch (N, C, H, W), at torchvision's CenterCrop offsets."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    top, left = centre_offset(h, size), centre_offset(w, size)
    return x[..., top:top + size, left:left + size]


class EvalTransform(nn.Module):
    """A stored batch (uint8 (N, 3, R, R)) → the model's input: the centre S × S crop, normalised, on the batch's
    device (evaluation, prediction, and training batches of the `none` augmentation)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.preprocessing
        return normalize(centre_crop(x, p.image_size), p.mean, p.std)

    def extra_repr(self) -> str:
        return self.preprocessing.describe()
