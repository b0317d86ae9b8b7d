"""A run folder a reviewer can trust, end to end on the session's tiny run: intervals, calibration and the curves
in every split report; the fitted temperature applied through the one inference path (lora-eval, the API, an
export); Grad-CAM in lora-predict and lora-eval, its target layer per model family."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import assert_png
from scipy.special import softmax

import lora_cls
from lora_cls.errors import UserError


def test_every_split_report_has_intervals_calibration_curves_and_per_image_predictions(tiny_run):
    for split in ("val", "test"):
        metrics = tiny_run.metrics[split]
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity"):
            lo, hi = metrics["ci"][key]
            assert 0 <= lo <= hi <= 1 and (lo <= metrics[key] <= hi or key in ("balanced_accuracy", "macro_f1"))
        assert metrics["ci_method"]["accuracy"] == "wilson"
        calibration = metrics["calibration"]
        assert sum(b["count"] for b in calibration["bins"]) == metrics["n"]
        assert calibration["temperature"] == pytest.approx(tiny_run.metrics["temperature"], abs=1e-6)
        folder = tiny_run.run_dir / "reports" / split
        for name in ("roc_pr.png", "reliability.png", "confusion_matrix.png"):
            assert_png(folder / name)
        with open(folder / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == metrics["n"]
        correct = np.mean([r["true"] == r["predicted"] for r in rows])
        assert correct == pytest.approx(metrics["accuracy"])
        assert "95% intervals" in (folder / "classification_report.txt").read_text()
    # the temperature is the NLL minimum on val: the scaled NLL there is not above the model's own
    val = tiny_run.metrics["val"]["calibration"]
    assert val["nll_scaled"] <= val["nll"] + 1e-9


def test_calibrate_divides_the_logits_by_the_runs_temperature_and_keeps_the_prediction(tiny_run, synthetic_root):
    images = sorted((synthetic_root / "test" / "parasitized").glob("*.png"))[:4]
    plain, calibrated = lora_cls.load(tiny_run.run_dir), lora_cls.load(tiny_run.run_dir, calibrate=True)
    t = tiny_run.metrics["temperature"]
    assert calibrated.temperature == pytest.approx(t)
    logits = plain.logits(images).numpy()
    assert calibrated.probabilities(images).numpy() == pytest.approx(softmax(logits / t, axis=1), abs=1e-5)
    assert plain.predict(images) == calibrated.predict(images)


def test_lora_eval_with_calibrate_reports_the_scaled_nll_and_the_same_accuracy(tiny_run, compose_cfg,
                                                                               path_override, tmp_path):
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "calibrate=true", "progress=false", "explain=false",
                      config_name="eval")
    got = evaluate_checkpoint(cfg, tmp_path / "eval")
    trained = tiny_run.metrics["test"]
    assert got["calibrated"] is True and got["test"]["accuracy"] == trained["accuracy"]
    assert got["test"]["loss"] == pytest.approx(trained["calibration"]["nll_scaled"], abs=1e-4)
    assert got["test"]["ci"]["accuracy"] == trained["ci"]["accuracy"]


def test_a_run_without_a_temperature_refuses_calibrate(tiny_run):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match="calibrate=true needs the temperature"):
        lora_cls.Classifier(model, ["a", "b"], 32, calibrate=True)


@pytest.mark.slow
def test_an_export_carries_the_temperature_and_grad_cam_runs_on_it(tiny_run, synthetic_root, tmp_path):
    from lora_cls.tasks.export import export_checkpoint

    export_checkpoint(tiny_run.run_dir, "torchvision", tmp_path / "tv", images=2)
    assert json.loads((tmp_path / "tv" / "model.json").read_text())["temperature"] == pytest.approx(
        tiny_run.metrics["temperature"])
    images = sorted((synthetic_root / "test" / "uninfected").glob("*.png"))[:3]
    run, export = lora_cls.load(tiny_run.run_dir, calibrate=True), lora_cls.load(tmp_path / "tv", calibrate=True)
    assert export.probabilities(images).numpy() == pytest.approx(run.probabilities(images).numpy(), abs=1e-4)
    from_run, from_export = run.explain(images), export.explain(images)
    assert from_run.layer == from_export.layer == "layer1"
    assert np.abs(from_run.heatmaps - from_export.heatmaps).max() < 1e-3  # the merged model is the export's
    traced = torch.jit.trace(export.model, torch.zeros(1, 3, 32, 32))  # what a TorchScript export loads as
    with pytest.raises(UserError, match="ONNX or TorchScript export"):
        lora_cls.Classifier(traced, export.classes, export.preprocessing).explain(images)


def test_grad_cam_target_layer_per_family():
    from lora_cls.engine.explain import channels_last_to_first, target_layer, tokens_to_grid
    from lora_cls.models.build import build_model

    resnet = build_model("resnet34", None, 2, image_size=32)
    assert target_layer(resnet, 32, head="fc")[0] == "layer1"  # 8 × 8 at 32 px; layer4 would be 1 × 1
    assert target_layer(resnet, 64, head="fc")[0] == "layer2"
    assert target_layer(resnet, 224, head="fc")[0] == "layer4"  # 7 × 7: the last stage, as usual
    assert target_layer(resnet, 32, "layer1.2")[0] == "layer1.2"
    with pytest.raises(UserError, match="explain_layer=layer9: the model has no such module"):
        target_layer(resnet, 32, "layer9")
    vit = build_model("vit_b_16", None, 2, image_size=64)
    name, _, reshape = target_layer(vit, 64)
    assert name == "encoder.layers.encoder_layer_11.ln_1" and reshape is tokens_to_grid
    assert tokens_to_grid(torch.zeros(2, 197, 768)).shape == (2, 768, 14, 14)  # the class token dropped
    heatmaps = lora_cls.Classifier(vit, ["a", "b"], 64).explain(torch.rand(2, 3, 64, 64)).heatmaps
    assert heatmaps.shape == (2, 64, 64) and 0 <= heatmaps.min() and heatmaps.max() <= 1
    swin = build_model("swin_t", None, 2, image_size=224)
    name, _, reshape = target_layer(swin, 224)
    assert name == "features.7" and reshape is channels_last_to_first
    assert channels_last_to_first(torch.zeros(1, 7, 7, 768)).shape == (1, 768, 7, 7)


def test_explain_without_the_package_is_a_user_error_naming_the_extra(tiny_run, compose_cfg, path_override,
                                                                      tmp_path, monkeypatch):
    import sys

    from lora_cls.tasks.predict import predict

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if not installed
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "split=test", "explain=true", "progress=false",
                      config_name="predict")
    with pytest.raises(UserError, match=r"pip install 'lora-cls\[explain\]'"):
        predict(cfg, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_predict_explain_writes_a_heatmap_per_image_and_eval_overlays_its_mistakes(tiny_run, compose_cfg,
                                                                                    path_override, tmp_path):
    from lora_cls.tasks.evaluate import evaluate_checkpoint
    from lora_cls.tasks.predict import predict

    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "split=test", "explain=true", "progress=false",
                      "explain_layer=layer2", config_name="predict")
    rows = predict(cfg, tmp_path / "p")
    assert len(rows) == tiny_run.metrics["test"]["n"]
    for row in rows:
        assert_png(tmp_path / "p" / "explain" / row["heatmap"].rsplit("/", 1)[-1], min_side=224)
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["explain_layer"] == "layer2"
    cfg = compose_cfg(path_override("ckpt", tiny_run.run_dir), "split=val", "progress=false", config_name="eval")
    got = evaluate_checkpoint(cfg, tmp_path / "e")  # explain=null: on, the package being installed
    assert got["explain_layer"] == ("layer1" if got["misclassified"] else None)
    assert_png(tmp_path / "e" / "reports" / "val" / "errors.png")


@pytest.mark.slow
def test_grad_cam_points_at_the_inclusion_of_parasitized_cells(tmp_path_factory):
    """A trained model's Grad-CAM (auto layer: ResNet18's layer1, 8 × 8 at 32 px) peaks inside a dark inclusion
    the generator drew in a clear majority of the parasitized test cells (13 of 15 here; docs/evaluation.md)."""
    import importlib.util
    from pathlib import Path

    from conftest import path_value

    from lora_cls.conf.load import compose
    from lora_cls.tasks.train import train

    root = tmp_path_factory.mktemp("gradcam")
    cfg = compose("train", ["experiment=demo", "model.name=resnet18", "finetune=full", "trainer.epochs=3",
                            "dataset.synthetic.num_per_class=100", f"dataset.root={path_value(root / 'data')}",
                            "trainer.precision=32", "trainer.progress=false", "trainer.deterministic=true"])
    with pytest.MonkeyPatch.context() as mp:
        for module in ("lora_cls.runs.plots", "lora_cls.runs.diagnostics"):
            mp.setattr(f"{module}.save_figure", lambda fig, path: None)  # figures: test_reports checks them
        assert train(cfg, root / "run")["test"]["accuracy"] > 0.9
    script = Path(__file__).resolve().parent.parent / "scripts" / "gradcam_localisation.py"
    spec = importlib.util.spec_from_file_location("gradcam_localisation", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.localisation(root / "run", "test")
    assert result["layer"] == "layer1" and result["images"] == 15
    assert result["hits"] >= 10, f"peak inside an inclusion in only {result['hits']} of 15"
    # more than pointing at the middle of the cell, where the inclusions are drawn: a peak there hits less often
    centre = sum(any(np.hypot(16 - x, 16 - y) <= r for x, y, r in circles) for *_, circles, _ in result["items"])
    assert centre < result["hits"] - 3
