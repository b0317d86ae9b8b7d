"""Model registry, presets, target selection errors, weights loading and the parameter report."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from lora_cls.adapters.inject import select_targets
from lora_cls.adapters.layer import LoRAConv2d
from lora_cls.errors import UserError
from lora_cls.models import weights
from lora_cls.models.build import build_model
from lora_cls.models.finetune import parameter_report, prepare_finetune, set_train_mode
from lora_cls.runs.console import print_parameter_report

RESNET_PRESET = ["layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2"]


@pytest.mark.parametrize("name, rank, trainable, total", [
    ("resnet34", 4, 232_962, 21_285_698 + 231_936),
    ("resnet34", 8, 464_898, 21_749_570),
    ("resnet34", 16, 928_770, 21_285_698 + 927_744),
    pytest.param("vgg16", 5, 84_994, None, marks=pytest.mark.slow),
    pytest.param("vgg16", 8, 131_074, None, marks=pytest.mark.slow),
])
def test_trainable_counts_match_presets(name, rank, trainable, total):
    model = build_model(name, None, 2)
    base_total = parameter_report(model)["total"]
    prepare_finetune(model, name, "lora", rank=rank, alpha=rank)
    report = parameter_report(model)
    assert report["trainable"] == trainable
    assert report["total"] == (total if total else base_total + trainable - 4096 * 2 - 2)


def test_resnet34_base_and_preset_percentage():
    model = build_model("resnet34", None, 2)
    assert parameter_report(model)["total"] == 21_285_698
    prepare_finetune(model, "resnet34", "lora", rank=8, alpha=8)
    report = parameter_report(model)
    assert report["trainable_pct"] == pytest.approx(2.1375, abs=1e-4)  # the seeds' "2.14%"
    assert report["blocks"]["layer3"]["trainable"] == 236_544
    assert report["blocks"]["layer4"]["trainable"] == 227_328
    assert report["blocks"]["fc"] == {"total": 1026, "trainable": 1026}
    assert report["blocks"]["layer1"]["trainable"] == 0


def test_parameter_report_prints_a_table(capsys):
    from rich.console import Console

    model = build_model("resnet34", None, 2)
    prepare_finetune(model, "resnet34", "lora", rank=8, alpha=8)
    console = Console(width=120, force_terminal=False)
    print_parameter_report(parameter_report(model), console=console)
    out = capsys.readouterr().out
    assert "464,898" in out and "21,749,570" in out and "2.14" in out and "layer3" in out


def test_preset_targets_select_18_and_3_layers():
    resnet = build_model("resnet34", None, 2)
    names = prepare_finetune(resnet, "resnet34", "lora")
    assert len(names) == 18 and names[0] == "layer3.0.conv1" and names[-1] == "layer4.2.conv2"
    assert all(isinstance(resnet.get_submodule(n), LoRAConv2d) for n in names)


def test_container_pattern_selects_every_supported_layer_inside():
    model = build_model("resnet34", None, 2)
    names = select_targets(model, ["layer4"])
    assert "layer4.0.downsample.0" in names and "layer4.2.conv2" in names
    assert len(names) == 7  # 3 blocks × 2 convs + the downsample conv
    assert select_targets(model, ["layer4.*"]) == names  # only the top-most matches are expanded


def test_target_matching_nothing_names_pattern_and_suggests():
    model = build_model("resnet34", None, 2)
    with pytest.raises(UserError) as err:
        select_targets(model, ["layer3.*.conv3"])
    msg = str(err.value)
    assert "'layer3.*.conv3' matches no module" in msg and "nearby valid names: layer3.5.conv" in msg


def test_target_selecting_unsupported_module_is_an_error():
    model = build_model("resnet34", None, 2)
    with pytest.raises(UserError, match=r"'layer3.0.bn1' selects layer3.0.bn1 \(BatchNorm2d\).*nearby valid names"):
        select_targets(model, ["layer3.0.bn1"])
    with pytest.raises(UserError, match="avgpool.*AdaptiveAvgPool2d"):
        select_targets(model, ["avgpool"])


def test_targeting_the_head_is_an_error():
    model = build_model("resnet34", None, 2)
    with pytest.raises(UserError, match="classification head"):
        prepare_finetune(model, "resnet34", "lora", targets=["fc"])


def test_empty_targets_and_unknown_names():
    model = build_model("resnet34", None, 2)
    with pytest.raises(UserError, match="lora.targets is empty"):
        select_targets(model, [])
    with pytest.raises(UserError, match="unknown torchvision model 'resnet35'; close matches: resnet"):
        build_model("resnet35", None, 2)
    with pytest.raises(UserError, match="finetune must be one of"):
        prepare_finetune(model, "resnet34", "partial")
    with pytest.raises(UserError, match="at least 2 classes"):
        build_model("resnet34", None, 1)


def test_offline_imagenet_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dest):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(weights, "_download_imagenet", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet34", "imagenet", 2)
    msg = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert str(expected) in msg and "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg


def test_cached_imagenet_weights_are_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = build_model("resnet34", None, 1000)
    path = weights.imagenet_cache_path("resnet34")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = build_model("resnet34", "imagenet", 2)
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 2


def test_weights_path_loads_and_mismatch_is_an_error(tmp_path):
    source = build_model("resnet34", None, 1000)
    good = tmp_path / "r34.pth"
    torch.save(source.state_dict(), good)
    model = build_model("resnet34", str(good), 2)
    assert torch.equal(model.conv1.weight, source.conv1.weight)

    with pytest.raises(UserError, match="does not exist"):
        build_model("resnet34", str(tmp_path / "missing.pth"), 2)
    vgg_state = tmp_path / "vgg.pth"
    torch.save(nn.Sequential(nn.Linear(3, 3)).state_dict(), vgg_state)
    with pytest.raises(UserError, match="does not fit resnet34: missing"):
        build_model("resnet34", str(vgg_state), 2)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        build_model("resnet34", str(junk), 2)


def test_state_dict_without_num_batches_tracked_loads_as_torchvision_does(tmp_path):
    source = build_model("resnet34", None, 1000)
    legacy = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "legacy.pth")
    model = build_model("resnet34", str(tmp_path / "legacy.pth"), 2)
    assert torch.equal(model.layer4[2].bn2.running_var, source.layer4[2].bn2.running_var)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    del legacy["layer1.0.bn1.running_mean"]  # a real missing buffer is still an error
    torch.save(legacy, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing 1 \(e.g. layer1.0.bn1.running_mean\)"):
        build_model("resnet34", str(tmp_path / "broken.pth"), 2)


def test_bn_policy_frozen_keeps_running_stats():
    model = build_model("resnet34", None, 2)
    prepare_finetune(model, "resnet34", "lora", rank=2, alpha=2)
    before = model.layer3[0].bn1.running_mean.clone()
    set_train_mode(model, True, "frozen")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer3[0].bn1.running_mean, before)
    assert model.layer3[0].conv1.training  # adapters still in training mode
    set_train_mode(model, True, "train")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(model.layer3[0].bn1.running_mean, before)
    with pytest.raises(UserError, match="lora.bn"):
        set_train_mode(model, True, "sometimes")
