"""Decoding images (docs/DESIGN.md §5): the one image-file rule, any image file to uint8 RGB, and its errors.

`is_image` decides which files are images everywhere (layout scans, lora-predict inputs). `decode_image` is
the one decoder of training, evaluation, prediction and the data check: EXIF orientation applied, any PIL
mode made RGB, resized. Undecodable files raise `UnreadableImage` (one file) or `UndecodableImages` (all
of a split). torch is imported on the first decode only, so the layout readers can use `is_image` without it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from lora_cls.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
FILE_NOT_FOUND = "file not found"  # the reason given for a listed image that does not exist


def is_image(name: str) -> bool:
    """Whether a file (its name, or a path) counts as an image: a known extension, any case, and not hidden.

    Hidden files are never images: macOS zips carry `._name.jpg` resource forks that look like images by
    extension but are not decodable.
    """
    path = Path(name)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def io_threads() -> int:
    """Threads for decoding/reading images: PIL releases the GIL while decoding and resizing, so threads scale
    with cores (up to 8)."""
    return max(1, min(8, os.cpu_count() or 1))


class UnreadableImage(UserError):
    """A file that PIL cannot decode as an image; `.path` names it (None when re-raised by a worker)."""

    def __init__(self, path: str | Path, reason: str = "") -> None:
        text = str(path)
        if "\nOriginal Traceback" in text:
            # Re-raised in the main process by a DataLoader worker, which passes the formatted traceback as
            # the only argument; its last line is our own message, which the CLI can print as one line.
            self.path, self.reason = None, reason
            super().__init__(text.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1])
            return
        self.path = text
        self.reason = reason
        detail = f" ({reason})" if reason else ""
        super().__init__(f"cannot decode image {self.path}{detail}; replace or remove the file, "
                         "or set dataset.skip_bad=true to skip undecodable files")


# What PIL raises for files that are not (or no longer) images.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)

# PIL's own guard against decompression bombs (it warns above this many pixels and refuses above twice as many)
# is replaced by one limit, `dataset.max_image_pixels`, checked from the header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = None


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise _TooLarge(f"{width}x{height} = {width * height:,} pixels, over dataset.max_image_pixels="
                        f"{max_pixels:,} (a guard against decompression bombs); set dataset.max_image_pixels=null "
                        "(or a larger number) to allow large images")


class _TooLarge(ValueError):
    pass


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Alpha is composited over white; 16/32-bit integer greys are scaled
    from the 0–65535 range (a plain convert would clip them to white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image).astype(np.float32)
        grey = np.clip(grey, 0, 65535) / 257.0
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        grey = np.asarray(image).astype(np.float32)
        grey = grey * 255.0 if np.nanmax(grey) <= 1.0 else grey
        grey = np.nan_to_num(grey, nan=0.0)
        return Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# Bumped whenever decode_array's output for the same file changes: it is part of the decoded-image cache key.
DECODER_VERSION = 1
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Geometry:
    """How an image file becomes the uint8 square (size × size) a split stores (docs/DESIGN.md §5).

    `crop` None: the whole image squashed to size × size (aspect ratio not kept; lora-cls before round 22).
    `crop` = S: the short side resized to `size` (torchvision's Resize(size)) and the size × size square cut so that
    the centred S × S crop inside it (`centre_offset`) is exactly torchvision's CenterCrop(S) of the resized
    image; training's random crops are taken within the square. `interpolation`: the resize filter (PIL's,
    antialiased).
    """

    size: int
    crop: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in FILTERS:
            raise UserError(f"interpolation must be one of {', '.join(FILTERS)}, got {self.interpolation!r}")
        if self.crop is not None and not 0 < self.crop <= self.size:
            raise ValueError(f"crop {self.crop} must be in (0, size={self.size}]")

    def key(self) -> list:
        """Its part of the decoded-image cache key (the squash at bilinear keeps the key entries had before)."""
        return [self.size] if self.crop is None and self.interpolation == "bilinear" else \
            [self.size, self.crop, self.interpolation]

    def apply(self, rgb: Image.Image) -> Image.Image:
        """An RGB image resized and cut to size × size."""
        size, resample = self.size, FILTERS[self.interpolation]
        if self.crop is None:
            return rgb if rgb.size == (size, size) else rgb.resize((size, size), resample)
        w, h = rgb.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)  # torchvision's Resize(size)
        if new != (w, h):
            rgb = rgb.resize(new, resample)
        left, top = (_square_offset(n, size, self.crop) for n in new)
        return rgb.crop((left, top, left + size, top + size))


def centre_offset(size: int, crop: int) -> int:
    """Where torchvision's CenterCrop(crop) starts in a side of `size` pixels."""
    return int(round((size - crop) / 2.0))


def _square_offset(length: int, size: int, crop: int) -> int:
    """The start of the size-long square in a side of `length`, placed so that the crop-long centre crop of the
    square (`centre_offset(size, crop)`) starts where CenterCrop(crop) of the whole side starts."""
    return min(max(centre_offset(length, crop) - centre_offset(size, crop), 0), length - size)


def _geometry(size: int | Geometry) -> Geometry:
    return size if isinstance(size, Geometry) else Geometry(int(size))


def decode_image(path: str | Path, size: int | Geometry, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode `path` to a uint8 tensor (3, S, S): EXIF orientation applied, any mode made RGB, then `size` (a
    Geometry; an int S squashes the image to S × S with antialiased bilinear filtering). Raises UnreadableImage
    (also for an image of more than `max_pixels` pixels; None: no limit)."""
    import torch  # here, not at the top: the layout readers import this module for `is_image` without torch

    return torch.from_numpy(decode_array(path, size, max_pixels)).permute(2, 0, 1).contiguous()


def decode_array(path: str | Path, size: int | Geometry, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_image` as a uint8 numpy array (S, S, 3), without torch (the cache's decoding processes)."""
    geometry = _geometry(size)
    size = geometry.size
    try:
        with Image.open(path) as image:
            _check_pixels(image, max_pixels)
            image = ImageOps.exif_transpose(image)
            pixels = np.array(geometry.apply(_to_rgb(image)), dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage(path, FILE_NOT_FOUND) from None
    except _TooLarge as e:
        raise UnreadableImage(path, str(e)) from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from e
    if pixels.shape != (size, size, 3):
        raise UnreadableImage(path, f"decoded to shape {pixels.shape}")
    return pixels


def verify_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Cheap check without decoding pixels (PIL open + verify): None if fine, else the reason."""
    try:
        with Image.open(path) as image:
            _check_pixels(image, max_pixels)
            image.verify()
    except FileNotFoundError:
        return FILE_NOT_FOUND
    except _TooLarge as e:
        return str(e)
    except _DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


class UndecodableImages(UserError):
    """Several files that are not decodable images; `.bad` holds (relative path, reason) pairs (all of them;
    the message lists the first LISTED)."""

    LISTED = 20

    def __init__(self, bad: Sequence[tuple[str, str]], root: str | Path) -> None:
        self.bad = list(bad)
        self.root = Path(root)
        n, missing = len(self.bad), sum(reason == FILE_NOT_FOUND for _, reason in self.bad)
        lines = [f"  {path}: {reason}" for path, reason in self.bad[:self.LISTED]]
        if n > self.LISTED:
            lines.append(f"  ... and {n - self.LISTED} more")
        if missing == n:
            # Typically a run evaluated after its data moved (splits.json names files relative to the root).
            head = (f"{n} image file(s) of the split are missing under {self.root}; if the data moved, point "
                    "dataset.root at it, or set dataset.skip_bad=true to skip them")
        else:
            what = f" ({missing} missing, {n - missing} not decodable)" if missing else ""
            head = (f"{n} undecodable image file(s){what} under {self.root}; replace or remove them, or set "
                    "dataset.skip_bad=true to skip them")
        super().__init__(head + ":\n" + "\n".join(lines))


