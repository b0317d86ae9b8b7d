"""lora-predict: class predictions for new images from a trained checkpoint.

`predict(cfg, run_dir)` loads the checkpoint through the one inference path (`inference.from_checkpoint`: the
model rebuilt from the adapter file alone, adapters merged into plain layers, W' = d·W + s·BA, docs/DESIGN.md §3)
and classifies every image that
`cfg.input` names (a file, a folder searched recursively, or a glob), decoded and normalised exactly as in
training. It writes `predictions.csv` (path, predicted class, one probability column per class) and
`predict.json` (a summary) into `run_dir`.
"""

from __future__ import annotations

import csv
import glob
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from lora_cls.conf.checks import validate_predict
from lora_cls.data.decode import (
    IMAGE_EXTENSIONS,
    Geometry,
    UnreadableImage,
    decode_image,
    io_threads,
    is_image,
    verify_image,
)
from lora_cls.data.loaders import ImageDataset
from lora_cls.data.splits import read_splits_json
from lora_cls.engine.explain import grad_cam_classes
from lora_cls.errors import UserError
from lora_cls.files import atomic_open, write_json
from lora_cls.runs.checkpoint import resolve_checkpoint
from lora_cls.runs.console import print_predictions
from lora_cls.runs.folder import PREDICT_SUMMARY, PREDICTIONS, RunDir, check_fresh_run_dir
from lora_cls.tasks.inference import Classifier, base_settings, from_checkpoint


def collect_inputs(spec: str) -> list[Path]:
    """The images `spec` names, sorted: a file as is; a folder's image files, recursively (hidden files and
    folders and `__MACOSX` passed over, as in training); a glob's image files (`**` recurses)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
            found += [Path(dirpath) / name for name in filenames if is_image(name)]
        if not found:
            raise UserError(f"input {spec}: no image files in this folder or below (image files end in "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        return sorted(found)
    if glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
        images = sorted(p for p in found if p.is_file() and is_image(p.name))
        if not images:
            raise UserError(f"input {spec}: the pattern matches no image file ({len(found)} other matches)")
        return images
    raise UserError(f"input {spec} does not exist; give an image, a folder or a glob such as 'photos/*.jpg'")


def split_inputs(adapter: Path, split: str) -> list[Path]:
    """The images of split `split` in the splits.json of the run that wrote `adapter`, in the split's order."""
    splits_path = RunDir.of_checkpoint(adapter).splits
    if not splits_path.is_file():
        raise UserError(f"split={split}: no splits.json beside the checkpoint (looked for {splits_path}); "
                        "use input=<folder> instead")
    splits = read_splits_json(splits_path)
    if not splits.split(split):
        raise UserError(f"split={split}: the run's {split} split is empty ({splits_path})")
    return [splits.root / p for p, _ in splits.split(split)]


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _split_lookup(clf: Classifier, split: str) -> dict[Path, torch.Tensor | str] | None:
    """split=: the split's images from the decoded-image cache, as training and lora-eval read them, by path (an
    undecodable file's value is the reason); None when the run did not use the cache."""
    if not clf.config.dataset.cache.enabled:
        return None
    splits = read_splits_json(RunDir.of_checkpoint(clf.checkpoint).splits)
    data = ImageDataset.from_config(splits.root, splits.split(split), clf.config.dataset, skip_bad=True,
                                    geometry=clf.preprocessing.geometry)
    lookup: dict[Path, torch.Tensor | str] = {splits.root / p: data.images[i] for i, (p, _) in enumerate(data.samples)}
    lookup.update({splits.root / p: reason for p, reason in data.bad})
    return lookup


def _decode(path: Path, size: Geometry, max_pixels: int | None) -> torch.Tensor | str:
    try:
        return decode_image(path, size, max_pixels)
    except UnreadableImage as exc:
        return exc.reason or "undecodable"


def _bad_inputs_error(bad: list[tuple[str, str]]) -> UserError:
    shown = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    return UserError(f"{len(bad)} input file(s) are not decodable images; remove them from the input, or pass "
                     f"skip_bad=true to skip them:\n{shown}")


def predict(cfg: Any, run_dir: str | Path) -> list[dict[str, Any]]:
    """Classify the images of `cfg.input` with the checkpoint `cfg.ckpt`; write and return the predictions.

    Each row: {"path", "predicted", "prob_<class>" for every class}, in sorted path order. Undecodable inputs
    stop the command with one error listing them all, or with `skip_bad` are skipped and listed in predict.json.
    """
    return _predict(cfg, Path(run_dir))[0]


def _predict(cfg: Any, run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    validate_predict(cfg)
    check_fresh_run_dir(run_dir)
    if cfg.explain:
        grad_cam_classes()  # the error naming the package, before anything long
    path = resolve_checkpoint(cfg.ckpt)
    files = collect_inputs(str(cfg.input)) if cfg.input is not None else split_inputs(path, cfg.split)
    clf = from_checkpoint(path, cfg.device, cfg.precision, tta=cfg.tta,  # precision null: the run's own
                          calibrate=bool(cfg.calibrate), base=base_settings(cfg))
    progress = None if cfg.progress else True  # tqdm's disable: None = only on a terminal
    lookup = _split_lookup(clf, cfg.split) if cfg.input is None else None
    max_pixels = clf.config.dataset.max_image_pixels
    if lookup is not None:
        reasons = [found if isinstance(found, str) else None for found in map(lookup.__getitem__, files)]
    else:
        with ThreadPoolExecutor(io_threads()) as pool:
            # A cheap pass first (PIL open + verify), so a broken input stops the command before the long part.
            reasons = list(tqdm(pool.map(lambda f: verify_image(f, max_pixels), files), total=len(files),
                                desc=f"checking {len(files)} images", unit="img", leave=False, disable=progress))
    bad = [(str(f), r) for f, r in zip(files, reasons) if r is not None]
    if bad and not cfg.skip_bad:
        raise _bad_inputs_error(bad)
    explain = Heatmaps(run_dir / EXPLAIN_DIR, cfg.explain_layer) if cfg.explain else None
    rows, undecodable = _classify(clf, [f for f, r in zip(files, reasons) if r is None], lookup,
                                  int(cfg.batch_size or clf.batch_size), progress, explain)
    bad += undecodable
    if undecodable and not cfg.skip_bad:
        raise _bad_inputs_error(bad)  # damage that only decoding finds
    if not rows:
        raise UserError(f"input {cfg.input}: none of the {len(files)} file(s) could be decoded")
    write_predictions(run_dir / PREDICTIONS, rows, clf.classes, explain is not None)
    summary = {"status": "ok", "checkpoint": str(path), "input": cfg.input and str(cfg.input), "split": cfg.split,
               "classes": clf.classes, "images": len(rows), "class_counts": class_counts(rows, clf.classes),
               "skipped": [{"path": p, "reason": r} for p, r in bad], "image_size": clf.image_size,
               "device": str(clf.device), "precision": clf.precision.name, "tta": clf.tta,
               "calibrated": clf.calibrate, "temperature": clf.temperature,
               "explain_layer": explain.layer if explain else None,
               "preprocessing": clf.preprocessing.to_json()}
    write_json(run_dir / PREDICT_SUMMARY, summary)
    return rows, summary


EXPLAIN_DIR = "explain"


class Heatmaps:
    """explain=true: each image's Grad-CAM (of its predicted class) as explain/<NNNNN>_<name>.png, the model's input
    beside the overlay; the PNG's path goes into the prediction row (`heatmap`)."""

    def __init__(self, folder: Path, layer: str | None) -> None:
        self.folder, self.asked, self.layer, self.count = folder, layer, None, 0

    def __call__(self, clf: Classifier, batch: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        from lora_cls.runs.diagnostics import save_explanation

        found = clf.explain(batch, [clf.classes.index(r["predicted"]) for r in rows], layer=self.asked)
        self.layer = found.layer
        self.folder.mkdir(parents=True, exist_ok=True)
        for row, image, heat in zip(rows, found.images, found.heatmaps):
            path = self.folder / f"{self.count:05d}_{Path(row['path']).stem}.png"
            save_explanation(path, image, heat)
            row["heatmap"] = str(path)
            self.count += 1


def _classify(clf: Classifier, files: list[Path], lookup: dict | None, batch_size: int,
              progress: bool | None, explain: Heatmaps | None = None
              ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Prediction rows of `files` (decoded in threads, or taken from the split's cached images), batch by batch,
    with `explain` their Grad-CAM PNGs; and the (path, reason) of those that turned out undecodable."""
    rows: list[dict[str, Any]] = []
    bad: list[tuple[str, str]] = []
    max_pixels = clf.config.dataset.max_image_pixels
    with ThreadPoolExecutor(io_threads()) as pool, tqdm(total=len(files), desc="predicting", unit="img",
                                                         leave=False, disable=progress) as bar:
        for chunk in _batches(files, batch_size):
            decoded = ([lookup[f] for f in chunk] if lookup is not None
                       else list(pool.map(lambda f: _decode(f, clf.preprocessing.geometry, max_pixels), chunk)))
            good = [(f, t) for f, t in zip(chunk, decoded) if isinstance(t, torch.Tensor)]
            bad += [(str(f), t) for f, t in zip(chunk, decoded) if isinstance(t, str)]
            if good:
                batch = torch.stack([t for _, t in good])
                probs = clf.probabilities(batch)
                new = []
                for (f, _), p in zip(good, probs.tolist()):
                    best = max(range(len(clf.classes)), key=p.__getitem__)  # first maximum, as argmax
                    new.append({"path": str(f), "predicted": clf.classes[best],
                                **{f"prob_{c}": round(v, 6) for c, v in zip(clf.classes, p)}})
                if explain is not None:
                    explain(clf, batch, new)
                rows += new
            bar.update(len(chunk))
    return rows, bad


def class_counts(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(row["predicted"] for row in rows)
    return {c: counts.get(c, 0) for c in classes}


def write_predictions(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str],
                      heatmaps: bool = False) -> None:
    fields = ["path", "predicted", *(f"prob_{c}" for c in classes), *(["heatmap"] if heatmaps else [])]
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def run_predict(cfg: Any, run_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    """`predict`, then print the table; returns predict.json's content (the CLI's job function)."""
    rows, summary = _predict(cfg, Path(run_dir))
    console = console or Console()
    print_predictions(rows, summary["classes"], int(cfg.show), console)
    skipped = summary["skipped"]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} undecodable file(s)[/yellow] (skip_bad=true): "
                      + ", ".join(s["path"] for s in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if summary.get("explain_layer"):
        console.print(f"Grad-CAM heatmaps (at {summary['explain_layer']}): {Path(run_dir) / EXPLAIN_DIR}/")
    console.print(f"predictions: {Path(run_dir) / PREDICTIONS}")
    return summary
