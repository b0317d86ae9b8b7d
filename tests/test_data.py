"""Dataset layouts, splits, decoding and loaders, on small files laid out exactly like the real ones."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_cls import data
from lora_cls.data import (
    DatasetSplits,
    ImageDataset,
    UnreadableImage,
    build_loaders,
    decode_image,
    ensure_synthetic,
    generate_synthetic,
    grouped_split,
    malaria_patient,
    prepare_splits,
    read_splits_json,
    stratified_split,
    synthetic_counts,
    write_splits_json,
)
from lora_cls.errors import UserError


def make_cfg(name: str, root: Path, **overrides) -> SimpleNamespace:
    cfg = SimpleNamespace(
        name=name, root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=0,
        positive_class=None, skip_bad=False,
        synthetic=SimpleNamespace(num_per_class=10, source_size=32, seed=0),
        augment=SimpleNamespace(hflip=True, rotation=10.0, color_jitter=0.1),
        cache=SimpleNamespace(enabled=True, max_gb=1.0),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def distinct_colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


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

    monkeypatch.setattr(data, "generate_synthetic", must_not_run)
    assert prepare_splits(cfg) == first


def test_synthetic_keeps_a_set_finished_concurrently(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    real_generate = data.generate_synthetic

    def racing_generate(target, *args):
        real_generate(target, *args)
        real_generate(root, *args)  # another sweep job finishes the same set first
        (root / "sentinel").write_text("theirs")

    monkeypatch.setattr(data, "generate_synthetic", racing_generate)
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


# ------------------------------------------------------------------------------------------ folder


def test_folder_presplit_layout_is_used_as_is(tmp_path):
    expected = {}
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        expected[split] = []
        for label, cls in enumerate(("cat", "dog")):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.png")
                expected[split].append((f"{split}/{cls}/{i}.png", label))
    splits = prepare_splits(make_cfg("folder", tmp_path))
    assert splits.classes == ["cat", "dog"]
    assert splits.positive_class == "dog"  # binary folder: the second class in sorted order
    for split in ("train", "val", "test"):
        assert splits.split(split) == sorted(expected[split])


def test_folder_presplit_without_val_takes_val_from_train(tmp_path):
    for label_name, n in (("a", 10), ("b", 20)):
        for i in range(n):
            write_image(tmp_path / "train" / label_name / f"{i:02d}.png")
        write_image(tmp_path / "test" / label_name / "t.png")
    splits = prepare_splits(make_cfg("folder", tmp_path, val_fraction=0.2))
    assert splits.test == [("test/a/t.png", 0), ("test/b/t.png", 1)]
    assert [label for _, label in splits.val].count(0) == 2
    assert [label for _, label in splits.val].count(1) == 4
    assert len(splits.train) == 24
    assert not set(splits.train) & set(splits.val)


def make_flat_tree(root: Path, sizes: dict[str, int]) -> set[tuple[str, str]]:
    files = set()
    for cls, n in sizes.items():
        for i in range(n):
            write_image(root / cls / f"img_{i:03d}.png", size=(8, 8))
            files.add((cls, f"{cls}/img_{i:03d}.png"))
    return files


def test_folder_flat_split_is_stratified_seeded_and_complete(tmp_path):
    sizes = {"a": 20, "b": 40, "c": 10}
    make_flat_tree(tmp_path, sizes)
    cfg = make_cfg("folder", tmp_path, val_fraction=0.2, test_fraction=0.1, split_seed=7)
    splits = prepare_splits(cfg)
    assert splits.classes == ["a", "b", "c"]
    assert splits.positive_class is None  # multiclass: no positive class unless configured
    for split, fraction in (("val", 0.2), ("test", 0.1)):
        counts = [[label for _, label in splits.split(split)].count(k) for k in range(3)]
        assert counts == [round(n * fraction) for n in sizes.values()]
    parts = [set(splits.train), set(splits.val), set(splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    union = parts[0] | parts[1] | parts[2]
    assert union == {(f"{cls}/img_{i:03d}.png", k) for k, (cls, n) in enumerate(sizes.items()) for i in range(n)}
    again = prepare_splits(cfg)
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)
    other = prepare_splits(make_cfg("folder", tmp_path, val_fraction=0.2, test_fraction=0.1, split_seed=8))
    assert other.val != splits.val


def test_folder_ignores_and_counts_non_image_files(tmp_path):
    make_flat_tree(tmp_path, {"x": 5, "y": 5})
    (tmp_path / "x" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "x" / "notes.txt").write_text("n")
    (tmp_path / "y" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "y" / "._img_000.png").write_bytes(b"\0\5")  # macOS resource fork: not an image
    (tmp_path / "README.md").write_text("loose file next to the class folders")
    write_image(tmp_path / "y" / "UPPER.JPG", size=(8, 8))
    (tmp_path / ".cache").mkdir()
    write_image(tmp_path / ".cache" / "thumb.png")
    splits = prepare_splits(make_cfg("folder", tmp_path))
    paths = {p for p, _ in splits.train + splits.val + splits.test}
    assert len(paths) == 11 and "y/UPPER.JPG" in paths
    assert splits.ignored == 5
    assert splits.classes == ["x", "y"]


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", "does not exist"),
    ("empty", "no class folders"),
    ("no_images", "no images found"),
    ("one_class", "at least two class"),
    ("val_without_train", "no train/ folder"),
])
def test_folder_errors_say_what_is_wrong(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "a" / "notes.txt").write_text("x")
    if layout == "one_class":
        make_flat_tree(root, {"only": 10})
    if layout == "val_without_train":
        make_flat_tree(root / "val", {"a": 2, "b": 2})
    with pytest.raises(UserError, match=message) as info:
        prepare_splits(make_cfg("folder", root))
    assert str(root) in str(info.value)


def test_positive_class_must_be_a_class(tmp_path):
    make_flat_tree(tmp_path, {"a": 5, "b": 5})
    assert prepare_splits(make_cfg("folder", tmp_path, positive_class="a")).positive_class == "a"
    with pytest.raises(UserError, match=r"\['a', 'b'\]"):
        prepare_splits(make_cfg("folder", tmp_path, positive_class="cat"))


def test_empty_split_and_unknown_name_are_errors(tmp_path):
    make_flat_tree(tmp_path, {"a": 5, "b": 5})
    with pytest.raises(UserError, match="val_fraction"):
        prepare_splits(make_cfg("folder", tmp_path, val_fraction=0.0))
    with pytest.raises(UserError, match="folder"):
        prepare_splits(make_cfg("imagenet", tmp_path))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=2, max_size=4), val=st.floats(0.05, 0.4),
       test=st.floats(0.05, 0.4), seed=st.integers(0, 2**32 - 1))
def test_stratified_split_is_a_partition_keeping_train_examples(sizes, val, test, seed):
    samples = [(f"{c}/{i:02d}.png", c) for c, n in enumerate(sizes) for i in range(n)]
    train, val_split, test_split = stratified_split(samples, [str(c) for c in range(len(sizes))], val, test, seed)
    assert sorted(train + val_split + test_split) == sorted(samples)
    for c, n in enumerate(sizes):
        assert sum(label == c for _, label in train) >= 1
        if n >= 3:  # enough images for every split to get one of this class
            assert sum(label == c for _, label in val_split) >= 1
            assert sum(label == c for _, label in test_split) >= 1


@settings(max_examples=40, deadline=None)
@given(group_of=st.lists(st.integers(0, 15), min_size=6, max_size=80), seed=st.integers(0, 2**32 - 1))
def test_grouped_split_is_a_partition_with_no_group_in_two_splits(group_of, seed):
    samples = [(f"{i:03d}.png", i % 2) for i in range(len(group_of))]
    groups = [f"patient{g}" for g in group_of]
    parts = grouped_split(samples, groups, 2, 0.2, 0.2, seed)
    assert sorted(parts[0] + parts[1] + parts[2]) == samples
    group_sets = [{groups[int(path[:3])] for path, _ in part} for part in parts]
    assert not (group_sets[0] & group_sets[1] or group_sets[0] & group_sets[2] or group_sets[1] & group_sets[2])


# ------------------------------------------------------------------------------------------ smoking


def make_smoking_tree(root: Path, counts=(6, 2, 2), flat: bool = False) -> None:
    for split_dir, n in zip(("Training", "Validation", "Testing"), counts):
        folder = root / split_dir if flat else root / split_dir / split_dir
        for cls in ("smoking", "notsmoking"):
            for i in range(n):
                write_image(folder / f"{cls}_{i:04d}.jpg", size=(25, 25))


def test_smoking_nested_layout_labels_and_published_split(tmp_path, caplog):
    make_smoking_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        splits = prepare_splits(make_cfg("smoking", tmp_path))
    assert "the published set has {'train': 716" in caplog.text
    assert splits.classes == ["notsmoking", "smoking"]
    assert splits.positive_class == "smoking"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    assert ("Training/Training/smoking_0000.jpg", 1) in splits.train
    assert ("Training/Training/notsmoking_0005.jpg", 0) in splits.train
    assert ("Testing/Testing/notsmoking_0001.jpg", 0) in splits.test
    for path, label in splits.train + splits.val + splits.test:
        assert Path(path).name.startswith("smoking_" if label == 1 else "notsmoking_")


def test_smoking_badly_prefixed_file_is_named(tmp_path):
    make_smoking_tree(tmp_path)
    write_image(tmp_path / "Validation" / "Validation" / "selfie_0001.jpg")
    with pytest.raises(UserError, match="Validation/Validation/selfie_0001.jpg"):
        prepare_splits(make_cfg("smoking", tmp_path))


def test_smoking_flattened_layout_is_accepted(tmp_path, caplog):
    make_smoking_tree(tmp_path, flat=True)
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        splits = prepare_splits(make_cfg("smoking", tmp_path))
    assert "not comparable with published numbers" in caplog.text
    assert ("Validation/smoking_0001.jpg", 1) in splits.val
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)


def test_smoking_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="Kaggle .smoking. archive"):
        prepare_splits(make_cfg("smoking", tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="Kaggle .smoking. archive"):
        prepare_splits(make_cfg("smoking", tmp_path / "empty"))


# ------------------------------------------------------------------------------------------ malaria


def make_malaria_tree(base: Path) -> dict[str, int]:
    """12 patients, each in both classes with 2–4 cells per class; a Thumbs.db in each class folder."""
    counts = {"Parasitized": 0, "Uninfected": 0}
    for p in range(12):
        patient = f"C{30 + p}P{p}thinF"
        for k, cls in enumerate(("Parasitized", "Uninfected")):
            for c in range(2 + (p + k) % 3):
                write_image(base / cls / f"{patient}_IMG_20150619_11475{c}a_cell_{100 + c}.png",
                            colour=distinct_colour(p), size=(12, 12))
                counts[cls] += 1
    for cls in counts:
        (base / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    return counts


def test_malaria_split_grouped_by_patient_and_stratified(tmp_path):
    counts = make_malaria_tree(tmp_path / "cell_images")
    cfg = make_cfg("malaria", tmp_path, val_fraction=0.2, test_fraction=0.2, split_seed=0)
    splits = prepare_splits(cfg)
    assert splits.classes == ["Parasitized", "Uninfected"]
    assert splits.positive_class == "Parasitized"
    assert splits.ignored == 2
    everything = splits.train + splits.val + splits.test
    assert len(everything) == sum(counts.values())
    assert sum(label == 0 for _, label in everything) == counts["Parasitized"]
    assert all(path.startswith(f"cell_images/{splits.classes[label]}/") for path, label in everything)
    patients = [{malaria_patient(path) for path, _ in s} for s in (splits.train, splits.val, splits.test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(patients[0] | patients[1] | patients[2]) == 12
    for split in (splits.train, splits.val, splits.test):
        assert {label for _, label in split} == {0, 1}
    assert 0.1 < len(splits.test) / len(everything) < 0.3
    again = prepare_splits(cfg)
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)


def test_malaria_root_may_hold_the_class_folders_directly(tmp_path):
    make_malaria_tree(tmp_path)
    splits = prepare_splits(make_cfg("malaria", tmp_path))
    assert splits.train[0][0].startswith(("Parasitized/", "Uninfected/"))


def test_malaria_patient_id():
    assert malaria_patient("C33P1thinF_IMG_20150619_114756a_cell_179.png") == "C33P1thinF"
    assert malaria_patient("cell_7.png") == "cell_7"


def test_malaria_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cell_images.zip"):
        prepare_splits(make_cfg("malaria", tmp_path / "nope"))
    (tmp_path / "cell_images" / "Parasitized").mkdir(parents=True)
    with pytest.raises(UserError, match="cell_images.zip"):
        prepare_splits(make_cfg("malaria", tmp_path))


# ------------------------------------------------------------------------------------------ decoding


def palette_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 0, *colour] + [0] * 762)
    return image


def test_decode_image_converts_any_mode_to_rgb(tmp_path):
    cases = {
        "grey.png": Image.new("L", (30, 20), 77),
        "rgba.png": Image.new("RGBA", (20, 20), (10, 200, 30, 255)),
        "la.png": Image.new("LA", (20, 20), (77, 255)),
        "palette.gif": palette_image((10, 200, 30)),
        "cmyk.jpg": Image.new("CMYK", (20, 20), (0, 0, 0, 0)),
        "wide.bmp": Image.new("RGB", (40, 10), (10, 200, 30)),
    }
    expected = {"grey.png": (77, 77, 77), "rgba.png": (10, 200, 30), "la.png": (77, 77, 77),
                "palette.gif": (10, 200, 30), "cmyk.jpg": (255, 255, 255), "wide.bmp": (10, 200, 30)}
    for name, image in cases.items():
        image.save(tmp_path / name)
        out = decode_image(tmp_path / name, 16)
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16), name
        assert torch.allclose(out[:, 8, 8].int(), torch.tensor(expected[name], dtype=torch.int), atol=2), name


def test_decode_image_scales_16_bit_instead_of_clipping(tmp_path):
    for value, expected in ((32768, 128), (65535, 255), (1000, 4)):
        Image.fromarray(np.full((10, 10), value, np.uint16)).save(tmp_path / "g16.png")
        assert Image.open(tmp_path / "g16.png").mode == "I;16"
        out = decode_image(tmp_path / "g16.png", 16)
        assert out.shape == (3, 16, 16)
        assert (out.int() - expected).abs().max() <= 1, value


def test_decode_image_composites_transparency_over_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 5, 10))
    image.save(tmp_path / "half.png")
    out = decode_image(tmp_path / "half.png", 10)
    assert out[:, 5, 1].tolist() == [255, 0, 0]
    assert out[:, 5, 8].tolist() == [255, 255, 255]


def test_decode_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": left edge becomes the top
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg", 16).int()
    assert out[0, 1, 8] > 200 and out[2, 1, 8] < 60  # top is red
    assert out[2, 14, 8] > 200 and out[0, 14, 8] < 60  # bottom is blue


def test_decode_image_undecodable_raises_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImage, match=str(path)) as info:
            decode_image(path, 16)
        assert isinstance(info.value, UserError)
        assert info.value.path == str(path)


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
    streaming = ImageDataset(tmp_path, samples, 16, cache=True, max_cache_bytes=100)
    assert cached.cached and not streaming.cached
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


# ------------------------------------------------------------------------------------------ splits.json


def test_splits_json_round_trip_and_root_override(tmp_path):
    make_flat_tree(tmp_path / "data", {"a": 6, "b": 6})
    splits = prepare_splits(make_cfg("folder", tmp_path / "data"))
    splits.skipped = ["a/broken.png"]
    path = tmp_path / "run" / "splits.json"
    write_splits_json(splits, path)
    assert os.listdir(path.parent) == ["splits.json"]  # the temp file was renamed, not left over
    d = json.loads(path.read_text())
    assert d["train"] == [p for p, _ in splits.train]
    assert d["labels"]["val"] == [label for _, label in splits.val]
    assert d["root"] == str(splits.root)
    loaded = read_splits_json(path)
    assert loaded == splits
    moved = read_splits_json(path, root=tmp_path / "copy")
    assert moved.root == tmp_path / "copy" and moved.train == splits.train
    assert DatasetSplits.from_json(splits.to_json()) == splits


def test_read_splits_json_rejects_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_splits_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"classes": ["a"], "train": ["x"]}))
    with pytest.raises(UserError, match="malformed"):
        read_splits_json(tmp_path / "bad.json")


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
