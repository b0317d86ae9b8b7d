"""Dataset layouts (folder, smoking, malaria) and their registry, on small files laid out like the real ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import distinct_colour, make_cfg, make_flat_tree, write_image

import lora_cls.conf
from lora_cls.data.layouts import DATASET_NAMES, LAYOUTS, malaria_patient, prepare_splits
from lora_cls.errors import UserError


def test_layouts_registry_is_the_list_of_dataset_configs():
    # One yaml file per registered layout, and no other: the registry is the only list of dataset names.
    configs = Path(lora_cls.conf.__file__).parent / "dataset"
    assert sorted(LAYOUTS) == sorted(p.stem for p in configs.glob("*.yaml"))
    assert DATASET_NAMES == tuple(LAYOUTS)


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


def test_a_class_too_small_for_every_split_is_named_in_a_warning(tmp_path, caplog):
    make_flat_tree(tmp_path, {"common": 20, "rare": 2})  # 2 images at 15 %: one to train, one to val, none to test
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        splits = prepare_splits(make_cfg("folder", tmp_path, val_fraction=0.15, test_fraction=0.15))
    counts = splits.class_counts()
    assert counts["test"]["rare"] == 0 and counts["train"]["rare"] >= 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("class(es) rare have no image in the test split (2 image(s) in all)")
