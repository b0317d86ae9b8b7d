"""ImageDataset (cached and streaming) and build_loaders: batches, seeded order, broken and missing files."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import distinct_colour, make_cfg, write_image
from PIL import Image

from lora_cls.data.decode import UnreadableImage, decode_image
from lora_cls.data.layouts import prepare_splits
from lora_cls.data.loaders import ImageDataset, build_loaders
from lora_cls.data.splits import DatasetSplits
from lora_cls.errors import UserError

# ------------------------------------------------------------------------------------------ ImageDataset


def make_samples(root: Path, n: int = 6) -> list[tuple[str, int]]:
    samples = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        samples.append((f"{i}.png", i % 2))
    return samples


def test_cached_and_streaming_datasets_give_identical_tensors(tmp_path):
    samples = make_samples(tmp_path)
    cached = ImageDataset(tmp_path, samples, 16, cache=True)
    streaming = ImageDataset(tmp_path, samples, 16, cache=False)
    assert cached.cached and not streaming.cached
    assert cached.images.shape == (6, 3, 16, 16) and streaming.images is None
    assert len(cached) == len(streaming) == 6
    for i in range(6):
        (a, label_a), (b, label_b) = cached[i], streaming[i]
        assert a.dtype == torch.uint8 and a.shape == (3, 16, 16)
        assert torch.equal(a, b) and label_a == label_b == samples[i][1]
    assert torch.equal(cached[3][0], decode_image(tmp_path / "3.png", 16))


@pytest.mark.parametrize("cache", [True, False])
def test_broken_images_raise_one_error_listing_all(tmp_path, cache):
    samples = make_samples(tmp_path)
    (tmp_path / "bad1.png").write_bytes(b"junk")
    (tmp_path / "bad2.jpg").write_bytes(b"")
    samples += [("bad1.png", 0), ("bad2.jpg", 1)]
    with pytest.raises(UserError) as info:
        ImageDataset(tmp_path, samples, 16, cache=cache)
    assert "bad1.png" in str(info.value) and "bad2.jpg" in str(info.value)
    assert "skip_bad" in str(info.value)


@pytest.mark.parametrize("cache", [True, False])
def test_missing_images_are_called_missing_and_point_at_dataset_root(tmp_path, cache):
    samples = make_samples(tmp_path, n=2) + [(f"gone/{i}.png", 0) for i in range(25)]
    with pytest.raises(UserError) as info:
        ImageDataset(tmp_path, samples[2:], 16, cache=cache)
    head, *listed = str(info.value).splitlines()
    assert head.startswith(f"25 image file(s) of the split are missing under {tmp_path}")
    assert "dataset.root" in head and "undecodable" not in head
    assert listed[:2] == ["  gone/0.png: file not found", "  gone/1.png: file not found"]
    assert len(listed) == 21 and listed[-1] == "  ... and 5 more"  # 20 named, the rest counted
    assert len(info.value.bad) == 25  # the exception still holds every file
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"^2 undecodable image file\(s\) \(1 missing, 1 not decodable\)"):
        ImageDataset(tmp_path, samples[:2] + [("junk.png", 1), ("gone/0.png", 0)], 16, cache=cache)


@pytest.mark.parametrize("cache", [True, False])
def test_skip_bad_drops_and_reports_broken_images(tmp_path, cache):
    samples = make_samples(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"junk")
    samples.insert(2, ("bad.png", 0))
    dataset = ImageDataset(tmp_path, samples, 16, cache=cache, skip_bad=True)
    assert dataset.skipped == ["bad.png"]
    assert len(dataset) == 6
    assert [path for path, _ in dataset.samples] == [f"{i}.png" for i in range(6)]
    assert torch.equal(dataset[2][0], decode_image(tmp_path / "2.png", 16))
    assert dataset.labels.tolist() == [i % 2 for i in range(6)]


# ------------------------------------------------------------------------------------------ build_loaders


@pytest.fixture
def flat_splits(tmp_path) -> tuple[DatasetSplits, SimpleNamespace]:
    root = tmp_path / "data"
    for k, cls in enumerate(("a", "b")):
        for i in range(20):
            write_image(root / cls / f"{i:02d}.png", colour=distinct_colour(20 * k + i), size=(10, 10))
    cfg = make_cfg("folder", root, val_fraction=0.25, test_fraction=0.25)
    return prepare_splits(cfg), cfg


def test_build_loaders_batches_and_order(flat_splits):
    splits, cfg = flat_splits
    loaders = build_loaders(splits, cfg, batch_size=8, num_workers=2, seed=0)
    assert loaders["train"].num_workers == 0  # fully cached: indexing beats worker IPC
    x, y = next(iter(loaders["train"]))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (8,) and y.dtype == torch.int64
    assert len(loaders["train"]) == 20 // 8  # drop_last on train
    val_labels = torch.cat([y for _, y in loaders["val"]]).tolist()
    assert val_labels == [label for _, label in splits.val]  # eval loaders keep the split order
    first = next(iter(loaders["val"]))[0][0]
    assert torch.equal(first, decode_image(splits.root / splits.val[0][0], 16))


def epoch_order(loader) -> list[int]:
    # Every image has its own colour, so the red channel of the top-left pixel identifies it.
    return torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()


def test_build_loaders_shuffle_is_seeded(flat_splits):
    splits, cfg = flat_splits
    first = epoch_order(build_loaders(splits, cfg, 4, 0, seed=1)["train"])
    second = epoch_order(build_loaders(splits, cfg, 4, 0, seed=1)["train"])
    other = epoch_order(build_loaders(splits, cfg, 4, 0, seed=2)["train"])
    assert first == second
    assert first != other
    assert sorted(first) == sorted(other)


def test_build_loaders_streaming_with_workers_matches_cached(flat_splits):
    splits, cfg = flat_splits
    cached = build_loaders(splits, cfg, 4, 1, seed=3)["train"]
    cfg.cache = SimpleNamespace(enabled=False, max_gb=1.0)
    streaming = build_loaders(splits, cfg, 4, 1, seed=3)["train"]
    assert streaming.num_workers == 1 and streaming.persistent_workers
    assert epoch_order(streaming) == epoch_order(cached)


@pytest.mark.slow  # torch takes ~5 s to shut down a loader whose worker raised
def test_damage_found_only_when_decoding_in_a_worker_is_a_one_line_user_error(flat_splits):
    splits, cfg = flat_splits
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    broken = splits.train[3][0]
    (splits.root / broken).write_bytes(buffer.getvalue()[:-2000])  # header intact: passes PIL's verify
    cfg.cache = SimpleNamespace(enabled=False, max_gb=1.0)
    loader = build_loaders(splits, cfg, 4, 1, seed=0)["train"]
    with pytest.raises(UnreadableImage) as info:
        list(loader)
    assert broken in str(info.value)
    assert "\n" not in str(info.value)


def test_build_loaders_batch_larger_than_train_set_is_lowered(flat_splits, caplog):
    splits, cfg = flat_splits
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        loaders = build_loaders(splits, cfg, batch_size=64, num_workers=0, seed=0)
    assert "batch_size=64 is larger than the train set (20 images); using batch_size=20" in caplog.text
    assert loaders["train"].batch_size == len(splits.train) == 20
    assert len(loaders["train"]) == 1  # one full step per epoch instead of zero
    assert next(iter(loaders["train"]))[0].shape[0] == 20


def test_build_loaders_skip_bad_records_skipped_files(flat_splits, caplog):
    splits, cfg = flat_splits
    bad = splits.val[0][0]
    (splits.root / bad).write_bytes(b"junk")
    with pytest.raises(UserError, match=bad):
        build_loaders(splits, cfg, 4, 0, seed=0)
    cfg.skip_bad = True
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        loaders = build_loaders(splits, cfg, 4, 0, seed=0)
    assert f"skipped 1 undecodable image(s) in the val split (dataset.skip_bad=true): {bad}" in caplog.text
    assert splits.skipped == [bad]
    assert bad not in [path for path, _ in splits.val]
    assert len(loaders["val"].dataset) == len(splits.val) == 9


def test_cached_batches_are_gathered_in_one_op_without_per_sample_calls(flat_splits, monkeypatch):
    """From the cache a batch is one indexing op (`__getitems__`), in the order a per-sample loader would give,
    also through a Subset (sharded evaluation) and the rank loader's batch sampler."""
    from torch.utils.data import Subset

    from lora_cls.data.loaders import eval_loader

    splits, cfg = flat_splits
    loaders = build_loaders(splits, cfg, 4, 0, seed=5)
    train = loaders["train"]
    expected = epoch_order(build_loaders(splits, cfg, 4, 0, seed=5)["train"])

    def per_sample(self, index):
        raise AssertionError("a cached batch must not be assembled sample by sample")

    monkeypatch.setattr(ImageDataset, "__getitem__", per_sample)
    assert epoch_order(train) == expected
    dataset = loaders["val"].dataset
    x, y = next(iter(eval_loader(Subset(dataset, [3, 0, 2]), 3)))
    assert torch.equal(x, dataset.images[[3, 0, 2]]) and y.tolist() == dataset.labels[[3, 0, 2]].tolist()
