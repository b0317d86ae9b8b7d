"""Datasets (docs/DESIGN.md §5): on-disk layouts → splits → decoded uint8 tensors → DataLoaders.

The flow is one way, one module a step:

- `layouts`: the registry of dataset names (`LAYOUTS`, `DATASET_NAMES`: the only list of them) and their
  readers; `prepare_splits(cfg)` reads a layout (for synthetic: generates it first, see `synthetic`) and
  returns a `DatasetSplits`. `collected_warnings()` gathers what the data modules log.
- `splits`: `DatasetSplits` (relative paths and label indices per split, JSON-serialisable as the run's
  splits.json, `write_splits_json` / `read_splits_json`) and the seeded stratified and grouped splitters.
- `synthetic`: the generated blood-cell set (`ensure_synthetic`, `generate_synthetic`, `render_cell`).
- `decode`: the one image-file rule (`is_image`), decoding any image to uint8 RGB (`decode_image`), the cheap
  check (`verify_image`), their errors, and the thread count for I/O (`io_threads`).
- `cache`: the decoded-image cache on disk (`load_or_decode`: one memory-mapped entry per file list and size,
  written atomically, shared by processes, size-capped; `entries`, `clear` for `lora-data cache`).
- `loaders`: `build_loaders(splits, cfg, ...)` decodes the images into `ImageDataset`s (through `cache`) and wraps
  them in DataLoaders; `eval_loader` is the plain in-order loader of evaluation.

Batches are uint8 (N, 3, S, S); normalisation and augmentation happen on the batch, on the training device
(`lora_cls.augment`). Only `loaders` imports torch (`decode` imports it when it first decodes), so config
checks can use `layouts` without it. All data modules log through the one logger "lora_cls.data".

This file imports nothing: import the module you need (`from lora_cls.data.layouts import ...`).
"""
