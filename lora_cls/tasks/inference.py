"""The Python API: a run, an adapter file or a `lora-export` folder as a ready classifier (`load`), which
predicts on PIL images, image files or tensors, with the run's classes and preprocessing, and exports itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from lora_cls.data.augment import normalize
from lora_cls.errors import UserError

ImageInput = Any  # a PIL image, a path, a (3, H, W) / (N, 3, H, W) tensor, or a sequence of these


class Classifier:
    """A trained classifier in eval mode on `device`, adapters merged into plain layers.

    `classes` are the class names in logit order, `image_size` the side the images are resized to; `model` is the
    plain torch module (float32 input (N, 3, S, S), ImageNet-normalised); `checkpoint` is the adapter file it came
    from (None for a `lora-export` folder).
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], image_size: int, checkpoint: Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.classes = [str(c) for c in classes]
        self.image_size = int(image_size)
        self.checkpoint = checkpoint

    def __repr__(self) -> str:
        return (f"Classifier({type(self.model).__name__}, classes={self.classes}, image_size={self.image_size}, "
                f"device={self.device})")

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images → the model's input: float32 (N, 3, S, S), resized and ImageNet-normalised as in training.

        PIL images and paths are decoded as training does (EXIF orientation, RGB, antialiased bilinear resize);
        uint8 tensors are taken as 0–255 and float tensors as 0–1, (3, H, W) or (N, 3, H, W), RGB.
        """
        batch = torch.stack([self._uint8(image) for image in _as_list(images)])
        return normalize(batch).to(self.device)

    @torch.inference_mode()
    def probabilities(self, images: ImageInput) -> torch.Tensor:
        """Class probabilities, float32 (N, K) on the CPU, columns in the order of `classes`."""
        from lora_cls.engine.loss import plain_logits

        return plain_logits(self.model(self.preprocess(images))).float().softmax(dim=1).cpu()

    def predict(self, images: ImageInput) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes[i] for i in self.probabilities(images).argmax(dim=1).tolist()]

    def export(self, format: str, folder: str | Path, **options: Any) -> dict[str, Any]:
        """`lora-export` from Python: write `format` (torchvision, lowrank, onnx, torchscript) into `folder`,
        verified against the trained model; returns export.json's content (options: low_rank, tolerance,
        images, opset)."""
        if self.checkpoint is None:
            raise UserError("this classifier was loaded from an export; export from the run or its adapter file")
        from lora_cls.tasks.export import export_checkpoint

        return export_checkpoint(self.checkpoint, format, folder, **options)

    def _uint8(self, image: Any) -> torch.Tensor:
        size = self.image_size
        if isinstance(image, (str, Path)):
            from lora_cls.data.decode import decode_image

            return decode_image(image, size, None)
        if isinstance(image, Image.Image):
            from lora_cls.data.decode import _to_rgb

            rgb = _to_rgb(ImageOps.exif_transpose(image))
            return torch.from_numpy(np.array(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)).permute(2, 0, 1)
        if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
            x = image.detach().cpu()
            x = x.float() if x.dtype == torch.uint8 else (x.float() * 255).clamp(0, 255)
            if x.shape[1:] != (size, size):
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            return x.round().to(torch.uint8)
        raise UserError(f"cannot classify a {type(image).__name__}"
                        + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else "")
                        + "; give PIL images, image paths, or RGB tensors (3, H, W) / (N, 3, H, W)")


def _as_list(images: ImageInput) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise UserError("no images to classify")
        return list(images)
    return [images]


def load(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A lora-train run folder, its adapter file, or a lora-export folder (torchvision or lowrank) as a ready
    Classifier: the model rebuilt from the file alone, adapters merged (W' = d·W + s·BA), in eval mode."""
    path = Path(path).expanduser()
    from lora_cls.tasks.export import MODEL_JSON, load_exported

    if (path / MODEL_JSON).is_file():
        model, desc = load_exported(path)
        return Classifier(model, desc["classes"], desc["image_size"], None, device)
    from lora_cls.adapters.inject import merge_lora
    from lora_cls.runs.checkpoint import resolve_checkpoint
    from lora_cls.tasks.build import load_model_from_checkpoint

    adapter = resolve_checkpoint(path)
    model, train_cfg, meta = load_model_from_checkpoint(adapter)
    return Classifier(merge_lora(model.float()), meta["classes"], int(train_cfg.dataset.image_size), adapter, device)
