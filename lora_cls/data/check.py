"""The data check behind `lora-data check` (docs/DESIGN.md §5): what a dataset holds and what would spoil a run.

`check_dataset(cfg)` reads the split exactly as lora-train would (or the split a run recorded in its
splits.json), opens every image, and returns a plain-JSON report: counts per split and class, image size
statistics, undecodable files by path, identical files (sha256 of the bytes) in more than one split or under
two labels, and patients in more than one split (malaria). `run_check(cfg, run_dir)` also prints it as tables
and writes `datacheck.json`. Problems are reported, never fixed: nothing on disk is changed.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lora_cls.data.decode import DEFAULT_MAX_PIXELS, UnreadableImage, decode_image, io_threads
from lora_cls.data.layouts import DATASET_NAMES, collected_warnings, malaria_patient, prepare_splits
from lora_cls.data.splits import SPLIT_NAMES, SPLITS, DatasetSplits, read_splits_json
from lora_cls.errors import UserError

MALARIA_NAME_MARK = "_IMG_"  # NIH malaria file names: <patient>_IMG_<date>_<time>_cell_<n>.png


class FileInfo(NamedTuple):
    sha256: str | None
    width: int | None
    height: int | None
    reason: str | None  # why it is not a usable image; None when it decodes


def inspect_file(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> FileInfo:
    """Read a file once: sha256 of its bytes, its stored width and height, and whether it decodes the way
    training decodes it (`decode_image`: EXIF orientation, any mode to RGB, resize)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FileInfo(None, None, None, f"cannot read: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        decode_image(io.BytesIO(data), 8, max_pixels)  # type: ignore[arg-type]  (PIL opens file objects too)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnreadableImage as exc:
        return FileInfo(digest, None, None, exc.reason)
    return FileInfo(digest, width, height, None)


def _stats(values: Sequence[int]) -> dict[str, float | int | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    arr = np.asarray(values)
    median = float(np.median(arr))
    return {"min": int(arr.min()), "median": int(median) if median.is_integer() else median, "max": int(arr.max())}


def _load_split(cfg: Any) -> tuple[DatasetSplits, str, str | None, list[str]]:
    """The split to check, a description of where it came from, the dataset name if known, and warnings."""
    with collected_warnings() as caught:
        if cfg.splits is not None:
            path = splits_file(cfg.splits)
            splits = read_splits_json(path)
            source, name = f"splits recorded in {path}", None
        else:
            splits = prepare_splits(cfg.dataset)
            source, name = f"dataset={cfg.dataset.name} (split as lora-train makes it)", str(cfg.dataset.name)
    return splits, source, name, caught


def check_dataset(cfg: Any) -> dict[str, Any]:
    """Check the data that `cfg` (a DataCheckConfig) names and return the report (plain JSON types).

    The report's `problems` lists what makes a run untrustworthy: undecodable files, identical files in two
    splits or under two labels, patients in two splits. `ok` is true when it is empty. `warnings` (counts
    that differ from the published set, for one) do not count as problems.
    """
    validate_datacheck(cfg)
    splits, source, name, notes = _load_split(cfg)
    max_pixels = cfg.dataset.max_image_pixels
    if not splits.root.is_dir():
        raise UserError(f"dataset root {splits.root} (from {source}) is not a folder")
    classes = splits.classes
    entries = [(split, path, label) for split in SPLIT_NAMES for path, label in splits.split(split)]
    with ThreadPoolExecutor(io_threads()) as pool:
        infos = list(tqdm(pool.map(lambda e: inspect_file(splits.root / e[1], max_pixels), entries), total=len(entries),
                          desc=f"checking {len(entries)} files", unit="img", leave=False,
                          disable=not cfg.progress or None))

    counts, sizes, bad, by_hash = _tally(entries, infos, classes)
    duplicates, within = _identical_groups(by_hash)
    patients = _patient_report(cfg, name, entries)
    problems = []
    if bad:
        problems.append(f"{len(bad)} undecodable file(s)")
    if across := [g for g in duplicates if len(g["splits"]) > 1]:
        problems.append(f"{len(across)} set(s) of identical files in more than one split")
    if conflicting := [g for g in duplicates if len(g["classes"]) > 1]:
        problems.append(f"{len(conflicting)} set(s) of identical files under different labels")
    if patients["overlap"]:
        problems.append(f"{len(patients['overlap'])} patient(s) in more than one split")
    totals = {split: sum(counts[split].values()) for split in SPLIT_NAMES}
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": notes,
        "dataset": name,
        "source": source,
        "root": str(splits.root),
        "classes": classes,
        "positive_class": splits.positive_class,
        "counts": {**{s: {**counts[s], "total": totals[s]} for s in SPLIT_NAMES},
                   "all": {**{c: sum(counts[s][c] for s in SPLIT_NAMES) for c in classes},
                           "total": sum(totals.values())}},
        "ignored_files": splits.ignored,
        "skipped_by_run": list(splits.skipped),
        "image_sizes": {key: {"width": _stats(w), "height": _stats(h)} for key, (w, h) in sizes.items()},
        "bad_files": bad,
        "duplicates": duplicates,
        "duplicates_within_split": within,
        "patients": patients,
    }


def _tally(entries: list[tuple[str, str, int]], infos: list[FileInfo], classes: list[str]):
    """Per split: images per class, stored sizes, undecodable files; and every decodable file by its hash."""
    counts = {split: {c: 0 for c in classes} for split in SPLIT_NAMES}
    sizes: dict[str, tuple[list[int], list[int]]] = {split: ([], []) for split in (*SPLIT_NAMES, "all")}
    bad, by_hash = [], defaultdict(list)
    for (split, path, label), info in zip(entries, infos):
        counts[split][classes[label]] += 1
        if info.reason is not None:
            bad.append({"path": path, "split": split, "class": classes[label], "reason": info.reason})
            continue
        for key in (split, "all"):
            sizes[key][0].append(info.width)
            sizes[key][1].append(info.height)
        by_hash[info.sha256].append({"path": path, "split": split, "class": classes[label]})
    return counts, sizes, bad, by_hash


def _identical_groups(by_hash: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """Sets of identical files: (across splits or labels: leakage, within one split and class)."""
    duplicates, within = [], []
    for digest, files in sorted(by_hash.items(), key=lambda kv: kv[1][0]["path"]):
        if len(files) < 2:
            continue
        group = {"sha256": digest, "splits": sorted({f["split"] for f in files}, key=SPLIT_NAMES.index),
                 "classes": sorted({f["class"] for f in files}), "files": files}
        (duplicates if len(group["splits"]) > 1 or len(group["classes"]) > 1 else within).append(group)
    return duplicates, within


def _patient_report(cfg: Any, name: str | None, entries: list[tuple[str, str, int]]) -> dict[str, Any]:
    enabled = cfg.patients
    if enabled is None:
        names = [Path(path).name for _, path, _ in entries]
        enabled = name == "malaria" or (bool(names) and all(MALARIA_NAME_MARK in n for n in names))
    if not enabled:
        return {"checked": False, "per_split": {}, "overlap": []}
    where: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLIT_NAMES})
    for split, path, _ in entries:
        where[malaria_patient(path)][split] += 1
    per_split = {s: sum(1 for counts in where.values() if counts[s]) for s in SPLIT_NAMES}
    overlap = [{"patient": patient, "files": {s: n for s, n in counts.items() if n}}
               for patient, counts in sorted(where.items()) if sum(1 for n in counts.values() if n) > 1]
    return {"checked": True, "per_split": per_split, "overlap": overlap}


# ----------------------------------------------------------------------------------------------- output


def validate_datacheck(cfg: Any) -> None:
    """Value checks that need no data: each failure names its key. Runs before a run folder is made."""
    d = cfg.dataset
    if cfg.splits is None:
        if d.name not in DATASET_NAMES:
            raise UserError(f"dataset.name: unknown dataset {d.name!r}; choose one of {', '.join(DATASET_NAMES)}")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(d, key) < 1.0:
                raise UserError(f"dataset.{key}: must be in [0, 1), got {getattr(d, key)}")
        if d.name != "synthetic" and not Path(str(d.root)).expanduser().is_dir():
            raise UserError(f"dataset.root: {d.root} is not a folder; point dataset.root at the {d.name} data "
                            "(see data/README.md)")
    elif not splits_file(cfg.splits).is_file():
        raise UserError(f"splits: {cfg.splits} is neither a splits.json nor a run folder holding one")
    if cfg.show < 0:
        raise UserError(f"show: must be >= 0, got {cfg.show}")


def splits_file(spec: str) -> Path:
    """The splits.json that `splits=` names: the file itself, or the one in a run folder."""
    path = Path(spec).expanduser()
    return path / SPLITS if path.is_dir() else path
