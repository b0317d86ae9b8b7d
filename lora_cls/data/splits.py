"""Dataset splits (docs/DESIGN.md §5): `DatasetSplits`, its splits.json, and the seeded splitters.

A `DatasetSplits` names every image by its path relative to the dataset root and its label index; it is what
a run records as splits.json (`write_splits_json`, `read_splits_json`). `stratified_split` carves val/test out
of a pool per class by fraction; `grouped_split` keeps every group (a malaria patient) in one split.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_cls.errors import UserError
from lora_cls.files import write_json

Sample = tuple[str, int]
"""(path relative to the dataset root, POSIX separators; label index into `classes`)."""
SPLIT_NAMES = ("train", "val", "test")
SPLITS = "splits.json"  # the file a run folder records its split in (write_splits_json)


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

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: {split: {class: count}}."""
        return {name: {c: sum(1 for _, label in self.split(name) if label == i) for i, c in enumerate(self.classes)}
                for name in SPLIT_NAMES}

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
    """Write `splits.to_json()` to `path` atomically (`lora_cls.runfolder.write_json`: temp file in the same
    folder, fsync, os.replace, the umask's normal permissions), indented by 1, with a trailing newline."""
    write_json(path, splits.to_json(), indent=1)


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


def check_fractions(cfg: Any, need_val: bool, need_test: bool) -> tuple[float, float]:
    """The (val, test) fractions to carve out of the train pool (0.0 for a split the layout has); UserError
    when a needed one is not in (0, 1) or together they leave nothing to train on."""
    val, test = float(cfg.val_fraction), float(cfg.test_fraction)
    if need_val and not 0 < val < 1:
        raise UserError(f"dataset.val_fraction={val} must be in (0, 1): this layout has no val split to use")
    if need_test and not 0 < test < 1:
        raise UserError(f"dataset.test_fraction={test} must be in (0, 1): this layout has no test split to use")
    if (val if need_val else 0.0) + (test if need_test else 0.0) >= 1:
        raise UserError(f"dataset.val_fraction + dataset.test_fraction = {val + test} leaves nothing to train on; "
                        "make their sum less than 1")
    return (val if need_val else 0.0), (test if need_test else 0.0)


def round_half_up(x: float) -> int:
    """`x` rounded to the nearest integer, halves up (`round` would round halves to even)."""
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
        n_val, n_test = round_half_up(n * val_fraction), round_half_up(n * test_fraction)
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



def kfold_assignment(labels: Sequence[int], folds: int, seed: int, groups: Sequence[str] | None = None) -> list[int]:
    """The fold (0..folds-1) of each sample of a pool for k-fold cross-validation: stratified by label
    (sklearn's StratifiedKFold, shuffled with `seed`), and with `groups` (a malaria patient per image) grouped
    too, so no group is in two folds (StratifiedGroupKFold). UserError when a class or the groups are too few."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    if counts[counts > 0].min() < folds:
        raise UserError(f"cv.folds={folds} needs at least {folds} images of each class in the train+val pool; the "
                        f"smallest class has {int(counts[counts > 0].min())}: use fewer folds or more data")
    rows = np.zeros((len(labels), 1))
    if groups is None:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=int(seed) & 0xFFFFFFFF).split(rows, labels)
    else:
        if len(set(groups)) < folds:
            raise UserError(f"cv.folds={folds}: the pool holds {len(set(groups))} patients, fewer than the folds; "
                            "use fewer folds")
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=int(seed) & 0xFFFFFFFF).split(
            rows, labels, list(groups))
    assignment = np.full(len(labels), -1)
    for fold, (_, held_out) in enumerate(splitter):
        assignment[held_out] = fold
    return [int(f) for f in assignment]
