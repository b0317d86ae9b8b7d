"""Any classifier by name (zoo.py, models.py): one table of model cases drives the checks of PEFT's
test_custom_models (adapter at init changes nothing, merged equals unmerged in float64, only adapters and heads
get gradients, a training step runs, save/load round-trips); then heads, sizes, weights and default targets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_cls.adapters.inject import adapted_units, lora_layers, merge_lora, set_merge_on_eval
from lora_cls.engine.loss import loss_and_logits
from lora_cls.errors import UserError
from lora_cls.models import registry as zoo
from lora_cls.models.build import build_model
from lora_cls.models.checks import check_adapters, check_model
from lora_cls.models.finetune import prepare_finetune, trainable_state
from lora_cls.models.registry import default_target_names, model_spec

# name -> image size (small, but one each model runs at)
CASES = {
    "resnet50": 32, "vgg11_bn": 32, "efficientnet_b0": 32, "mobilenet_v3_small": 32, "convnext_tiny": 32,
    "regnet_x_400mf": 32, "densenet121": 32, "vit_b_16": 32, "swin_t": 32, "squeezenet1_1": 64,
    "shufflenet_v2_x0_5": 32, "resnext50_32x4d": 32,
}
SLOW = {"vgg11_bn", "densenet121", "vit_b_16", "resnext50_32x4d", "convnext_tiny", "resnet50", "efficientnet_b0",
        "mobilenet_v3_small", "regnet_x_400mf"}
_BUILT: dict[str, nn.Module] = {}


def _params(names=CASES):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _base(name: str) -> nn.Module:
    """The model in float64 with random weights and BatchNorm statistics of real activations (random-init
    statistics leave many models with outputs that ignore the input), built once per session."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = build_model(name, None, 3, image_size=CASES[name]).double()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 3, CASES[name], CASES[name], dtype=torch.float64))
        _BUILT[name] = model.eval()
    return copy.deepcopy(_BUILT[name])


def _x(name: str, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, CASES[name], CASES[name], dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", _params())
def test_model_case(name):
    model = _base(name)
    x = _x(name)
    with torch.no_grad():
        base_out = model(x)
    names = prepare_finetune(model, name, "lora", rank=8, alpha=8, bias_comp=True)
    assert names == default_target_names(model_spec(name), 8)
    model.eval()
    with torch.no_grad():
        if zoo.is_transformer(model):  # nn.MultiheadAttention's eval kernel rounds differently from ours
            torch.testing.assert_close(model(x), base_out, atol=1e-12, rtol=0)
        else:
            assert torch.equal(model(x), base_out)  # adapter at init changes nothing
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.02)
            layer.lora_C.normal_(0, 0.02)
        merged = model(x)
        set_merge_on_eval(model, False)
        unmerged = model(x)
        set_merge_on_eval(model, True)
        exported = merge_lora(model)(x)
    assert (merged - base_out).abs().max() > 1e-6  # the adapters act
    scale = unmerged.abs().max().clamp(min=1.0)
    torch.testing.assert_close(merged, unmerged, atol=1e-10 * scale, rtol=0)
    torch.testing.assert_close(exported, unmerged, atol=1e-10 * scale, rtol=0)

    # only adapters and the head get gradients; one optimizer step changes the output
    model.train()
    loss, logits = loss_and_logits(model(_x(name, 4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    head = model_spec(name).head
    expected = {n for n, p in model.named_parameters() if "lora_" in n or n.startswith(head + ".")}
    assert got == expected and logits.shape == (4, 3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(after, merged)

    # save/load: the adapter tensors into a fresh copy reproduce the outputs exactly
    state = trainable_state(model, "train")
    fresh = _base(name)
    prepare_finetune(fresh, name, "lora", rank=8, alpha=8, bias_comp=True)
    fresh.load_state_dict(state, strict=False)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), after)


def test_heads_are_found_for_every_kind():
    assert model_spec("resnet50").head == "fc"
    assert model_spec("vgg11_bn").head == "classifier.6"
    assert model_spec("efficientnet_b0").head == "classifier.1"
    assert model_spec("vit_b_16").head == "heads.head"
    assert model_spec("squeezenet1_0").head == "classifier.1"  # a 1x1 Conv2d head
    assert model_spec("googlenet").aux == ("aux1.fc2", "aux2.fc2")
    assert model_spec("inception_v3").aux == ("AuxLogits.fc",)
    squeeze = build_model("squeezenet1_1", None, 5, image_size=64)
    assert isinstance(squeeze.classifier[1], nn.Conv2d) and squeeze.classifier[1].out_channels == 5
    assert squeeze(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("aux", [False, True])
def test_googlenet_trains_with_or_without_aux_heads(aux):
    torch.manual_seed(0)
    model = build_model("googlenet", None, 2, image_size=32, aux=aux)
    prepare_finetune(model, "googlenet", "lora", rank=4, aux=aux)
    model.train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, tuple) == aux
    loss, logits = loss_and_logits(outputs, torch.tensor([0, 1]))
    loss.backward()
    assert logits.shape == (2, 2)
    assert (model.aux1.fc2.weight.grad is not None) if aux else model.aux1 is None
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)  # plain logits in evaluation


def test_image_size_checks_name_sizes_that_work():
    check_model(_cfg("vit_b_16"), 32)
    check_model(_cfg("swin_t"), 32)
    with pytest.raises(UserError, match=r"dataset.image_size: inception_v3 does not run on 64x64.*75"):
        check_model(_cfg("inception_v3"), 64)
    with pytest.raises(UserError, match=r"dataset.image_size: maxvit_t does not run on 64x64.*224"):
        check_model(_cfg("maxvit_t"), 64)
    with pytest.raises(UserError, match=r"vit_b_16 does not run on 40x40.*32"):
        check_model(_cfg("vit_b_16"), 40)
    with pytest.raises(UserError, match="model.aux_heads: resnet50 has no auxiliary heads"):
        check_model(_cfg("resnet50", aux_heads=True), 64)
    with pytest.raises(UserError, match=r"unknown torchvision model 'resnet51'; close matches: resnet.*lora-models"):
        check_model(_cfg("resnet51"), 64)


def _cfg(name: str, source: str = "torchvision", aux_heads: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, source=source, aux_heads=aux_heads)


def test_big_models_are_checked_on_the_meta_device():
    """vit_h_14 and regnet_y_128gf (600M+ parameters) resolve targets without memory: the config check."""
    for name in ("vit_h_14", "regnet_y_128gf"):
        names = check_adapters(name, None, 8, None)
        assert names
    assert all("self_attention" in n or "mlp" in n for n in check_adapters("vit_h_14", None, 8, None))


def test_default_rule_skips_depthwise_and_keeps_presets():
    mobilenet = zoo.on_meta(lambda: model_spec("mobilenet_v3_small").builder())
    for name in default_target_names(model_spec("mobilenet_v3_small"), 8):
        m = mobilenet.get_submodule(name)
        assert not (isinstance(m, nn.Conv2d) and m.groups > 1 and m.weight.shape[1] == 1)
    assert default_target_names(model_spec("resnet34"), 8)[0] == "layer3.0.conv1"
    assert len(default_target_names(model_spec("vgg16"), 5)) == 3
    # RegNetX-400MF's last stages have groups 10 and 25: rank 8 skips them, rank 50 (divisible by both) adapts
    regnet8 = default_target_names(model_spec("regnet_x_400mf"), 8)
    regnet50 = default_target_names(model_spec("regnet_x_400mf"), 50)
    assert "trunk_output.block4.block4-0.f.b.0" not in regnet8 and "trunk_output.block4.block4-0.f.b.0" in regnet50


def test_explicit_depthwise_target_is_refused_and_points_at_pointwise():
    with pytest.raises(UserError) as err:
        check_adapters("mobilenet_v2", ["features.2.conv.1.0"], 8, None)
    msg = str(err.value)
    assert "depthwise convolution" in msg and "more parameters than the layer" in msg
    assert "features.2.conv.0.0" in msg and "features.2.conv.2" in msg


def test_grouped_rank_error_names_layer_and_working_rank():
    with pytest.raises(UserError, match=r"trunk_output.block4.block4-0.f.b.0 is a grouped convolution \(groups=25\).*"
                                        r"rank 25 works"):
        check_adapters("regnet_x_400mf", ["trunk_output.block4.block4-0.f.b.0"], 8, None)
    assert check_adapters("regnet_x_400mf", ["trunk_output.block4.block4-0.f.b.0"], 8,
                          {"trunk_output.block4*": 25}) == ["trunk_output.block4.block4-0.f.b.0"]


def test_rank_pattern_sets_per_layer_ranks():
    torch.manual_seed(0)
    model = build_model("resnet34", None, 2, image_size=32)
    prepare_finetune(model, "resnet34", "lora", rank=8, rank_pattern={"layer4.*": 16})
    assert model.layer3[0].conv1.rank == 8 and model.layer4[0].conv1.rank == 16
    assert model.layer4[2].conv2.lora_A.shape[0] == 16
    with pytest.raises(UserError, match="lora.rank_pattern: 'layer9.*' matches no adapted layer"):
        check_adapters("resnet34", None, 8, {"layer9.*": 4})


def test_mha_out_proj_alone_is_refused():
    with pytest.raises(UserError, match="target the attention module encoder.layers.encoder_layer_0.self_attention"):
        check_adapters("vit_b_16", ["encoder.layers.encoder_layer_0.self_attention.out_proj"], 8, None)


def test_vit_units_are_whole_attention_modules():
    torch.manual_seed(0)
    model = build_model("vit_b_32", None, 2, image_size=32)
    prepare_finetune(model, "vit_b_32", "lora", rank=4, targets=["encoder.layers.encoder_layer_0"])
    kinds = {n: type(u).__name__ for n, u in adapted_units(model)}
    assert kinds == {"encoder.layers.encoder_layer_0.self_attention": "LoRAMultiheadAttention",
                     "encoder.layers.encoder_layer_0.mlp.0": "LoRALinear",
                     "encoder.layers.encoder_layer_0.mlp.3": "LoRALinear"}


def test_timm_model_by_name_with_default_targets():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model("resnet10t", None, 2, source="timm", image_size=32)
    names = prepare_finetune(model, "resnet10t", "lora", rank=4, source="timm")
    assert names and all(n.startswith(("layer3", "layer4")) for n in names)
    assert model_spec("resnet10t", "timm").head == "fc" and model.fc.out_features == 2
    model.train()
    loss, _ = loss_and_logits(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()


def test_timm_missing_or_offline_is_a_user_error(monkeypatch):
    pytest.importorskip("timm")
    import timm.models

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(timm.models, "load_pretrained", offline)
    with pytest.raises(UserError, match=r"timm weights for resnet10t.*huggingface.co/timm/resnet10t.*model.weights="):
        build_model("resnet10t", "imagenet", 2, source="timm")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(UserError, match=r"pip install 'lora-cls\[timm\]'"):
        zoo.check_name("timm", "resnet10t")


def test_head_of_another_class_count_is_skipped_and_logged(tmp_path, caplog):
    source = build_model("resnet18", None, 7, image_size=32)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    with caplog.at_level("INFO", logger="lora_cls.models"):
        model = build_model("resnet18", str(tmp_path / "r18.pth"), 2, image_size=32)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert "head not loaded (fc.weight, fc.bias" in caplog.text


def test_vit_weights_for_224_load_into_a_32px_vit_with_interpolated_positions(tmp_path):
    torch.manual_seed(0)
    source = build_model("vit_b_32", None, 1000, image_size=224)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = build_model("vit_b_32", str(tmp_path / "vit.pth"), 2, image_size=64)
    assert model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(model.encoder.layers[0].mlp[0].weight, source.encoder.layers[0].mlp[0].weight)
