"""Datasets: on-disk layouts → splits → decoded uint8 tensors → DataLoaders (DESIGN.md §5).

The flow is one way: `prepare_splits(cfg)` reads a layout and returns a `DatasetSplits` (relative paths and
label indices, JSON-serialisable as the run's splits.json); `build_loaders(splits, cfg, ...)` decodes the
images into `ImageDataset`s and wraps them in DataLoaders. Batches are uint8 (N, 3, S, S); normalisation and
augmentation happen on the batch, on the training device (`lora_cls.augment`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lora_cls.errors import UserError

log = logging.getLogger(__name__)

Sample = tuple[str, int]
"""(path relative to the dataset root, POSIX separators; label index into `classes`)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SPLIT_NAMES = ("train", "val", "test")
MISSING = "file not found"  # the reason given for a listed image that does not exist

SYNTHETIC_MARKER = ".synthetic.json"
# Bump when the picture generator changes: an existing set of another version is then refused, never replaced.
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("parasitized", "uninfected")
SMOKING_CLASSES = ["notsmoking", "smoking"]
SMOKING_SPLIT_DIRS = {"train": "Training", "val": "Validation", "test": "Testing"}
SMOKING_PUBLISHED_COUNTS = {"train": 716, "val": 180, "test": 224}
MALARIA_CLASSES = ["Parasitized", "Uninfected"]


# --------------------------------------------------------------------------------------------- splits


@dataclass
class DatasetSplits:
    """The split a run uses: relative paths and labels per split, plus what was left out and why.

    `skipped` lists undecodable files dropped with `skip_bad=true`; `ignored` counts non-image files
    (Thumbs.db, .txt, hidden files) that the layout scan passed over.
    """

    root: Path
    classes: list[str]
    positive_class: str | None
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[str] = field(default_factory=list)
    ignored: int = 0

    def split(self, name: str) -> list[Sample]:
        """The samples of split `name` ("train", "val" or "test"; "all" is the three together)."""
        if name == "all":
            return self.train + self.val + self.test
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def positive_index(self) -> int | None:
        """Label index of `positive_class` (None when there is none)."""
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (the run folder's splits.json)."""
        return {
            "root": str(self.root),
            "classes": list(self.classes),
            "positive_class": self.positive_class,
            **{name: [path for path, _ in self.split(name)] for name in SPLIT_NAMES},
            "labels": {name: [label for _, label in self.split(name)] for name in SPLIT_NAMES},
            "skipped": list(self.skipped),
            "ignored": self.ignored,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: str | Path | None = None) -> DatasetSplits:
        """Inverse of `to_json`; `root` replaces the stored root (the same split on another copy of the data)."""
        try:
            classes = [str(c) for c in d["classes"]]
            splits = {}
            for name in SPLIT_NAMES:
                paths, labels = d[name], d["labels"][name]
                if len(paths) != len(labels):
                    raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
                if any(not 0 <= int(label) < len(classes) for label in labels):
                    raise ValueError(f"{name}: a label is outside 0..{len(classes) - 1}")
                splits[name] = [(str(p), int(label)) for p, label in zip(paths, labels)]
            positive = d.get("positive_class")
            if positive is not None and positive not in classes:
                raise ValueError(f"positive_class {positive!r} is not one of {classes}")
            return cls(
                root=Path(root if root is not None else d["root"]),
                classes=classes,
                positive_class=positive,
                skipped=[str(p) for p in d.get("skipped", [])],
                ignored=int(d.get("ignored", 0)),
                **splits,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed splits description ({type(e).__name__}: {e}); "
                            "use the splits.json written by lora-train") from e


def write_splits_json(splits: DatasetSplits, path: str | Path) -> None:
    """Write `splits.to_json()` to `path` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(splits.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_splits_json(path: str | Path, root: str | Path | None = None) -> DatasetSplits:
    """Read a splits.json; `root`, when given, replaces the root stored in it."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"splits file {path} does not exist; point to the splits.json of a lora-train run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read splits file {path}: {e}") from e
    if not isinstance(d, dict):
        raise UserError(f"splits file {path} does not hold a JSON object; use the splits.json of a lora-train run")
    return DatasetSplits.from_json(d, root=root)


# --------------------------------------------------------------------------------------------- layouts


class _Layout(NamedTuple):
    """What one layout reader finds: classes, the three splits, and the default positive class."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    ignored: int
    default_positive: str | None


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path, root: Path, recursive: bool) -> tuple[list[str], int]:
    """Image files under `folder` as sorted root-relative POSIX paths, and the number of other files.

    Hidden files are passed over (and counted): macOS zips carry `._name.jpg` resource forks that look like
    images by extension but are not decodable. Hidden folders and `__MACOSX` are not entered.
    """
    images: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if recursive:
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        else:
            dirnames[:] = []
        for name in filenames:
            if name.startswith(".") or not _is_image(name):
                ignored += 1
            else:
                images.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(images), ignored


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _check_fractions(cfg: Any, need_val: bool, need_test: bool) -> tuple[float, float]:
    val, test = float(cfg.val_fraction), float(cfg.test_fraction)
    if need_val and not 0 < val < 1:
        raise UserError(f"dataset.val_fraction={val} must be in (0, 1): this layout has no val split to use")
    if need_test and not 0 < test < 1:
        raise UserError(f"dataset.test_fraction={test} must be in (0, 1): this layout has no test split to use")
    if (val if need_val else 0.0) + (test if need_test else 0.0) >= 1:
        raise UserError(f"dataset.val_fraction + dataset.test_fraction = {val + test} leaves nothing to train on; "
                        "make their sum less than 1")
    return (val if need_val else 0.0), (test if need_test else 0.0)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # Seeded per class by name, so adding a class folder does not reshuffle the others.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(class_name.encode("utf-8"))])


def stratified_split(samples: Sequence[Sample], classes: Sequence[str], val_fraction: float,
                     test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split `samples` into (train, val, test) per class by fraction, seeded and deterministic.

    Per class of n files: round(n·val_fraction) go to val and round(n·test_fraction) to test (at least one
    each when the fraction is > 0, as long as one file is left for train), the rest to train. Each split is
    returned sorted by path.
    """
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, name in enumerate(classes):
        items = sorted(s for s in samples if s[1] == label)
        n = len(items)
        n_val, n_test = _round_half_up(n * val_fraction), _round_half_up(n * test_fraction)
        if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
            n_val = 1
        if test_fraction > 0 and n_test == 0 and n - n_val >= 2:
            n_test = 1
        while n_val + n_test >= n and n_val + n_test > 0:  # keep one for train
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        order = _class_rng(seed, name).permutation(n)
        val += [items[i] for i in order[:n_val]]
        test += [items[i] for i in order[n_val:n_val + n_test]]
        train += [items[i] for i in order[n_val + n_test:]]
    return sorted(train), sorted(val), sorted(test)


def grouped_split(samples: Sequence[Sample], groups: Sequence[str], num_classes: int, val_fraction: float,
                  test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split `samples` into (train, val, test) so that no group is in two splits, stratified by class.

    Greedy: groups are visited in a seeded random order and each goes to the split whose per-class counts it
    brings closest to the targets (fraction × class total; squared error, each class weighted by 1/total).
    Random order rather than largest-first, so that another seed gives another split.
    """
    by_group: dict[str, list[Sample]] = {}
    for sample, group in zip(samples, groups):
        by_group.setdefault(group, []).append(sample)
    names = sorted(by_group)
    counts = np.zeros((len(names), num_classes))
    for g, name in enumerate(names):
        for _, label in by_group[name]:
            counts[g, label] += 1
    totals = np.maximum(counts.sum(0), 1)
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    targets = fractions[:, None] * totals[None, :]
    current = np.zeros_like(targets)
    assignment = np.zeros(len(names), dtype=int)
    for g in np.random.default_rng(int(seed) & 0xFFFFFFFF).permutation(len(names)):
        gain = ((current + counts[g] - targets) ** 2 - (current - targets) ** 2) / totals**2
        s = int(np.argmin(gain.sum(1)))
        assignment[g] = s
        current[s] += counts[g]
    out: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    for g, name in enumerate(names):
        out[assignment[g]].extend(by_group[name])
    return sorted(out[0]), sorted(out[1]), sorted(out[2])


def _read_folder(cfg: Any, root: Path) -> _Layout:
    """`root/{train,val,test}/<class>/**` (val and/or test may be missing) or `root/<class>/**`.

    A missing val or test split is carved out of train by `val_fraction` / `test_fraction` (fractions of
    the train pool), stratified per class and seeded by `split_seed`. Classes are the folder names, sorted.
    Loose files next to the class folders are ignored (and counted).
    """
    present = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    if present and "train" not in present:
        raise UserError(f"{root} has {'/'.join(sorted(present))}/ but no train/ folder; "
                        "use root/{train,val,test}/<class>/* or root/<class>/*")
    class_parent = present.get("train", root)
    classes = _subdirs(class_parent)
    if not classes:
        raise UserError(f"no class folders in {class_parent}; expected root/<class>/* or "
                        "root/{train,val,test}/<class>/* with at least two classes")
    for folder in present.values():
        extra = sorted(set(_subdirs(folder)) - set(classes))
        if extra:
            raise UserError(f"{folder} has class folders {extra} that {class_parent} lacks; "
                            "every class needs training images")
    loose = [p for folder in [root, *present.values()] for p in folder.iterdir() if p.is_file()]
    ignored = sum(1 for p in loose if p.name != SYNTHETIC_MARKER)

    def scan(base: Path) -> list[Sample]:
        nonlocal ignored
        samples: list[Sample] = []
        for label, name in enumerate(classes):
            if (base / name).is_dir():
                files, n_ignored = _list_images(base / name, root, recursive=True)
                ignored += n_ignored
                samples += [(f, label) for f in files]
        return samples

    given = {name: scan(folder) for name, folder in (present or {"train": root}).items()}
    pool = given["train"]
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in pool)]
    if empty and pool:
        raise UserError(f"class folder(s) {empty} in {class_parent} hold no images; "
                        "add images or remove the folder(s)")
    need_val, need_test = "val" not in given, "test" not in given
    if need_val or need_test:
        val_f, test_f = _check_fractions(cfg, need_val, need_test)
        train, val, test = stratified_split(pool, classes, val_f, test_f, cfg.split_seed)
        val, test = given.get("val", val), given.get("test", test)
    else:
        train, val, test = given["train"], given["val"], given["test"]
    default_positive = classes[1] if len(classes) == 2 else None
    return _Layout(classes, train, val, test, ignored, default_positive)


def _read_synthetic(cfg: Any, root: Path) -> _Layout:
    """Generate the synthetic cell set into `root` unless its marker matches, then read it as a folder."""
    syn = cfg.synthetic
    ensure_synthetic(root, int(syn.num_per_class), int(syn.source_size), int(syn.seed))
    layout = _read_folder(cfg, root)
    return layout._replace(default_positive="parasitized")


def _find_dir(candidates: Iterable[Path], predicate: Callable[[Path], bool]) -> Path | None:
    for candidate in candidates:
        if candidate.is_dir() and predicate(candidate):
            return candidate
    return None


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and _is_image(p.name) and not p.name.startswith(".") for p in folder.iterdir())


def _read_smoking(cfg: Any, root: Path) -> _Layout:
    """The Kaggle smoking set: `root/{Training/Training,Validation/Validation,Testing/Testing}/*.jpg`.

    The label is the file-name prefix (`smoking_` or `notsmoking_`); the published split is kept. Some unzip
    tools flatten the doubled folder, so `root/Training/*.jpg` (etc.) is accepted when `root/Training/Training`
    is missing.
    """
    splits: dict[str, list[Sample]] = {}
    ignored = 0
    bad: list[str] = []
    for split, dirname in SMOKING_SPLIT_DIRS.items():
        folder = _find_dir([root / dirname / dirname, root / dirname], _has_images)
        if folder is None:
            raise UserError(f"smoking dataset: no images in {root / dirname / dirname} (nor in {root / dirname}); "
                            "expected the Kaggle layout Training/Training, Validation/Validation, Testing/Testing. "
                            "Download the Kaggle 'smoking' archive and unzip it there (python scripts/download_smoking.py does both; "
                            "see data/README.md), or fix dataset.root")
        files, n_ignored = _list_images(folder, root, recursive=False)
        ignored += n_ignored
        samples = []
        for f in files:
            name = Path(f).name.lower()
            if name.startswith("notsmoking_"):
                samples.append((f, 0))
            elif name.startswith("smoking_"):
                samples.append((f, 1))
            else:
                bad.append(f)
        splits[split] = samples
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UserError(f"smoking dataset: {len(bad)} file(s) in {root} named neither smoking_* nor notsmoking_*: "
                        f"{shown}; rename or remove them (the label is the file-name prefix)")
    counts = {split: len(samples) for split, samples in splits.items()}
    if counts != SMOKING_PUBLISHED_COUNTS:
        log.warning(f"smoking dataset at {root} has {counts} images per split, the published set has "
                    f"{SMOKING_PUBLISHED_COUNTS}; results are not comparable with published numbers")
    return _Layout(list(SMOKING_CLASSES), splits["train"], splits["val"], splits["test"], ignored, "smoking")


def malaria_patient(filename: str) -> str:
    """Patient id of an NIH malaria cell image: the file-name part before `_IMG_` (else the whole stem).

    `C33P1thinF_IMG_20150619_114756a_cell_179.png` → `C33P1thinF`.
    """
    stem = Path(filename).stem
    return stem.split("_IMG_", 1)[0] if "_IMG_" in stem else stem


def _read_malaria(cfg: Any, root: Path) -> _Layout:
    """NIH malaria cells: `root/cell_images/{Parasitized,Uninfected}/*.png` (or `root/{Parasitized,...}`).

    Each class folder holds a Thumbs.db (ignored). Split grouped by patient id (`malaria_patient`) so no
    patient is in two splits, stratified by class, seeded by `split_seed`.
    """
    base = _find_dir([root / "cell_images", root],
                     lambda p: all((p / c).is_dir() for c in MALARIA_CLASSES))
    if base is None:
        raise UserError(f"malaria dataset: {root} holds neither cell_images/Parasitized + cell_images/Uninfected "
                        "nor Parasitized + Uninfected. Download cell_images.zip and unzip it there "
                        "(python scripts/download_malaria.py does both; see data/README.md), or fix dataset.root")
    samples: list[Sample] = []
    ignored = 0
    for label, name in enumerate(MALARIA_CLASSES):
        files, n_ignored = _list_images(base / name, root, recursive=False)
        ignored += n_ignored
        samples += [(f, label) for f in files]
    missing = [c for i, c in enumerate(MALARIA_CLASSES) if not any(label == i for _, label in samples)]
    if missing and samples:
        raise UserError(f"malaria dataset: no images in {', '.join(str(base / c) for c in missing)}; "
                        "re-download or re-extract the dataset")
    val_f, test_f = _check_fractions(cfg, need_val=True, need_test=True)
    groups = [malaria_patient(path) for path, _ in samples]
    train, val, test = grouped_split(samples, groups, len(MALARIA_CLASSES), val_f, test_f, cfg.split_seed)
    for split, items in (("train", train), ("val", val), ("test", test)):
        if items and {label for _, label in items} != set(range(len(MALARIA_CLASSES))):
            raise UserError(f"malaria dataset: the {split} split has only one class with "
                            f"{len(set(groups))} patients; use more data or other dataset.val_fraction/test_fraction")
    return _Layout(list(MALARIA_CLASSES), train, val, test, ignored, "Parasitized")


LAYOUTS: dict[str, Callable[[Any, Path], _Layout]] = {
    "synthetic": _read_synthetic,
    "folder": _read_folder,
    "smoking": _read_smoking,
    "malaria": _read_malaria,
}
_HOW_TO_GET = {
    "folder": "set dataset.root to a folder laid out as root/<class>/* or root/{train,val,test}/<class>/*",
    "smoking": ("download the Kaggle 'smoking' archive and unzip it there with python scripts/download_smoking.py "
                "(see data/README.md), or set dataset.root"),
    "malaria": ("download https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip and unzip it there "
                "with python scripts/download_malaria.py (see data/README.md), or set dataset.root"),
}


def prepare_splits(cfg: Any, need: Sequence[str] = SPLIT_NAMES) -> DatasetSplits:
    """Read (for synthetic: generate, then read) the dataset named by `cfg.name` and split it.

    `cfg` is the dataset config (any attribute-access object: name, root, val_fraction, test_fraction,
    split_seed, positive_class, synthetic.*). Raises UserError for a missing root, no images, fewer than two
    classes, an empty split among `need` (training needs all three; lora-eval only the one it evaluates) or an
    unknown positive class.
    """
    if cfg.name not in LAYOUTS:
        raise UserError(f"unknown dataset.name={cfg.name!r}; choose one of {sorted(LAYOUTS)}")
    root = Path(str(cfg.root)).expanduser().resolve()
    if cfg.name != "synthetic":
        if not root.exists():
            raise UserError(f"dataset root {root} does not exist; {_HOW_TO_GET[cfg.name]}")
        if not root.is_dir():
            raise UserError(f"dataset root {root} is not a folder; {_HOW_TO_GET[cfg.name]}")
    layout = LAYOUTS[cfg.name](cfg, root)
    total = len(layout.train) + len(layout.val) + len(layout.test)
    if total == 0:
        raise UserError(f"no images found in {root} ({layout.ignored} non-image files ignored); image files "
                        f"end in {', '.join(sorted(IMAGE_EXTENSIONS))}")
    if len(layout.classes) < 2:
        raise UserError(f"{root} has {len(layout.classes)} class ({layout.classes}); a classifier needs at "
                        "least two class folders")
    for split in need:
        if not getattr(layout, split):
            raise UserError(f"the {split} split of {root} is empty ({total} images in all); add images, raise "
                            "dataset.val_fraction/test_fraction (lora-train) or use split=all (lora-eval)")
    positive = cfg.positive_class if cfg.positive_class is not None else layout.default_positive
    if positive is not None and positive not in layout.classes:
        raise UserError(f"dataset.positive_class={positive!r} is not a class of {root}; "
                        f"choose one of {layout.classes} or null")
    return DatasetSplits(root=root, classes=list(layout.classes), positive_class=positive, train=layout.train,
                         val=layout.val, test=layout.test, skipped=[], ignored=layout.ignored)


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Warnings this module logs inside the block, returned instead of printed (for reports that list them)."""
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    handler = Collect(logging.WARNING)
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        yield notes
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


# --------------------------------------------------------------------------------------------- synthetic


def synthetic_counts(num_per_class: int) -> dict[str, int]:
    """Images per class in each split of the synthetic set: 70/15/15 %, at least one each."""
    if num_per_class < 3:
        raise UserError(f"dataset.synthetic.num_per_class={num_per_class} must be at least 3 "
                        "(one image per class in each split)")
    n_val = max(1, _round_half_up(0.15 * num_per_class))
    n_test = max(1, _round_half_up(0.15 * num_per_class))
    return {"train": num_per_class - n_val - n_test, "val": n_val, "test": n_test}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise with ~`cells` blobs across, zero mean, unit-ish amplitude."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def render_cell(rng: np.random.Generator, size: int, parasitized: bool) -> np.ndarray:
    """One synthetic blood-cell picture, (size, size, 3) uint8 RGB.

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

    def spot(colour: Sequence[float], alpha: float, spot_radius: float, ring: bool) -> None:
        nonlocal image
        rho = np.sqrt(rng.uniform(0, 0.55 ** 2))  # uniform over the inner disc of the cell
        phi = rng.uniform(0, 2 * np.pi)
        sx = cx + rho * radius * np.cos(phi)
        sy = cy + rho * radius * ellipticity * np.sin(phi)
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
            spot(colour, rng.uniform(0.85, 1.0), rng.uniform(0.06, 0.10) * s, ring=bool(rng.random() < 0.5))
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
    marker = {"generator": "lora_cls.data.render_cell", "version": SYNTHETIC_VERSION,
              "num_per_class": num_per_class, "source_size": source_size, "seed": seed}
    (root / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


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


# --------------------------------------------------------------------------------------------- decoding


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


def decode_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode `path` to a uint8 tensor (3, size, size): EXIF orientation applied, any mode made RGB,
    resized with antialiased bilinear filtering (aspect ratio not kept). Raises UnreadableImage."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            pixels = np.array(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage(path, MISSING) from None
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from e
    if pixels.shape != (size, size, 3):
        raise UnreadableImage(path, f"decoded to shape {pixels.shape}")
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def verify_image(path: str | Path) -> str | None:
    """Cheap check without decoding pixels (PIL open + verify): None if fine, else the reason."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        return MISSING
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
        n, missing = len(self.bad), sum(reason == MISSING for _, reason in self.bad)
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


def _decode_threads() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale with cores.
    return max(1, min(8, os.cpu_count() or 1))


class ImageDataset(Dataset):
    """Images of one split as `(uint8 tensor (3, S, S), int label)`.

    When `cache` is on and N·3·S·S bytes fit in `max_cache_bytes`, every image is decoded once at
    construction into one uint8 tensor (N, 3, S, S); otherwise images are decoded in `__getitem__` after a
    verification pass (PIL open + verify, which catches missing, non-image and most corrupt files; damage
    that only decoding finds raises UnreadableImage from `__getitem__`). Undecodable files raise one
    UserError listing them all, or with `skip_bad=True` are dropped and listed in `.skipped`.
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], image_size: int, cache: bool = True,
                 max_cache_bytes: int = 4 * 2**30, skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.image_size = int(image_size)
        self.skipped: list[str] = []
        samples = list(samples)
        self.cached = cache and len(samples) * 3 * self.image_size**2 <= max_cache_bytes
        self._images: torch.Tensor | None = None
        if self.cached:
            images, bad = self._decode_all(samples)
        else:
            bad = self._verify_all(samples)
        if bad:
            if not skip_bad:
                raise UndecodableImages(bad, self.root)
            bad_paths = {path for path, _ in bad}
            keep = [i for i, (path, _) in enumerate(samples) if path not in bad_paths]
            self.skipped = [path for path, _ in bad]
            samples = [samples[i] for i in keep]
            if self.cached:
                images = images[keep]
        if self.cached:
            self._images = images
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    def _decode_all(self, samples: list[Sample]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        s = self.image_size
        images = torch.empty((len(samples), 3, s, s), dtype=torch.uint8)
        bad: list[tuple[str, str]] = []

        def load(path: str) -> torch.Tensor | UnreadableImage:
            try:
                return decode_image(self.root / path, s)
            except UnreadableImage as e:
                return e

        paths = [path for path, _ in samples]
        with ThreadPoolExecutor(_decode_threads()) as pool:
            results = pool.map(load, paths)
            for i, result in enumerate(tqdm(results, total=len(paths), desc=f"decoding {len(paths)} images",
                                            unit="img", leave=False, disable=None)):
                if isinstance(result, UnreadableImage):
                    bad.append((paths[i], result.reason))
                else:
                    images[i] = result
        return images, bad

    def _verify_all(self, samples: list[Sample]) -> list[tuple[str, str]]:
        paths = [path for path, _ in samples]
        with ThreadPoolExecutor(_decode_threads()) as pool:
            reasons = list(tqdm(pool.map(lambda p: verify_image(self.root / p), paths), total=len(paths),
                                desc=f"checking {len(paths)} images", unit="img", leave=False, disable=None))
        return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if self._images is not None:
            return self._images[index], label
        return decode_image(self.root / path, self.image_size), label


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random are not, so derive theirs.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(splits: DatasetSplits, cfg: Any, batch_size: int, num_workers: int, seed: int,
                  pin_memory: bool = False) -> dict[str, DataLoader]:
    """DataLoaders for "train", "val" and "test", yielding (uint8 (B, 3, S, S), int64 (B,)) batches.

    The whole dataset is cached in memory when `cfg.cache.enabled` and all three splits fit in
    `cfg.cache.max_gb`; then loading runs in the main process (indexing a tensor is cheaper than worker
    IPC) whatever `num_workers` says. Train is shuffled by a `torch.Generator` seeded with `seed` and drops
    the last partial batch only when there is more than one batch. A `batch_size` larger than the train set
    is lowered to it with a warning: with drop_last it would otherwise give zero steps per epoch.

    Undecodable files raise UserError, or with `cfg.skip_bad` are dropped: they are removed from
    `splits.train/val/test` and listed in `splits.skipped` (so build loaders before writing splits.json).
    """
    size = int(cfg.image_size)
    total_bytes = sum(len(splits.split(name)) for name in SPLIT_NAMES) * 3 * size * size
    max_bytes = int(float(cfg.cache.max_gb) * 2**30)
    cache = bool(cfg.cache.enabled) and total_bytes <= max_bytes
    datasets: dict[str, ImageDataset] = {}
    bad: list[tuple[str, str]] = []
    for name in SPLIT_NAMES:
        try:
            datasets[name] = ImageDataset(splits.root, splits.split(name), size, cache=cache,
                                          max_cache_bytes=max_bytes, skip_bad=bool(cfg.skip_bad))
        except UndecodableImages as e:
            bad += e.bad  # keep checking the other splits: one error listing every bad file
    if bad:
        raise UndecodableImages(bad, splits.root)
    for name, dataset in datasets.items():
        if dataset.skipped:
            setattr(splits, name, list(dataset.samples))
            splits.skipped = sorted(set(splits.skipped) | set(dataset.skipped))
            log.warning(f"skipped {len(dataset.skipped)} undecodable image(s) in the {name} split "
                        f"(dataset.skip_bad=true): {', '.join(dataset.skipped[:5])}"
                        + (" ..." if len(dataset.skipped) > 5 else ""))
        if len(dataset) == 0:
            raise UserError(f"the {name} split is empty after skipping undecodable images; fix the files")

    n_train = len(datasets["train"])
    if batch_size > n_train:
        log.warning(f"batch_size={batch_size} is larger than the train set ({n_train} images); using "
                    f"batch_size={n_train}")
        batch_size = n_train
    workers = 0 if cache else int(num_workers)
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory,
                              "worker_init_fn": _seed_worker if workers > 0 else None,
                              "persistent_workers": workers > 0}
    loaders: dict[str, DataLoader] = {}
    for offset, name in enumerate(SPLIT_NAMES):
        # Every loader gets its own generator: iterating one without it would consume the global torch RNG.
        generator = torch.Generator().manual_seed(int(seed) + offset)
        is_train = name == "train"
        loaders[name] = DataLoader(datasets[name], batch_size=batch_size, shuffle=is_train,
                                   drop_last=is_train and n_train > batch_size, generator=generator, **common)
    return loaders
