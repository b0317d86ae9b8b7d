"""lora-export: every format read back from its file equals the trained model on the run's test images."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lora_cls.errors import UserError
from lora_cls.tasks.export import EXPORT_JSON, count_macs, export_checkpoint, model_stats
from lora_cls.tasks.inference import load_exported

TOLERANCE = 1e-4  # × the largest |logit|: float32 logits of ResNet34 at 32 px


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, tiny_overrides):
    """A tiny run whose decay schedule reaches d = 0 within its one epoch (for the low-rank export)."""
    from conftest import compose_config

    from lora_cls.tasks.train import train

    cfg = compose_config("train", [*tiny_overrides, "schedule=decay", "schedule.start=0.0", "schedule.end=0.5"])
    run_dir = tmp_path_factory.mktemp("zero_run") / "run"
    metrics = train(cfg, run_dir)
    assert metrics["d"] == 0.0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1", "efficientnet_b0"])
def test_other_families_round_trip(name, tiny_overrides, tmp_path):
    """A Linear MLP classifier and SE blocks (MobileNet), a 1x1 conv head (SqueezeNet), a deep net whose
    float32 logits differ by more than 1e-4 in absolute terms (EfficientNet, random init: |logit| ~ 40)."""
    from conftest import compose_config

    from lora_cls.tasks.train import train

    pytest.importorskip("onnxruntime")
    train(compose_config("train", [*tiny_overrides, f"model.name={name}", "model.weights=null"]), tmp_path / "run")
    for fmt in ("torchvision", "torchscript", "onnx"):
        report = export_checkpoint(tmp_path / "run", fmt, tmp_path / fmt)
        v = report["verification"]
        assert v["ok"] and v["max_abs_logit_diff"] <= 1e-4 * max(1.0, v["max_abs_logit"]), (fmt, v)
    model, desc = load_exported(tmp_path / "torchvision")
    assert desc["model"] == name and desc["added_biases"] == []


def test_macs_of_a_conv_and_a_linear_are_counted_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    assert count_macs(model, 8) == 4 * 8 * 8 * 3 * 9 + 4 * 8 * 8 * 5


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchvision", "torchscript", "onnx"])
def test_export_round_trips_within_tolerance(tiny_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    report = export_checkpoint(tiny_run.run_dir, fmt, tmp_path / "out", tolerance=TOLERANCE)
    verification = report["verification"]
    assert verification["ok"] and verification["max_abs_logit_diff"] <= TOLERANCE
    test = json.loads((tiny_run.run_dir / "splits.json").read_text())["test"]
    assert verification["source"].startswith(f"{min(16, len(test))} test images of")
    assert verification["images"] == min(16, len(test))
    assert json.loads((tmp_path / "out" / EXPORT_JSON).read_text())["verification"] == verification
    assert report["classes"] == ["parasitized", "uninfected"] and report["image_size"] == 32
    for n in (1, 5):  # a dynamic batch dimension (the file was traced with a batch of 2)
        assert _run_file(fmt, tmp_path / "out", torch.randn(n, 3, 32, 32)).shape == (n, 2)


def _run_file(fmt, folder, x):
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"images": x.numpy()})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated on newer torch
            return torch.jit.load(str(folder / "model.pt"))(x)
    return load_exported(folder)[0](x)


@pytest.mark.slow
def test_torchvision_export_loads_into_the_plain_constructor(tiny_run, tmp_path):
    from torchvision.models import resnet34

    export_checkpoint(tiny_run.run_dir, "torchvision", tmp_path, tolerance=TOLERANCE)
    plain = resnet34(weights=None)
    plain.fc = nn.Linear(512, 2)
    plain.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)
    rebuilt, desc = load_exported(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(plain.eval()(x), rebuilt(x))
    assert desc["mean"] == [0.485, 0.456, 0.406] and desc["low_rank_layers"] == []


@pytest.mark.slow
def test_lowrank_export_is_the_sum_of_its_factors(zero_run, tmp_path):
    report = export_checkpoint(zero_run, "lowrank", tmp_path, tolerance=TOLERANCE)
    assert report["verification"]["max_abs_logit_diff"] <= TOLERANCE
    model, desc = load_exported(tmp_path)
    assert len(desc["low_rank_layers"]) == 18
    base = report["base"]
    removed = added = 0
    for name in desc["low_rank_layers"]:
        a, b = model.get_submodule(name)
        dense = a.in_channels * b.out_channels * a.kernel_size[0] * a.kernel_size[1]  # the frozen W it replaces
        removed += dense
        added += a.weight.numel() + b.weight.numel()
    assert report["exported"]["parameters"] == sum(p.numel() for p in model.parameters())
    # ResNet34's adapted convs have no bias; each gains C as B's bias
    assert report["exported"]["parameters"] == base["parameters"] - removed + added + sum(
        model.get_submodule(n)[1].out_channels for n in desc["low_rank_layers"])
    assert report["exported"]["macs"] < base["macs"] and report["ratios_vs_base"]["parameters"] < 1
    assert report["exported"]["macs"] == count_macs(model, 32)


@pytest.mark.slow
def test_torchvision_export_of_a_decay_run_carries_its_compensating_biases(zero_run, tmp_path):
    report = export_checkpoint(zero_run, "torchvision", tmp_path, tolerance=TOLERANCE)
    assert report["verification"]["ok"]
    model, desc = load_exported(tmp_path)
    assert len(desc["added_biases"]) == 18 and model.get_submodule(desc["added_biases"][0]).bias is not None


@pytest.mark.slow
def test_lowrank_onnx_round_trips(zero_run, tmp_path):
    pytest.importorskip("onnxruntime")
    report = export_checkpoint(zero_run, "onnx", tmp_path, low_rank=True, tolerance=TOLERANCE)
    assert report["low_rank"] and report["verification"]["ok"]


@pytest.mark.slow
def test_lowrank_at_d_above_zero_is_refused_naming_the_schedule(tiny_run, tmp_path):
    with pytest.raises(UserError, match=r"needs d = 0.*d = 1.*schedule=decay.*schedule.d_min=0.*schedule.end"):
        export_checkpoint(tiny_run.run_dir, "lowrank", tmp_path)


@pytest.mark.slow
def test_a_tolerance_exceeded_fails_loudly(tiny_run, tmp_path):
    with pytest.raises(UserError, match=r"differs from the trained model by .* more than tolerance=0"):
        export_checkpoint(tiny_run.run_dir, "torchscript", tmp_path, tolerance=0.0)
    assert json.loads((tmp_path / EXPORT_JSON).read_text())["verification"]["ok"] is False


def test_model_stats_counts_parameters_and_bytes():
    conv = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    stats = model_stats(conv, 4)
    assert stats["parameters"] == 3 * 2 + 2 + 2 * 2 + 2
    assert stats["macs"] == 2 * 16 * 3 + 2 * 2 and stats["file_bytes"] > 0


@pytest.mark.slow
def test_verification_falls_back_to_random_images_and_says_so(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir / "checkpoints", run / "checkpoints")  # no splits.json beside it
    report = export_checkpoint(run, "torchvision", tmp_path / "out", tolerance=TOLERANCE)
    assert report["verification"]["source"].startswith("16 random images (the run's test split is unavailable")


def test_onnx_without_its_packages_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it now raises ImportError
    with pytest.raises(UserError, match=r"format=onnx needs .*pip install 'lora-cls\[export\]'"):
        export_checkpoint(tmp_path / "no-run", "onnx", tmp_path / "out")


def test_export_config_values_are_checked(compose_cfg):
    from lora_cls.conf.checks import validate_export

    with pytest.raises(UserError, match="format: must be one of torchvision, lowrank, onnx, torchscript"):
        validate_export(compose_cfg("ckpt=x", "format=tflite", config_name="export"))
    with pytest.raises(UserError, match="lowrank: the torchvision format is the merged model"):
        validate_export(compose_cfg("ckpt=x", "lowrank=true", config_name="export"))


@pytest.mark.slow
def test_lora_export_command_writes_its_folder_and_refuses_with_an_error_line(tiny_run, run_cli, tmp_path):
    done = run_cli("lora-export", f"ckpt={tiny_run.run_dir}", "format=torchscript", "hydra.run.dir=out",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "max |logit difference|" in done.stdout and (tmp_path / "out" / "model.pt").is_file()
    assert json.loads((tmp_path / "out" / EXPORT_JSON).read_text())["verification"]["ok"]
    done = run_cli("lora-export", f"ckpt={tiny_run.run_dir}", "format=lowrank", "hydra.run.dir=bad", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: a low-rank export needs d = 0")
