"""The data check (`lora-data check`): counts, sizes, and the planted problems it must find — a broken image,
an identical file in two splits, a patient in two splits — plus training's refusal of undecodable files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from rich.console import Console

from lora_cls.data.check import check_dataset
from lora_cls.data.layouts import prepare_splits
from lora_cls.data.splits import write_splits_json
from lora_cls.errors import UserError
from lora_cls.tasks.datacheck import run_check


def dataset_cfg(name: str, root: Path, **overrides) -> SimpleNamespace:
    d = SimpleNamespace(name=name, root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.2,
                        split_seed=0, positive_class=None, skip_bad=False,
                        synthetic=SimpleNamespace(num_per_class=10, source_size=32, seed=0),
                        cache=SimpleNamespace(enabled=True, max_gb=1.0), max_image_pixels=89_478_485)
    for key, value in overrides.items():
        setattr(d, key, value)
    return d


def check_cfg(dataset: SimpleNamespace | None = None, splits: str | None = None, patients=None) -> SimpleNamespace:
    return SimpleNamespace(dataset=dataset or dataset_cfg("synthetic", "unused"), splits=splits, patients=patients,
                           show=20, progress=False)


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def cell_name(patient: int, cell: int) -> str:
    return f"C{30 + patient}P{patient}thinF_IMG_20150619_1147{cell:02d}a_cell_{cell}.png"


def make_malaria_tree(base: Path, patients: int = 12, cells: int = 2) -> None:
    """NIH layout: cell_images/{Parasitized,Uninfected}/<patient>_IMG_..._cell_<n>.png, every file distinct,
    sizes varying per patient, a Thumbs.db in each class folder."""
    for p in range(patients):
        for k, cls in enumerate(("Parasitized", "Uninfected")):
            for c in range(cells):
                write_image(base / cls / cell_name(p, c), (p * 20, c * 50 + k, 100 + k), size=(40 + p, 50 + 2 * p))
    for cls in ("Parasitized", "Uninfected"):
        (base / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")


def test_clean_malaria_set_counts_sizes_and_patients(tmp_path):
    make_malaria_tree(tmp_path / "cell_images")
    report = check_dataset(check_cfg(dataset_cfg("malaria", tmp_path)))
    assert report["ok"] and report["problems"] == []
    assert report["classes"] == ["Parasitized", "Uninfected"]
    assert report["counts"]["all"] == {"Parasitized": 24, "Uninfected": 24, "total": 48}
    assert sum(report["counts"][s]["total"] for s in ("train", "val", "test")) == 48
    assert report["ignored_files"] == 2  # the two Thumbs.db
    assert report["image_sizes"]["all"]["width"] == {"min": 40, "median": 45.5, "max": 51}
    assert report["image_sizes"]["all"]["height"] == {"min": 50, "median": 61, "max": 72}
    patients = report["patients"]
    assert patients["checked"] and patients["overlap"] == []
    assert sum(patients["per_split"].values()) == 12
    assert report["bad_files"] == [] and report["duplicates"] == []


def make_presplit_copy(root: Path) -> None:
    """A malaria copy someone split at random into folder/{train,val,test}/<class>/ (the folder layout)."""
    for split, patients in (("train", range(0, 6)), ("val", range(6, 8)), ("test", range(8, 10))):
        for k, cls in enumerate(("Parasitized", "Uninfected")):
            for p in patients:
                write_image(root / split / cls / cell_name(p, 0), (p * 20, k * 90, 30))


def test_planted_broken_image_duplicate_and_patient_overlap_are_reported(tmp_path):
    make_presplit_copy(tmp_path)
    broken = tmp_path / "val" / "Uninfected" / cell_name(7, 5)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    duplicate = tmp_path / "test" / "Parasitized" / cell_name(9, 7)  # patient 9 is a test patient ...
    shutil.copy(tmp_path / "train" / "Parasitized" / cell_name(0, 0), duplicate)  # ... with a train image's bytes
    write_image(tmp_path / "test" / "Uninfected" / cell_name(3, 4), (1, 2, 3))  # train patient 3 also in test

    console = Console(width=250, record=True)
    report = run_check(check_cfg(dataset_cfg("folder", tmp_path)), tmp_path / "out", console)
    assert not report["ok"]
    assert report["bad_files"] == [{"path": f"val/Uninfected/{cell_name(7, 5)}", "split": "val",
                                    "class": "Uninfected", "reason": report["bad_files"][0]["reason"]}]
    [group] = report["duplicates"]
    assert [f["path"] for f in group["files"]] == [f"train/Parasitized/{cell_name(0, 0)}",
                                                   f"test/Parasitized/{cell_name(9, 7)}"]
    assert group["splits"] == ["train", "test"]
    assert report["patients"]["checked"]  # on by itself: every file name has the NIH _IMG_ pattern
    assert report["patients"]["overlap"] == [{"patient": "C33P3thinF", "files": {"train": 2, "test": 1}}]
    assert len(report["problems"]) == 3
    assert json.loads((tmp_path / "out" / "datacheck.json").read_text(encoding="utf-8")) == report
    out = console.export_text()
    assert cell_name(7, 5) in out and "C33P3thinF" in out and "problems:" in out


def test_identical_files_under_two_labels_are_a_problem(tmp_path):
    make_presplit_copy(tmp_path)
    shutil.copy(tmp_path / "train" / "Parasitized" / cell_name(1, 0), tmp_path / "train" / "Uninfected" / "copy.png")
    report = check_dataset(check_cfg(dataset_cfg("folder", tmp_path), patients=False))
    [group] = report["duplicates"]
    assert group["splits"] == ["train"] and group["classes"] == ["Parasitized", "Uninfected"]
    assert report["problems"] == ["1 set(s) of identical files under different labels"]
    assert not report["patients"]["checked"]


def test_a_run_split_edited_to_leak_a_patient_is_reported(tmp_path):
    make_malaria_tree(tmp_path / "cell_images")
    splits = prepare_splits(dataset_cfg("malaria", tmp_path))
    moved = splits.train.pop(0)
    splits.test.append(moved)  # one cell of a train patient now sits in test
    write_splits_json(splits, tmp_path / "run" / "splits.json")
    report = check_dataset(check_cfg(splits=str(tmp_path / "run")))
    patient = Path(moved[0]).name.split("_IMG_")[0]
    assert [row["patient"] for row in report["patients"]["overlap"]] == [patient]
    assert report["source"].startswith("splits recorded in")
    assert report["problems"] == ["1 patient(s) in more than one split"]


def test_smoking_count_mismatch_is_a_warning_not_a_problem(tmp_path):
    for s, split in enumerate(("Training", "Validation", "Testing")):
        for k, cls in enumerate(("smoking", "notsmoking")):
            for i in range(2):  # every file distinct, even after JPEG quantisation
                write_image(tmp_path / split / split / f"{cls}_{i:04d}.jpg", (40 * s, 120 * k, 100 * i))
    report = check_dataset(check_cfg(dataset_cfg("smoking", tmp_path)))
    assert report["ok"]
    assert report["counts"]["train"] == {"notsmoking": 2, "smoking": 2, "total": 4}
    assert any("716" in w for w in report["warnings"])
    assert not report["patients"]["checked"]


def test_missing_root_and_missing_splits_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="dataset.root"):
        check_dataset(check_cfg(dataset_cfg("malaria", tmp_path / "nope")))
    with pytest.raises(UserError, match="splits"):
        check_dataset(check_cfg(splits=str(tmp_path / "nope")))


def test_training_refuses_undecodable_files_and_lists_them(tmp_path, synthetic_root, compose_cfg, path_override):
    from lora_cls.tasks.train import train

    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    (root / "train" / "uninfected" / "broken.png").write_bytes(b"not an image")
    (root / "test" / "parasitized" / "empty.jpg").write_bytes(b"")
    cfg = compose_cfg("experiment=demo", "dataset.image_size=32", "dataset.synthetic.num_per_class=40",
                      "trainer.epochs=1", "trainer.progress=false", path_override("dataset.root", root))
    with pytest.raises(UserError, match=r"2 undecodable image file\(s\)") as info:
        train(cfg, tmp_path / "run")
    assert "train/uninfected/broken.png" in str(info.value) and "test/parasitized/empty.jpg" in str(info.value)
    report = check_dataset(check_cfg(cfg.dataset))
    assert sorted(row["path"] for row in report["bad_files"]) == ["test/parasitized/empty.jpg",
                                                                  "train/uninfected/broken.png"]


@pytest.mark.slow
def test_skip_bad_trains_and_records_the_skipped_files(tmp_path, synthetic_root, compose_cfg, path_override, caplog):
    from lora_cls.tasks.train import train

    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    (root / "train" / "uninfected" / "broken.png").write_bytes(b"not an image")
    cfg = compose_cfg("experiment=demo", "dataset.image_size=32", "dataset.synthetic.num_per_class=40",
                      "trainer.epochs=1", "trainer.batch_size=16", "trainer.progress=false",
                      "dataset.skip_bad=true", path_override("dataset.root", root))
    with caplog.at_level(logging.WARNING, logger="lora_cls.data"):
        metrics = train(cfg, tmp_path / "run")
    assert "skipped 1 undecodable image(s) in the train split" in caplog.text
    assert metrics["skipped_images"] == ["train/uninfected/broken.png"]
    recorded = json.loads((tmp_path / "run" / "splits.json").read_text(encoding="utf-8"))
    assert recorded["skipped"] == ["train/uninfected/broken.png"]
    assert "train/uninfected/broken.png" not in recorded["train"]


@pytest.mark.slow
def test_lora_data_check_exit_status_and_report(run_cli, tmp_path, path_override):
    make_presplit_copy(tmp_path / "clean")
    proc = run_cli("lora-data", "check", "dataset=folder", path_override("dataset.root", tmp_path / "clean"),
                   "progress=false", path_override("hydra.run.dir", tmp_path / "out_clean"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no problems found" in proc.stdout
    assert json.loads((tmp_path / "out_clean" / "datacheck.json").read_text(encoding="utf-8"))["ok"] is True

    (tmp_path / "clean" / "train" / "Parasitized" / "bad_IMG_1.png").write_bytes(b"junk")
    proc = run_cli("lora-data", "check", "dataset=folder", path_override("dataset.root", tmp_path / "clean"),
                   "progress=false", path_override("hydra.run.dir", tmp_path / "out_bad"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "bad_IMG_1.png" in proc.stdout and "Traceback" not in proc.stderr


def test_lora_data_without_a_command_is_an_error_line(run_main, tmp_path):
    proc = run_main("lora-data", "dataset=folder", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown command 'dataset=folder'; usage: lora-data check")
