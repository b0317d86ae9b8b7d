"""errors.csv / errors.png (lora-eval): exactly the misclassified images, checked against the confusion matrix,
the metrics and lora-predict on the run's own split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lora_cls.runs.misclassified import misclassified, write_errors_csv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_misclassified_are_ordered_by_confidence():
    y_true = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]], dtype=np.float32)
    assert misclassified(y_true, probs) == [1, 2]


def test_errors_csv_has_a_probability_per_class(tmp_path):
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], dtype=np.float32)
    write_errors_csv(tmp_path / "e.csv", ["a.png", "b.png"], np.array([1, 0]), probs, ["x", "y", "z"])
    assert read_csv(tmp_path / "e.csv") == [{"path": "b.png", "true": "x", "predicted": "z", "prob_x": "0.100000",
                                             "prob_y": "0.100000", "prob_z": "0.800000"}]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory, compose_cfg):
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    out = tmp_path_factory.mktemp("eval") / "run"
    metrics = evaluate_checkpoint(compose_cfg(f"ckpt={tiny_run.run_dir}", "split=train", "progress=false",
                                              config_name="eval"), out)
    return out, metrics


@pytest.mark.slow
def test_errors_csv_lists_exactly_the_misclassified_images(evaluated, tiny_run):
    out, metrics = evaluated
    rows = read_csv(out / "reports" / "train" / "errors.csv")
    splits = json.loads((tiny_run.run_dir / "splits.json").read_text())
    labels = dict(zip(splits["train"], splits["labels"]["train"]))
    classes = splits["classes"]
    with open(out / "reports" / "train" / "confusion_matrix.csv", newline="") as f:
        cm = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    assert len(rows) == cm.sum() - np.trace(cm) == metrics["misclassified"] > 0
    assert len(rows) == round((1 - metrics["train"]["accuracy"]) * metrics["images"])
    pairs = {}
    for row in rows:
        rel = row["path"][len(splits["root"]) + 1:]
        assert classes[labels[rel]] == row["true"] != row["predicted"]
        assert max(classes, key=lambda c: float(row[f"prob_{c}"])) == row["predicted"]
        pairs[(row["true"], row["predicted"])] = pairs.get((row["true"], row["predicted"]), 0) + 1
    for (t, p), n in pairs.items():
        assert cm[classes.index(t), classes.index(p)] == n
    assert (out / "reports" / "train" / "errors.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_predict_on_the_run_split_agrees_with_errors_csv(evaluated, tiny_run, tmp_path, compose_cfg):
    from lora_cls.tasks.predict import predict

    out, _ = evaluated
    rows = predict(compose_cfg(f"ckpt={tiny_run.run_dir}", "split=train", "progress=false", config_name="predict"),
                   tmp_path / "predict")
    splits = json.loads((tiny_run.run_dir / "splits.json").read_text())
    truth = {f"{splits['root']}/{p}": splits["classes"][y] for p, y in zip(splits["train"], splits["labels"]["train"])}
    assert len(rows) == len(truth)
    wrong = {r["path"] for r in rows if r["predicted"] != truth[r["path"]]}
    assert wrong == {r["path"] for r in read_csv(out / "reports" / "train" / "errors.csv")}
    assert json.loads((tmp_path / "predict" / "predict.json").read_text())["split"] == "train"


def test_predict_needs_input_or_split_not_both(compose_cfg):
    from lora_cls.conf.checks import validate_predict
    from lora_cls.errors import UserError

    for overrides in (["ckpt=x"], ["ckpt=x", "input=a", "split=test"]):
        with pytest.raises(UserError, match="give either input=.* or split=test"):
            validate_predict(compose_cfg(*overrides, config_name="predict"))
    with pytest.raises(UserError, match="split: must be train, val or test"):
        validate_predict(compose_cfg("ckpt=x", "split=all", config_name="predict"))
