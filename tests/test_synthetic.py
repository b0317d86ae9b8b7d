"""The synthetic cell set: deterministic generation, its marker, never replacing a set, separable classes."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_cfg
from PIL import Image

from lora_cls.data import synthetic
from lora_cls.data.decode import decode_image
from lora_cls.data.layouts import prepare_splits
from lora_cls.data.synthetic import ensure_synthetic, generate_synthetic, synthetic_counts
from lora_cls.errors import UserError

# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_generation_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_synthetic(tmp_path / name, num_per_class=4, source_size=24, seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    differ = [not np.array_equal(np.asarray(Image.open(tmp_path / "a" / rel)),
                                 np.asarray(Image.open(tmp_path / "c" / rel))) for rel in files]
    assert all(differ)


def test_synthetic_layout_counts_and_defaults(tmp_path):
    root = tmp_path / "synthetic"
    cfg = make_cfg("synthetic", root, synthetic=SimpleNamespace(num_per_class=20, source_size=24, seed=0))
    splits = prepare_splits(cfg)
    assert splits.classes == ["parasitized", "uninfected"]
    assert splits.positive_class == "parasitized"
    assert synthetic_counts(20) == {"train": 14, "val": 3, "test": 3}
    for name, per_class in (("train", 14), ("val", 3), ("test", 3)):
        samples = splits.split(name)
        assert [label for _, label in samples].count(0) == per_class
        assert [label for _, label in samples].count(1) == per_class
        assert all(path.startswith(f"{name}/{splits.classes[label]}/") for path, label in samples)
    assert ("train/parasitized/0000.png", 0) in splits.train
    assert ("test/uninfected/0019.png", 1) in splits.test
    marker = json.loads((root / ".synthetic.json").read_text())
    assert (marker["num_per_class"], marker["source_size"], marker["seed"]) == (20, 24, 0)
    assert splits.ignored == 0
    assert Image.open(root / "val/uninfected/0014.png").size == (24, 24)


def test_synthetic_marker_prevents_regeneration(tmp_path):
    root = tmp_path / "synthetic"
    cfg = make_cfg("synthetic", root, synthetic=SimpleNamespace(num_per_class=5, source_size=16, seed=0))
    prepare_splits(cfg)
    probe = root / "train/parasitized/0000.png"
    os.utime(probe, (1_000_000, 1_000_000))
    prepare_splits(cfg)
    assert probe.stat().st_mtime == 1_000_000
    assert ensure_synthetic(root, 5, 16, 0) is False
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    # Other parameters: the set is kept (earlier runs' splits.json name its files), and the error says what to do.
    with pytest.raises(UserError, match=r"made with version=1, num_per_class=5, source_size=16, seed=0, not "
                       r"version=1, num_per_class=5, source_size=16, seed=1.*dataset.root=.*synthetic_n5_s16_seed1"):
        ensure_synthetic(root, 5, 16, 1)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "synthetic"]  # no temp folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_synthetic(empty, 3, 16, 0) is True and len(list(empty.rglob("*.png"))) == 6


def test_synthetic_matching_marker_skips_generation(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    cfg = make_cfg("synthetic", root, synthetic=SimpleNamespace(num_per_class=5, source_size=16, seed=0))
    first = prepare_splits(cfg)

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a set whose marker matches")

    monkeypatch.setattr(synthetic, "generate_synthetic", must_not_run)
    assert prepare_splits(cfg) == first


def test_synthetic_keeps_a_set_finished_concurrently(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    real_generate = synthetic.generate_synthetic

    def racing_generate(target, *args):
        real_generate(target, *args)
        real_generate(root, *args)  # another sweep job finishes the same set first
        (root / "sentinel").write_text("theirs")

    monkeypatch.setattr(synthetic, "generate_synthetic", racing_generate)
    assert ensure_synthetic(root, 4, 16, 0) is False
    assert (root / "sentinel").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if p.name != "synthetic"]


def test_synthetic_refuses_to_overwrite_a_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a synthetic set"):
        prepare_splits(make_cfg("synthetic", root))
    assert (root / "notes.txt").read_text() == "keep me"


def test_synthetic_classes_separable_by_darkest_pixel_at_32px(tmp_path):
    generate_synthetic(tmp_path / "s", num_per_class=40, source_size=48, seed=3)
    darkest = {}
    for cls in ("parasitized", "uninfected"):
        paths = sorted((tmp_path / "s").glob(f"*/{cls}/*.png"))
        images = torch.stack([decode_image(p, 32) for p in paths]).float()
        assert images.shape == (40, 3, 32, 32)
        darkest[cls] = images.mean(1).flatten(1).min(1).values
    dark_p, dark_u = darkest["parasitized"], darkest["uninfected"]
    assert dark_u.mean() - dark_p.mean() > 40
    threshold = (dark_p.mean() + dark_u.mean()) / 2
    accuracy = ((dark_p < threshold).float().mean() + (dark_u >= threshold).float().mean()) / 2
    assert accuracy >= 0.95
