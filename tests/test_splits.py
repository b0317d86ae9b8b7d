"""Splits: the seeded stratified and grouped splitters, and splits.json."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import make_cfg, make_flat_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_cls.data.layouts import prepare_splits
from lora_cls.data.splits import (
    DatasetSplits,
    grouped_split,
    read_splits_json,
    stratified_split,
    write_splits_json,
)
from lora_cls.errors import UserError


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


def test_write_splits_json_gets_the_umask_permissions_and_exact_content(tmp_path):
    splits = DatasetSplits(root=tmp_path / "data", classes=["a", "b"], positive_class="b",
                           train=[("a/0.png", 0), ("b/0.png", 1)], val=[("a/1.png", 0)], test=[("b/1.png", 1)])
    path = tmp_path / "run" / "splits.json"
    previous = os.umask(0o022)
    try:
        write_splits_json(splits, path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o022 == 0o644  # readable by others, not mkstemp's 0o600
    assert path.read_text(encoding="utf-8") == json.dumps(splits.to_json(), indent=1) + "\n"
