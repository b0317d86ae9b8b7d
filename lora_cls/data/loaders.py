"""DataLoaders (docs/DESIGN.md §5): decoded uint8 images of each split, from the on-disk decoded-image cache.

`build_loaders(splits, cfg, ...)` decodes the images of a `DatasetSplits` into `ImageDataset`s (once: later runs
map them from `lora_cls.data.cache`) and wraps them in seeded DataLoaders yielding (uint8 (B, 3, S, S), int64 (B,))
batches; `eval_loader` is the plain in-order loader of evaluation and prediction.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from lora_cls.data.cache import load_or_decode
from lora_cls.data.decode import (
    DEFAULT_MAX_PIXELS,
    Geometry,
    UndecodableImages,
    decode_image,
    io_threads,
    verify_image,
)
from lora_cls.data.splits import SPLIT_NAMES, DatasetSplits, Sample
from lora_cls.errors import UserError

# The one logger of all lora_cls.data modules, so that `collected_warnings` hears every one of them.
log = logging.getLogger("lora_cls.data")

DEFAULT_CACHE_BYTES = 10 * 2**30  # dataset.cache.max_gb's default


class ImageDataset(Dataset):
    """Images of one split as `(uint8 tensor (3, S, S), int label)`, S × S as `image_size` says (an int: the image
    squashed to S × S; a decode.Geometry: its resize and square cut, docs/DESIGN.md §5).

    With `cache` (the default) every image is decoded once into the decoded-image cache in `cache_dir`
    (`lora_cls.data.cache`; `max_cache_bytes` caps that folder) and `.images` is the whole split, uint8
    (N, 3, S, S), memory-mapped from it: a split larger than memory streams from disk. `.cache_hit` says
    whether the images were already there. Without `cache`, images are decoded in `__getitem__` after a
    verification pass (PIL open + verify, which catches missing, non-image and most corrupt files; damage that
    only decoding finds raises UnreadableImage from `__getitem__`), and `.images` is None. Undecodable files
    raise one UserError listing them all, or with `skip_bad=True` are dropped and listed in `.skipped`.
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], image_size: int | Geometry, cache: bool = True,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES, skip_bad: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.geometry = image_size if isinstance(image_size, Geometry) else Geometry(int(image_size))
        self.image_size = self.geometry.size
        self.max_pixels = max_pixels
        self.skipped: list[str] = []
        self.bad: list[tuple[str, str]] = []  # (path, reason) of the skipped files
        samples = list(samples)
        nbytes = len(samples) * 3 * self.image_size**2
        self.cached = bool(cache) and nbytes <= int(max_cache_bytes)
        if cache and not self.cached:
            # Decoding it all would write more than the cap allows (and, every DDP rank or sweep job decoding in
            # turn under the entry's lock, more than once): such a split is decoded from disk each epoch.
            log.warning(f"the decoded images of this split ({nbytes / 2**30:.1f} GiB) are larger than "
                        f"dataset.cache.max_gb ({int(max_cache_bytes) / 2**30:.1f} GiB): decoding them from disk "
                        "every epoch instead; raise dataset.cache.max_gb to decode them once")
        self.cache_hit: bool | None = None  # None: not cached
        self.cache_path: Path | None = None  # the entry folder (None: not cached, or not kept: over the cap)
        self.images: torch.Tensor | None = None
        if self.cached:
            entry = load_or_decode(self.root, [path for path, _ in samples], self.geometry, max_pixels,
                                   cache_dir, int(max_cache_bytes))
            bad = entry.bad
            self.cache_hit, self.cache_path = entry.hit, entry.path
            self.images = torch.from_numpy(entry.images)  # the entry holds the decodable files only, in order
        else:
            bad = self._verify_all(samples)
        if bad:
            if not skip_bad:
                raise UndecodableImages(bad, self.root)
            bad_paths = {path for path, _ in bad}
            self.bad = list(bad)
            self.skipped = [path for path, _ in bad]
            samples = [sample for sample in samples if sample[0] not in bad_paths]
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    @classmethod
    def from_config(cls, root: str | Path, samples: Sequence[Sample], cfg: Any, skip_bad: bool | None = None,
                    cache: bool | None = None, geometry: Geometry | None = None) -> ImageDataset:
        """A split read as the dataset config `cfg` says (cache and its cap and folder, the pixel limit, skip_bad
        unless given), decoded as `geometry` says (default: squashed to dataset.image_size)."""
        return cls(root, samples, geometry or Geometry(int(cfg.image_size)),
                   cache=bool(cfg.cache.enabled) if cache is None else cache,
                   max_cache_bytes=int(float(cfg.cache.max_gb) * 2**30),
                   skip_bad=bool(cfg.skip_bad if skip_bad is None else skip_bad), max_pixels=cfg.max_image_pixels,
                   cache_dir=getattr(cfg.cache, "dir", None))

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
        if self.images is not None:
            return self.images[index], label
        return decode_image(self.root / path, self.geometry, self.max_pixels), label


    def __getitems__(self, indices: Sequence[int]) -> Batch | list[tuple[torch.Tensor, int]]:
        """A whole batch at once (DataLoader calls this instead of __getitem__ per sample): with the images in the
        cache, one indexing op gathers them, with no per-sample Python work or collate (`collate` passes it on)."""
        if self.images is None:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batch((self.images[index], self.labels[index]))


class Batch(tuple):
    """(uint8 images (B, 3, S, S), int64 labels (B,)), already gathered by `ImageDataset.__getitems__`."""


def collate(data: Batch | list) -> list[torch.Tensor]:
    """The loaders' collate_fn: a gathered `Batch` as it is, per-sample items (decoded from disk) stacked."""
    return list(data) if isinstance(data, Batch) else default_collate(data)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random are not, so derive theirs.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(splits: DatasetSplits, cfg: Any, batch_size: int, num_workers: int, seed: int,
                  pin_memory: bool = False, geometry: Geometry | None = None) -> dict[str, DataLoader]:
    """DataLoaders for "train", "val" and "test", yielding (uint8 (B, 3, S, S), int64 (B,)) batches, the images
    decoded as `geometry` says (default: squashed to cfg.image_size).

    With `cfg.cache.enabled` the splits come from the decoded-image cache (`cfg.cache.dir`, capped at
    `cfg.cache.max_gb`); then loading runs in the main process (indexing a tensor is cheaper than worker
    IPC) whatever `num_workers` says. Train is shuffled by a `torch.Generator` seeded with `seed` and drops
    the last partial batch only when there is more than one batch. A `batch_size` larger than the train set
    is lowered to it with a warning: with drop_last it would otherwise give zero steps per epoch.

    Undecodable files raise UserError, or with `cfg.skip_bad` are dropped: they are removed from
    `splits.train/val/test` and listed in `splits.skipped` (so build loaders before writing splits.json).
    """
    cache = bool(cfg.cache.enabled)
    datasets: dict[str, ImageDataset] = {}
    bad: list[tuple[str, str]] = []
    for name in SPLIT_NAMES:
        try:
            datasets[name] = ImageDataset.from_config(splits.root, splits.split(name), cfg, geometry=geometry)
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
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory, "collate_fn": collate,
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
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)
