"""DataLoaders (docs/DESIGN.md §5): decoded uint8 images of each split, cached in memory when they fit.

`build_loaders(splits, cfg, ...)` decodes the images of a `DatasetSplits` into `ImageDataset`s and wraps them
in seeded DataLoaders yielding (uint8 (B, 3, S, S), int64 (B,)) batches; `eval_loader` is the plain in-order
loader of evaluation and prediction.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lora_cls.data.decode import (
    DEFAULT_MAX_PIXELS,
    UndecodableImages,
    UnreadableImage,
    decode_image,
    io_threads,
    verify_image,
)
from lora_cls.data.splits import SPLIT_NAMES, DatasetSplits, Sample
from lora_cls.errors import UserError

# The one logger of all lora_cls.data modules, so that `collected_warnings` hears every one of them.
log = logging.getLogger("lora_cls.data")


class ImageDataset(Dataset):
    """Images of one split as `(uint8 tensor (3, S, S), int label)`.

    When `cache` is on and N·3·S·S bytes fit in `max_cache_bytes`, every image is decoded once at
    construction into one uint8 tensor (N, 3, S, S); otherwise images are decoded in `__getitem__` after a
    verification pass (PIL open + verify, which catches missing, non-image and most corrupt files; damage
    that only decoding finds raises UnreadableImage from `__getitem__`). Undecodable files raise one
    UserError listing them all, or with `skip_bad=True` are dropped and listed in `.skipped`.
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], image_size: int, cache: bool = True,
                 max_cache_bytes: int = 4 * 2**30, skip_bad: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.image_size = int(image_size)
        self.max_pixels = max_pixels
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
                return decode_image(self.root / path, s, self.max_pixels)
            except UnreadableImage as e:
                return e

        paths = [path for path, _ in samples]
        with ThreadPoolExecutor(io_threads()) as pool:
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
        with ThreadPoolExecutor(io_threads()) as pool:
            reasons = list(tqdm(pool.map(lambda p: verify_image(self.root / p, self.max_pixels), paths), total=len(paths),
                                desc=f"checking {len(paths)} images", unit="img", leave=False, disable=None))
        return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if self._images is not None:
            return self._images[index], label
        return decode_image(self.root / path, self.image_size, self.max_pixels), label


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
                                          max_cache_bytes=max_bytes, skip_bad=bool(cfg.skip_bad),
                                          max_pixels=cfg.max_image_pixels)
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


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """A loader over `dataset` in its order, unshuffled, in the main process (evaluation and prediction)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
