"""The decoded-image cache (lora_cls.data.cache): reuse without decoding, invalidation, atomic and concurrent
writes, the size cap, bad files through the cache, `lora-data cache`, and a set larger than the cap."""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_cls.cli import data as data_cli
from lora_cls.data import cache
from lora_cls.data.decode import UndecodableImages, decode_image
from lora_cls.data.loaders import ImageDataset


def write_pngs(root: Path, n: int, start: int = 0, size: int = 24) -> list[tuple[str, int]]:
    samples = []
    for i in range(start, start + n):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        path = root / f"c{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        samples.append((f"c{i % 2}/{i:03d}.png", i % 2))
    return samples


def no_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the images")

    monkeypatch.setattr(cache, "decode_array", fail)


def test_second_build_maps_the_entry_without_decoding(tmp_path, monkeypatch):
    samples = write_pngs(tmp_path / "data", 10)
    first = ImageDataset(tmp_path / "data", samples, 16, cache_dir=tmp_path / "cache")
    assert first.cached and first.cache_hit is False and first.cache_path.parent == tmp_path / "cache"
    no_decoding(monkeypatch)
    second = ImageDataset(tmp_path / "data", samples, 16, cache_dir=tmp_path / "cache")
    assert second.cache_hit is True and second.cache_path == first.cache_path
    assert second.images.shape == (10, 3, 16, 16) and second.images.dtype == torch.uint8
    assert torch.equal(second.images, first.images)
    assert torch.equal(second[7][0], decode_image(tmp_path / "data" / samples[7][0], 16)) and second[7][1] == 1
    assert [e.images for e in cache.entries(tmp_path / "cache")] == [10]


def _touch(root, samples):
    path = root / samples[3][0]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    return samples, 16, None


def _rewrite(root, samples):
    Image.new("RGB", (24, 28), (10, 200, 30)).save(root / samples[3][0])
    return samples, 16, None


CHANGES = {
    "touched file": _touch,
    "rewritten file": _rewrite,
    "added file": lambda root, samples: (samples + write_pngs(root, 1, start=50), 16, None),
    "removed file": lambda root, samples: (samples[:-1], 16, None),
    "image size": lambda root, samples: (samples, 20, None),
    "max_pixels": lambda root, samples: (samples, 16, 10_000),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_change_to_the_files_or_settings_gives_a_new_entry(tmp_path, change):
    root, folder = tmp_path / "data", tmp_path / "cache"
    samples = write_pngs(root, 6)
    before = cache.load_or_decode(root, [p for p, _ in samples], 16, None, folder)
    changed, size, max_pixels = CHANGES[change](root, samples)
    after = cache.load_or_decode(root, [p for p, _ in changed], size, max_pixels, folder)
    assert after.hit is False and after.key != before.key
    assert len(cache.entries(folder)) == 2
    expected = torch.stack([decode_image(root / p, size) for p, _ in changed]).numpy()
    assert np.array_equal(after.images, expected)  # the new bytes, e.g. the green rewritten image


def test_stale_temp_and_damaged_entry_are_never_served(tmp_path):
    root, folder = tmp_path / "data", tmp_path / "cache"
    paths = [p for p, _ in write_pngs(root, 4)]
    key = cache.entry_key(root.resolve(), paths, 16, None)
    temp = folder / f"{cache.TEMP}{key}-99999"  # what a writer killed mid-way leaves
    temp.mkdir(parents=True)
    (temp / cache.DATA).write_bytes(b"\xff" * 4 * 3 * 16 * 16)
    (temp / cache.META).write_text(json.dumps({"shape": [4, 3, 16, 16], "bad": []}))
    built = cache.load_or_decode(root, paths, 16, None, folder)
    expected = torch.stack([decode_image(root / p, 16) for p in paths]).numpy()
    assert built.hit is False and np.array_equal(built.images, expected)
    assert not temp.exists() and sorted(p.name for p in folder.iterdir()) == [key, f"{key}.lock"]
    del built
    os.truncate(folder / key / cache.DATA, 100)  # damaged after it was written: decoded again, not mapped
    again = cache.load_or_decode(root, paths, 16, None, folder)
    assert again.hit is False and np.array_equal(again.images, expected)


_CHILD = """
import hashlib, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from lora_cls.data import cache
found = cache.load_or_decode(sys.argv[1], sys.argv[3].split(","), 16, None, sys.argv[2])
print(found.hit, hashlib.sha256(found.images.tobytes()).hexdigest())
"""


def test_processes_building_the_same_entry_at_once_decode_it_once(tmp_path):
    root, folder = tmp_path / "data", tmp_path / "cache"
    paths = [p for p, _ in write_pngs(root, 12)]
    key = cache.entry_key(root.resolve(), paths, 16, None)
    folder.mkdir()
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both children find no entry and queue behind this lock
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(folder), ",".join(paths)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for child in children:
            assert "waiting for another process" in child.stderr.readline()
    results = [child.communicate(timeout=60)[0].split() for child in children]
    assert sorted(hit for hit, _ in results) == ["False", "True"]  # one decoded, the other mapped its entry
    expected = torch.stack([decode_image(root / p, 16) for p in paths]).numpy()
    assert {digest for _, digest in results} == {__import__("hashlib").sha256(expected.tobytes()).hexdigest()}
    assert sorted(p.name for p in folder.iterdir()) == [key, f"{key}.lock"]


def test_size_cap_evicts_least_recently_used_entries_but_not_those_in_use(tmp_path):
    root, folder = tmp_path / "data", tmp_path / "cache"
    lists = {name: [p for p, _ in write_pngs(root / name, 4)] for name in "abcd"}
    keys = {name: cache.load_or_decode(root / name, paths, 16, None, folder).key for name, paths in lists.items()
            if name != "d"}
    gc.collect()  # nothing of a, b, c is mapped any more
    for when, name in enumerate("bca"):
        os.utime(folder / keys[name] / cache.META, (1000 + when, 1000 + when))
    cache.load_or_decode(root / "b", lists["b"], 16, None, folder)  # used: now the most recent
    size = max(e.nbytes for e in cache.entries(folder))
    held = cache.load_or_decode(root / "c", lists["c"], 16, None, folder)  # in use by this process
    os.utime(folder / keys["c"] / cache.META, (900, 900))  # the oldest, but mapped
    d = cache.load_or_decode(root / "d", lists["d"], 16, None, folder, max_bytes=3 * size + size // 2)
    left = {e.key for e in cache.entries(folder)}
    assert left == {keys["b"], keys["c"], d.key}  # a went: b was used after it, c is older but held
    assert held.images.shape == (4, 3, 16, 16)


def test_bad_files_are_remembered_by_the_entry(tmp_path, monkeypatch):
    root, folder = tmp_path / "data", tmp_path / "cache"
    samples = write_pngs(root, 5)
    (root / "junk.png").write_bytes(b"junk")
    samples[1:1] = [("junk.png", 0), ("gone.png", 1)]
    with pytest.raises(UndecodableImages) as first:
        ImageDataset(root, samples, 16, cache_dir=folder)
    no_decoding(monkeypatch)
    with pytest.raises(UndecodableImages) as again:  # the same error, from meta.json
        ImageDataset(root, samples, 16, cache_dir=folder)
    assert again.value.bad == first.value.bad and [p for p, _ in first.value.bad] == ["junk.png", "gone.png"]
    assert first.value.bad[1][1] == "file not found"
    dataset = ImageDataset(root, samples, 16, cache_dir=folder, skip_bad=True)
    assert dataset.cache_hit and dataset.skipped == ["junk.png", "gone.png"]
    assert [p for p, _ in dataset.samples] == [samples[0][0], *[p for p, _ in samples[3:]]]
    assert dataset.labels.tolist() == [0, 1, 0, 1, 0] and dataset.images.shape == (5, 3, 16, 16)
    assert torch.equal(dataset[1][0], decode_image(root / samples[3][0], 16))
    assert cache.entries(folder)[0].bad == 2


def test_a_set_larger_than_the_cap_is_decoded_from_disk_and_never_written(tmp_path, caplog):
    root, folder = tmp_path / "data", tmp_path / "cache"
    samples = write_pngs(root, 6)
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        dataset = ImageDataset(root, samples, 16, cache_dir=folder, max_cache_bytes=100)  # 6·768 bytes > 100
    assert not dataset.cached and dataset.images is None and dataset.cache_hit is None
    assert "larger than dataset.cache.max_gb" in caplog.text
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing written
    expected = torch.stack([decode_image(root / p, 16) for p, _ in samples])
    assert torch.equal(torch.stack([dataset[i][0] for i in range(6)]), expected)
    # called directly, the cache module still serves such a set from a temp file that lives as the mapping only
    assert isinstance(cache.load_or_decode(root, [p for p, _ in samples], 16, None, folder, 100).images, np.memmap)
    assert list(folder.glob(f"*/{cache.META}")) == [] and list(folder.glob(f"{cache.TEMP}*")) == []


def test_lora_data_cache_lists_and_clears_by_root(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    for name, n in (("one", 3), ("two", 5)):
        cache.load_or_decode(tmp_path / name, [p for p, _ in write_pngs(tmp_path / name, n)], 16, None, folder)

    def lora_data(*args: str) -> list[str]:
        monkeypatch.setattr(sys, "argv", ["lora-data", "cache", *args])
        data_cli.main()
        return capsys.readouterr().out.splitlines()

    listing = lora_data(f"dir={folder}")
    assert listing[0] == f"decoded-image cache: {folder}"
    rows = {line.split()[-1]: line.split() for line in listing[2:4]}
    assert rows[str((tmp_path / "one").resolve())][4] == "3" and rows[str((tmp_path / "two").resolve())][4] == "5"
    assert listing[-1].startswith("2 entries, 0.0 MiB")
    assert lora_data("clear", f"root={tmp_path / 'one'}", f"dir={folder}")[0].startswith("removed 1 entry of ")
    assert [e.images for e in cache.entries(folder)] == [5]
    assert lora_data("clear", f"dir={folder}") == [f"removed 1 entry (0.0 MiB) from {folder}"]
    assert cache.entries(folder) == [] and list(folder.iterdir()) == []
    with pytest.raises(SystemExit) as usage:
        lora_data("clear", "everything")
    assert usage.value.code == 2 and "usage: lora-data cache" in capsys.readouterr().err


@pytest.mark.slow  # two tiny training runs
def test_a_second_run_reuses_the_first_runs_decoded_images(tmp_path, monkeypatch, tiny_overrides, caplog):
    from conftest import compose_config

    from lora_cls.tasks.train import train

    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "cache"))
    cfg = compose_config("train", [*tiny_overrides, "trainer.max_steps_per_epoch=1"])
    notes = []
    for run in ("first", "second"):
        with caplog.at_level(logging.INFO, logger="lora_cls.tasks.train"):
            caplog.clear()
            train(cfg, tmp_path / run)
        notes += [r.getMessage() for r in caplog.records if r.getMessage().startswith("run: ")]
        no_decoding(monkeypatch)
    assert f"images decoded once into the decoded-image cache (miss) in {tmp_path / 'cache'}, memory" in notes[0]
    assert f"images from the decoded-image cache (hit) in {tmp_path / 'cache'}, memory-mapped (" in notes[1]
    assert len(cache.entries(tmp_path / "cache")) == 3  # train, val, test


@pytest.mark.slow  # the session's finished run
def test_lora_eval_and_predict_split_read_the_runs_entries(tiny_run, compose_cfg, tmp_path, monkeypatch):
    from lora_cls.tasks import predict as predict_module
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    no_decoding(monkeypatch)  # the test split was decoded by the run (or an earlier test): nothing is decoded now
    monkeypatch.setattr(predict_module, "decode_image", lambda *a, **k: pytest.fail("lora-predict decoded"))
    monkeypatch.setattr(predict_module, "verify_image", lambda *a, **k: pytest.fail("lora-predict verified"))
    metrics = evaluate_checkpoint(compose_cfg(f"ckpt={tiny_run.run_dir}", "split=test", "progress=false",
                                              config_name="eval"), tmp_path / "eval")
    rows = predict_module.predict(compose_cfg(f"ckpt={tiny_run.run_dir}", "split=test", "progress=false",
                                              config_name="predict"), tmp_path / "predict")
    assert len(rows) == metrics["images"] == len(json.loads((tiny_run.run_dir / "splits.json").read_text())["test"])
    accuracy = np.mean([r["path"].split("/")[-2] == r["predicted"] for r in rows])
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])
