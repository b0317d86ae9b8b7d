"""The synthetic blood-cell set (docs/DESIGN.md §5): generated, deterministic, never replaced.

`ensure_synthetic` makes a dataset root hold the set for given parameters (generating it into a temp folder
that is renamed into place) and refuses to touch a folder holding anything else; `generate_synthetic` writes
`{train,val,test}/<class>/NNNN.png` and the `.synthetic.json` marker; `render_cell` draws one picture.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_cls.data.splits import SPLIT_NAMES, round_half_up
from lora_cls.errors import UserError

SYNTHETIC_MARKER = ".synthetic.json"
# Bump when the picture generator changes: an existing set of another version is then refused, never replaced.
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("parasitized", "uninfected")


def synthetic_counts(num_per_class: int) -> dict[str, int]:
    """Images per class in each split of the synthetic set: 70/15/15 %, at least one each."""
    if num_per_class < 3:
        raise UserError(f"dataset.synthetic.num_per_class={num_per_class} must be at least 3 "
                        "(one image per class in each split)")
    n_val = max(1, round_half_up(0.15 * num_per_class))
    n_test = max(1, round_half_up(0.15 * num_per_class))
    return {"train": num_per_class - n_val - n_test, "val": n_val, "test": n_test}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise with ~`cells` blobs across, zero mean, unit-ish amplitude."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def render_cell(rng: np.random.Generator, size: int, parasitized: bool,
                inclusions: list[tuple[float, float, float]] | None = None) -> np.ndarray:
    """One synthetic blood-cell picture, (size, size, 3) uint8 RGB; a parasitized cell's dark inclusions are
    appended to `inclusions` as (x, y, radius) in pixels when a list is given (the picture is the same).

    Light background; a pink/purple textured, irregular ellipse with a slightly darker rim; parasitized
    cells carry one or two dark purple inclusions (a ring or a blob, radius ≈ 6–10 % of the image so they
    survive downscaling to 32 px); uninfected cells may carry faint pale spots and a faint pink smudge.
    """
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    background = np.array([238, 228, 232], np.float32) + rng.uniform(-10, 10, 3)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    image += 3.0 * _smooth_noise(rng, size, 4)[..., None]

    cx, cy = s / 2 + rng.uniform(-0.08, 0.08, 2) * s
    radius = rng.uniform(0.27, 0.38) * s
    ellipticity = rng.uniform(0.78, 1.0)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * cos + (yy - cy) * sin) / radius
    v = (-(xx - cx) * sin + (yy - cy) * cos) / (radius * ellipticity)
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    wobble = 1 + 0.04 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)) + 0.03 * np.sin(5 * theta + rng.uniform(0, 2 * np.pi))
    edge = r / wobble
    # Soft edge about one pixel wide at any size: the cell is anti-aliased rather than jagged.
    inside = 1 / (1 + np.exp(np.clip((edge - 1) * radius / 0.7, -30, 30)))

    cell_colour = np.array([214, 150, 186], np.float32) + rng.uniform(-18, 18, 3)
    texture = 7.0 * _smooth_noise(rng, size, 6) + 3.0 * _smooth_noise(rng, size, 12)
    cell = cell_colour + texture[..., None]
    rim = np.exp(-(((edge - 0.93) / 0.07) ** 2))
    cell -= 22.0 * rim[..., None]
    image = image * (1 - inside[..., None]) + cell * inside[..., None]

    def spot(colour: Sequence[float], alpha: float, spot_radius: float, ring: bool, record: bool = False) -> None:
        nonlocal image
        rho = np.sqrt(rng.uniform(0, 0.55 ** 2))  # uniform over the inner disc of the cell
        phi = rng.uniform(0, 2 * np.pi)
        sx = cx + rho * radius * np.cos(phi)
        sy = cy + rho * radius * ellipticity * np.sin(phi)
        if record and inclusions is not None:
            inclusions.append((float(sx), float(sy), float(spot_radius)))
        d = np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2) / spot_radius
        if ring:
            weight = np.exp(-(((d - 0.75) / 0.32) ** 2))
        else:
            weight = np.exp(-(d**2) * 1.6)
        a = alpha * weight * inside
        image = image * (1 - a[..., None]) + np.asarray(colour, np.float32) * a[..., None]

    if parasitized:
        for _ in range(rng.integers(1, 3)):
            colour = np.array([78, 28, 104]) + rng.uniform(-15, 15, 3)
            spot(colour, rng.uniform(0.85, 1.0), rng.uniform(0.06, 0.10) * s, ring=bool(rng.random() < 0.5),
                 record=True)
    else:
        for _ in range(rng.integers(0, 4)):
            spot([250, 225, 240], rng.uniform(0.25, 0.5), rng.uniform(0.05, 0.10) * s, ring=False)
        if rng.random() < 0.4:
            spot([180, 110, 160], rng.uniform(0.2, 0.35), rng.uniform(0.06, 0.10) * s, ring=False)

    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def generate_synthetic(root: str | Path, num_per_class: int, source_size: int, seed: int) -> None:
    """Write the synthetic set into `root` (which must not exist): `{train,val,test}/<class>/NNNN.png`.

    Image i of class c is drawn from its own Generator seeded (seed, c, i), so the set is deterministic and
    a file does not depend on how many others were made. The marker `.synthetic.json` is written last.
    """
    root = Path(root)
    counts = synthetic_counts(num_per_class)
    width = max(4, len(str(num_per_class - 1)))
    root.mkdir(parents=True)
    for label, name in enumerate(SYNTHETIC_CLASSES):
        index = 0
        for split in SPLIT_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for _ in range(counts[split]):
                rng = np.random.default_rng([seed & 0xFFFFFFFF, label, index])
                pixels = render_cell(rng, source_size, parasitized=name == "parasitized")
                Image.fromarray(pixels).save(folder / f"{index:0{width}d}.png", compress_level=1)
                index += 1
    # "lora_cls.data.render_cell": the generator's name from before lora_cls.data became a package, kept so
    # that the markers of new sets read like those of the sets already on disk.
    marker = {"generator": "lora_cls.data.render_cell", "version": SYNTHETIC_VERSION,
              "num_per_class": num_per_class, "source_size": source_size, "seed": seed}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def synthetic_inclusions(index: int, label: int, source_size: int, seed: int) -> list[tuple[float, float, float]]:
    """Where image `index` of class `label` of a generated set has its dark inclusions: (x, y, radius) in the
    pixels of its file (empty for an uninfected cell), drawn again from the image's own seed."""
    found: list[tuple[float, float, float]] = []
    rng = np.random.default_rng([seed & 0xFFFFFFFF, label, index])
    render_cell(rng, source_size, SYNTHETIC_CLASSES[label] == "parasitized", found)
    return found


def _synthetic_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def ensure_synthetic(root: str | Path, num_per_class: int, source_size: int, seed: int) -> bool:
    """Make `root` hold the synthetic set for these parameters; True when it was generated.

    An existing set is never replaced: earlier runs' splits.json name its files, and lora-eval of those runs
    would silently measure other images. A set made with other parameters (or by another generator version),
    and a folder with other content and no marker, raise UserError. Generation goes into a sibling temp folder
    that is renamed into place, so an interrupted run never leaves a half-written set that looks complete.
    """
    root = Path(root)
    wanted = {"version": SYNTHETIC_VERSION, "num_per_class": num_per_class, "source_size": source_size,
              "seed": seed}

    def existing() -> bool:  # True: the wanted set is there; False: nothing (or an empty folder) is there
        if not root.exists():
            return False
        if not root.is_dir():
            raise UserError(f"dataset root {root} is a file; the synthetic set needs a folder there")
        marker = _synthetic_marker(root)
        if marker is None:
            if any(root.iterdir()):
                raise UserError(f"{root} is not empty and is not a synthetic set (no {SYNTHETIC_MARKER}); "
                                "set dataset.root to an empty or new folder for the synthetic data")
            return False
        if all(marker.get(k) == v for k, v in wanted.items()):
            return True
        have = ", ".join(f"{k}={marker.get(k)}" for k in wanted)
        asked = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise UserError(f"{root} holds a synthetic set made with {have}, not {asked}; it is kept because runs "
                        f"that used it refer to its files. Set dataset.root to a new folder for these settings "
                        f"(e.g. dataset.root={root}_n{num_per_class}_s{source_size}_seed{seed}), or delete {root}")

    if existing():
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.generating."))
    try:
        generate_synthetic(tmp / "set", num_per_class, source_size, seed)
        if existing():
            return False  # a concurrent run (a sweep job) finished the same set first
        if root.exists():
            root.rmdir()  # empty (checked by existing()); os.replace needs it gone
        os.replace(tmp / "set", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
