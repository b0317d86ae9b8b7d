"""The run folder's one writer: atomic (old file kept on failure, no temp left), strict JSON, the umask's modes."""

import json
import os

import numpy as np
import pytest

from lora_cls import files as runfolder
from lora_cls.files import write_json, write_text


def test_write_json_creates_parents_and_writes_strict_json(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_json(
        path, {"x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(3), "nan": float("nan"), "t": (1, 2)}
    )
    text = path.read_text()
    assert json.loads(text) == {"x": 0.5, "n": 3, "arr": [0, 1, 2], "nan": None, "t": [1, 2]}
    assert text.startswith('{\n  "x"')  # indent 2
    assert "NaN" not in text


@pytest.mark.parametrize("failing", ["json.dump", "os.replace"])
def test_write_json_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "metrics.json"
    write_json(path, {"version": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if failing == "json.dump":
        monkeypatch.setattr(runfolder.json, "dump", boom)
    else:
        monkeypatch.setattr(runfolder.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"version": 2})

    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_text_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    write_text(path, "old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runfolder.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["notes.txt"]

    monkeypatch.undo()
    write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"


def test_atomic_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "r.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "checkpoints" / "last.pt"
    with runfolder.atomic_open(path, "wb") as f:
        f.write(b"epoch 1")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.fsync raises it: no file name

    monkeypatch.setattr(runfolder.os, "fsync", full)
    with pytest.raises(OSError) as info:
        with runfolder.atomic_open(path, "wb") as f:
            f.write(b"epoch 2")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b"epoch 1" and os.listdir(path.parent) == ["last.pt"]
