"""lora-predict: the merged model on new images gives lora-eval's predictions; inputs as file, folder or glob;
undecodable inputs are listed (or skipped with skip_bad); the CLI keeps the error contract."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lora_cls.conf.load import register_configs
from lora_cls.data.loaders import ImageDataset
from lora_cls.data.splits import read_splits_json
from lora_cls.errors import UserError
from lora_cls.tasks.predict import collect_inputs, predict

register_configs()


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def predict_cfg(tiny_run, compose_cfg, path_override):
    def _cfg(input_spec, *overrides: str):
        return compose_cfg(path_override("ckpt", tiny_run.run_dir), path_override("input", input_spec),
                           "progress=false", *overrides, config_name="predict")

    return _cfg


def test_predict_on_the_test_folder_matches_lora_eval(tiny_run, synthetic_root, predict_cfg, compose_cfg,
                                                      path_override, tmp_path):
    from lora_cls.data.loaders import eval_loader
    from lora_cls.data.preprocess import EvalTransform, Preprocessing
    from lora_cls.engine.device import resolve_device, resolve_precision
    from lora_cls.engine.evaluation import evaluate
    from lora_cls.tasks.build import load_model_from_checkpoint
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    rows = predict(predict_cfg(synthetic_root / "test"), tmp_path / "predict")
    written = read_csv(tmp_path / "predict" / "predictions.csv")
    assert list(written[0]) == ["path", "predicted", "prob_parasitized", "prob_uninfected"]
    assert [r["path"] for r in written] == [r["path"] for r in rows]
    assert len(rows) == 12
    for row in written:
        p = [float(row["prob_parasitized"]), float(row["prob_uninfected"])]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == ("parasitized" if p[0] > p[1] else "uninfected")

    # lora-eval on the run's test split (the same 12 files): identical (true, predicted) counts.
    eval_cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "split=test", "progress=false",
                           config_name="eval")
    evaluate_checkpoint(eval_cfg, tmp_path / "eval")
    with open(tmp_path / "eval" / "reports" / "test" / "confusion_matrix.csv", encoding="utf-8", newline="") as f:
        matrix = list(csv.reader(f))
    classes = matrix[0][1:]
    eval_counts = {(r[0], classes[j]): int(v) for r in matrix[1:] for j, v in enumerate(r[1:])}
    pred_counts = Counter((Path(r["path"]).parent.name, r["predicted"]) for r in rows)
    assert {k: pred_counts.get(k, 0) for k in eval_counts} == eval_counts

    # And image by image: the unmerged model through lora-eval's evaluation loop predicts the same classes.
    splits = read_splits_json(tiny_run.run_dir / "splits.json")
    model, train_cfg, meta = load_model_from_checkpoint(tiny_run.run_dir / "checkpoints" / "adapter.safetensors")
    prep = Preprocessing.from_json(meta["preprocessing"], int(train_cfg.dataset.image_size))
    dataset = ImageDataset(splits.root, splits.test, prep.geometry)
    device = resolve_device("auto")
    # In float32, so that the comparison is of the models and not of bf16 rounding in two memory layouts
    # (merged plain layers vs the adapter model): probabilities agree to 1e-4.
    rows32 = predict(predict_cfg(synthetic_root / "test", "precision=32"), tmp_path / "predict32")
    out = evaluate(model.to(device), eval_loader(dataset, int(meta["eval_batch_size"])),
                   EvalTransform(prep).to(device), device, resolve_precision("32", device),
                   progress=False)
    assert [str(splits.root / p) for p, _ in splits.test] == [r["path"] for r in rows32]
    assert [splits.classes[i] for i in out.y_pred] == [r["predicted"] for r in rows32]
    probs = np.array([[r["prob_parasitized"], r["prob_uninfected"]] for r in rows32])
    np.testing.assert_allclose(probs, out.probs, atol=1e-4)


def test_inputs_as_file_folder_or_glob(synthetic_root, tmp_path):
    test = synthetic_root / "test"
    everything = collect_inputs(str(test))
    assert len(everything) == 12 and everything == sorted(everything)
    assert collect_inputs(str(everything[0])) == [everything[0]]
    assert collect_inputs(str(test / "*" / "*.png")) == everything
    assert collect_inputs(str(synthetic_root / "**" / "uninfected" / "*.png")) == sorted(
        p for p in synthetic_root.rglob("*.png") if p.parent.name == "uninfected")
    folder = tmp_path / "photos"
    (folder / ".hidden").mkdir(parents=True)
    shutil.copy(everything[0], folder / "a.PNG")
    shutil.copy(everything[1], folder / ".hidden" / "b.png")
    (folder / "Thumbs.db").write_bytes(b"x")
    (folder / "._a.png").write_bytes(b"x")  # a macOS resource fork
    assert collect_inputs(str(folder)) == [folder / "a.PNG"]
    for spec, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "photos" / ".hidden" / "*.txt",
                                                                     "matches no image")):
        with pytest.raises(UserError, match=message):
            collect_inputs(str(spec))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        collect_inputs(str(tmp_path / "empty"))


def test_undecodable_inputs_are_listed_or_skipped(synthetic_root, predict_cfg, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for source in sorted((synthetic_root / "test" / "parasitized").glob("*.png"))[:3]:
        shutil.copy(source, folder / source.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match=r"1 input file\(s\) are not decodable.*skip_bad=true") as info:
        predict(predict_cfg(folder), tmp_path / "refused")
    assert str(folder / "broken.png") in str(info.value)
    assert not (tmp_path / "refused" / "predictions.csv").exists()

    rows = predict(predict_cfg(folder, "skip_bad=true"), tmp_path / "skipped")
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder.glob("0*.png"))
    summary = json.loads((tmp_path / "skipped" / "predict.json").read_text(encoding="utf-8"))
    assert [s["path"] for s in summary["skipped"]] == [str(folder / "broken.png")]
    assert summary["images"] == 3 and sum(summary["class_counts"].values()) == 3


@pytest.mark.slow
def test_lora_predict_cli_writes_predictions_and_reports_errors(run_cli, tiny_run, synthetic_root, path_override,
                                                               tmp_path):
    out_dir = tmp_path / "pred"
    proc = run_cli("lora-predict", path_override("ckpt", tiny_run.run_dir),
                   path_override("input", synthetic_root / "test"), "progress=false",
                   path_override("hydra.run.dir", out_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_csv(out_dir / "predictions.csv")) == 12
    assert "predicted classes" in proc.stdout and "predictions (12 of 12)" in proc.stdout

    proc = run_cli("lora-predict", path_override("ckpt", tiny_run.run_dir),
                   path_override("input", tmp_path / "nothing_here"), "progress=false",
                   path_override("hydra.run.dir", tmp_path / "err"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: input ") and "does not exist" in last


@pytest.mark.parametrize("n_classes", [2, 3, 12])
def test_the_prediction_table_is_readable_at_80_columns(n_classes):
    """No line wider than the terminal, no path folded into slivers, probabilities with all their digits."""
    from rich.console import Console

    from lora_cls.runs.console import print_predictions

    classes = [f"a_rather_long_class_name_{i}" for i in range(n_classes)]
    rows = []
    for i in range(4):
        probs = [0.5 if k == i % n_classes else 0.5 / (n_classes - 1) for k in range(n_classes)]
        rows.append({"path": f"/data/a/rather/long/folder/holding/the/images/batch_{i}/garden_{i:04d}.jpg",
                     "predicted": classes[i % n_classes], **{f"prob_{c}": p for c, p in zip(classes, probs)}})
    console = Console(width=80, record=True)
    print_predictions(rows, classes, console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for i in range(4):
        row = next(line for line in lines if f"garden_{i:04d}.jpg" in line)  # the file name, whole
        assert "0.5000" in row  # the predicted class's probability, whole
