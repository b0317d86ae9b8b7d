"""Dataset layouts (docs/DESIGN.md §5): the registry of dataset names, their readers, and `prepare_splits`.

`LAYOUTS` is the only list of dataset names in the project (`DATASET_NAMES`; the config checks use it, and
lora_cls/conf/dataset/ has one yaml file per name). Each reader turns a folder laid out like the real data
set into classes and three splits; `prepare_splits(cfg)` runs the one `cfg.name` names and checks the result.
This module does not import torch: config checks and the download scripts use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lora_cls.data.decode import IMAGE_EXTENSIONS, is_image
from lora_cls.data.splits import (
    SPLIT_NAMES,
    DatasetSplits,
    Sample,
    check_fractions,
    grouped_split,
    stratified_split,
)
from lora_cls.data.synthetic import SYNTHETIC_MARKER, ensure_synthetic
from lora_cls.errors import UserError

# The one logger of all lora_cls.data modules, so that `collected_warnings` hears every one of them.
log = logging.getLogger("lora_cls.data")

SMOKING_CLASSES = ["notsmoking", "smoking"]
SMOKING_SPLIT_DIRS = {"train": "Training", "val": "Validation", "test": "Testing"}
SMOKING_PUBLISHED_COUNTS = {"train": 716, "val": 180, "test": 224}
MALARIA_CLASSES = ["Parasitized", "Uninfected"]


class LayoutContents(NamedTuple):
    """What one layout reader finds: classes, the three splits, and the default positive class."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    ignored: int
    default_positive: str | None


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
            if not is_image(name):
                ignored += 1
            else:
                images.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(images), ignored


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _read_folder(cfg: Any, root: Path) -> LayoutContents:
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
        val_f, test_f = check_fractions(cfg, need_val, need_test)
        train, val, test = stratified_split(pool, classes, val_f, test_f, cfg.split_seed)
        val, test = given.get("val", val), given.get("test", test)
    else:
        train, val, test = given["train"], given["val"], given["test"]
    default_positive = classes[1] if len(classes) == 2 else None
    return LayoutContents(classes, train, val, test, ignored, default_positive)


def _read_synthetic(cfg: Any, root: Path) -> LayoutContents:
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
    return any(p.is_file() and is_image(p.name) for p in folder.iterdir())


def _read_smoking(cfg: Any, root: Path) -> LayoutContents:
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
    return LayoutContents(list(SMOKING_CLASSES), splits["train"], splits["val"], splits["test"], ignored, "smoking")


def malaria_patient(filename: str) -> str:
    """Patient id of an NIH malaria cell image: the file-name part before `_IMG_` (else the whole stem).

    `C33P1thinF_IMG_20150619_114756a_cell_179.png` → `C33P1thinF`.
    """
    stem = Path(filename).stem
    return stem.split("_IMG_", 1)[0] if "_IMG_" in stem else stem


def _read_malaria(cfg: Any, root: Path) -> LayoutContents:
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
    val_f, test_f = check_fractions(cfg, need_val=True, need_test=True)
    groups = [malaria_patient(path) for path, _ in samples]
    train, val, test = grouped_split(samples, groups, len(MALARIA_CLASSES), val_f, test_f, cfg.split_seed)
    for split, items in (("train", train), ("val", val), ("test", test)):
        if items and {label for _, label in items} != set(range(len(MALARIA_CLASSES))):
            raise UserError(f"malaria dataset: the {split} split has only one class with "
                            f"{len(set(groups))} patients; use more data or other dataset.val_fraction/test_fraction")
    return LayoutContents(list(MALARIA_CLASSES), train, val, test, ignored, "Parasitized")


@dataclass(frozen=True)
class Layout:
    """One dataset name: its reader and, for data the user fetches, how to get it (said when the root is
    missing; None for the generated synthetic set)."""

    read: Callable[[Any, Path], LayoutContents]
    how_to_get: str | None = None
    group: Callable[[str], str] | None = None  # the group of an image (its patient): splits never divide one


LAYOUTS: dict[str, Layout] = {
    "synthetic": Layout(_read_synthetic),
    "folder": Layout(_read_folder, "set dataset.root to a folder laid out as root/<class>/* or "
                                   "root/{train,val,test}/<class>/*"),
    "smoking": Layout(_read_smoking, "download the Kaggle 'smoking' archive and unzip it there with python "
                                     "scripts/download_smoking.py (see data/README.md), or set dataset.root"),
    "malaria": Layout(_read_malaria, "download https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip "
                                     "and unzip it there with python scripts/download_malaria.py (see "
                                     "data/README.md), or set dataset.root", group=malaria_patient),
}
DATASET_NAMES = tuple(LAYOUTS)  # the dataset names, in the order the config help lists them


def sample_groups(name: str, paths: Sequence[str]) -> list[str] | None:
    """The group of each image for a layout that splits by group (malaria: the patient), else None."""
    group = LAYOUTS[name].group
    return None if group is None else [group(path) for path in paths]


def prepare_splits(cfg: Any, need: Sequence[str] = SPLIT_NAMES) -> DatasetSplits:
    """Read (for synthetic: generate, then read) the dataset named by `cfg.name` and split it.

    `cfg` is the dataset config (any attribute-access object: name, root, val_fraction, test_fraction,
    split_seed, positive_class, synthetic.*). Raises UserError for a missing root, no images, fewer than two
    classes, an empty split among `need` (training needs all three; lora-eval only the one it evaluates) or an
    unknown positive class.
    """
    if cfg.name not in LAYOUTS:
        raise UserError(f"unknown dataset.name={cfg.name!r}; choose one of {sorted(LAYOUTS)}")
    registered = LAYOUTS[cfg.name]
    root = Path(str(cfg.root)).expanduser().resolve()
    if cfg.name != "synthetic":
        if not root.exists():
            raise UserError(f"dataset root {root} does not exist; {registered.how_to_get}")
        if not root.is_dir():
            raise UserError(f"dataset root {root} is not a folder; {registered.how_to_get}")
    layout = registered.read(cfg, root)
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
    splits = DatasetSplits(root=root, classes=list(layout.classes), positive_class=positive, train=layout.train,
                           val=layout.val, test=layout.test, skipped=[], ignored=layout.ignored)
    _warn_absent_classes(splits, need)
    return splits


def _warn_absent_classes(splits: DatasetSplits, need: Sequence[str]) -> None:
    """A class with no image in a split (a class of 2 images split 70/15/15) is named: that split's report
    cannot measure it, and its macro metrics average over the classes present."""
    counts = splits.class_counts()
    for split in need:
        absent = [c for c, n in counts[split].items() if n == 0]
        if absent and sum(counts[split].values()):
            log.warning(f"class(es) {', '.join(absent)} have no image in the {split} split "
                        f"({sum(counts['train'][c] + counts['val'][c] + counts['test'][c] for c in absent)} image(s) "
                        f"in all): its metrics there cover the other classes only; add images or change "
                        "dataset.val_fraction/test_fraction")


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Warnings the data modules log inside the block (all through the "lora_cls.data" logger: layout
    readers and `build_loaders` alike), returned instead of printed (for reports that list them)."""
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
