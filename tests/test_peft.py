"""PEFT's LoRA format both ways, on one table of models: a lora-cls adapter served by `PeftModel.from_pretrained`,
and a PEFT-trained adapter evaluated, predicted with and exported by lora-cls, logits equal either way."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lora_cls.adapters.inject import lora_layers, merge_lora, set_merge_on_eval
from lora_cls.conf.load import compose
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.models.registry import model_spec
from lora_cls.tasks.build import build_classifier, preprocessing
from lora_cls.tasks.peft import export_peft, load_peft_model

peft = pytest.importorskip("peft")

REGNET = [f"trunk_output.block3.block3-0.f.{x}.0" for x in "abc"]  # f.b: groups 10
# name -> (model overrides, lora.* overrides, layers a PEFT-trained adapter adapts (PEFT's A on a grouped conv is
# ungrouped: test_a_peft_grouped_conv_adapter_that_reads_every_channel_is_refused), at 32 px from random weights
MODELS = {
    "resnet34": (["model.name=resnet34"], [], None),
    "regnet_grouped": (["model.name=regnet_x_400mf"], [f"lora.targets=[{','.join(REGNET)}]", "lora.rank=10"],
                       REGNET[::2]),
    "mobilenet_v3": (["model.name=mobilenet_v3_small"], [], None),
    "vit": (["model.source=timm", "model.name=vit_tiny_patch16_224"],
            ["lora.targets=[blocks.0.attn.qkv,blocks.0.attn.proj,blocks.11.mlp.fc1]"], None),
}
VARIANTS = {"lora": [], "dora": ["lora.dora=true"], "pissa": ["lora.init=pissa"], "olora_rslora": ["lora.init=olora",
                                                                                                   "lora.rslora=true"]}
# lora-cls -> PEFT: each model with the variants that exercise it (DoRA on a grouped conv is refused: PEFT's norm)
# (ResNet34's preset with plain LoRA goes through the whole export: test_a_run_exported_to_peft_...)
TO_PEFT = [("regnet_grouped", "lora"), ("regnet_grouped", "olora_rslora"),
           ("regnet_grouped", "dora"), ("mobilenet_v3", "dora"), ("vit", "pissa")]
FROM_PEFT = [("resnet34", "lora"), ("regnet_grouped", "lora"), ("mobilenet_v3", "dora"), ("vit", "dora")]
FAST = {("mobilenet_v3", "dora"), ("regnet_grouped", "lora"), ("regnet_grouped", "dora")}
BASE = {"weights": None, "image_size": 32}
TOLERANCE = 1e-4  # × max(1, the largest |logit|): float32


def _cases(pairs):
    return [p if p in FAST else pytest.param(*p, marks=pytest.mark.slow) for p in pairs]


def _config(case: str, variant: list[str]):
    model, extra, _ = MODELS[case]
    return compose("train", [*model, "model.weights=null", "dataset.image_size=32", *extra, *variant])


def _base(cfg) -> nn.Module:
    """The base model as lora-cls builds it (seeded): what a PEFT user loads the adapter onto."""
    torch.manual_seed(int(cfg.trainer.seed))
    return build_model(cfg.model.name, None, 2, source=cfg.model.source, image_size=32)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=TOLERANCE * max(1.0, float(want.abs().max())), rtol=0)


def _trained_lora_cls(cfg):
    """A model with lora-cls adapters as a run leaves them: non-zero B, magnitudes off their start, BN stats moved."""
    model, _, identity = build_classifier(cfg, 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.02)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1 + 0.1 * torch.rand(layer.lora_magnitude.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1)
    meta = {"classes": ["a", "b"], "base_weights": identity, "preprocessing": preprocessing(cfg).to_json()}
    return model.eval(), meta


@pytest.mark.parametrize("case, variant", _cases(TO_PEFT))
def test_lora_cls_adapter_served_by_peft_gives_the_same_logits(case, variant, tmp_path):
    cfg = _config(case, VARIANTS[variant])
    model, meta = _trained_lora_cls(cfg)
    x = torch.randn(3, 3, 32, 32)
    if variant == "dora" and case == "regnet_grouped":  # PEFT forms a grouped conv's DoRA norm ungrouped
        with pytest.raises(UserError, match="PEFT forms DoRA's weight norm of a grouped convolution"):
            export_peft(model, cfg, meta, tmp_path)
        assert not (tmp_path / "adapter_config.json").exists()
        return
    export_peft(model, cfg, meta, tmp_path)
    with torch.no_grad():
        set_merge_on_eval(model, False)
        want = model(x)
        served = peft.PeftModel.from_pretrained(_base(cfg), str(tmp_path)).eval()
        _close(served(x), want)
        back, back_cfg, back_meta = load_peft_model(tmp_path)  # and read back into lora-cls
        _close(merge_lora(back)(x), want)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"{cfg.model.source}/{cfg.model.name}"
    assert back_meta["classes"] == ["a", "b"] and model_spec(cfg.model.name, cfg.model.source).head in config[
        "modules_to_save"]
    if "init" in str(VARIANTS[variant]):  # PEFT's base is W: the residual's factors ride along at rank 2r
        assert config["r"] == 2 * cfg.lora.rank and back_cfg.lora.init == "kaiming"


@pytest.mark.parametrize("case, variant", _cases(FROM_PEFT))
def test_peft_trained_adapter_evaluates_and_exports_through_lora_cls(case, variant, tmp_path):
    import lora_cls
    from lora_cls.tasks.export import export_checkpoint

    cfg = _config(case, [])
    spec = model_spec(cfg.model.name, cfg.model.source)
    targets = MODELS[case][2] or list(cfg.lora.targets or spec.targets)
    layers = [t for t in targets if "*" not in t] or None
    base_model = _base(cfg)
    # BatchNorm layers in modules_to_save, or PEFT drops the statistics its training moved (PEFT #1732)
    norms = [n for n, m in base_model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    config = peft.LoraConfig(r=int(cfg.lora.rank), lora_alpha=16, target_modules=layers or targets[0],
                             modules_to_save=[spec.head, *norms], use_dora=variant == "dora",
                             alpha_pattern={targets[0].split(".")[-1]: 4} if layers else {})
    if layers is None:  # the preset's globs, as PEFT's full-match regex
        config.target_modules = "|".join(t.replace(".", r"\.").replace("*", r"\d+") for t in targets)
    model = peft.get_peft_model(base_model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # a few steps with PEFT itself
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(tmp_path / "peft"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.eval()(x)
    base = {**BASE, "name": cfg.model.name, "source": cfg.model.source, "classes": ["no", "yes"]}
    clf = lora_cls.load(tmp_path / "peft", base=base)
    with torch.no_grad():
        _close(clf.model(x), want)
        if case == "resnet34":  # PEFT's own reload agrees too (its BatchNorm statistics came back)
            _close(peft.PeftModel.from_pretrained(_base(cfg), str(tmp_path / "peft")).eval()(x), want)
    assert clf.classes == ["no", "yes"] and clf.config.lora.dora == (variant == "dora")
    assert clf.config.lora.bn == ("train" if norms else "frozen")
    if case == "regnet_grouped":  # and exports like a run of lora-cls's own
        report = export_checkpoint(tmp_path / "peft", "torchvision", tmp_path / "tv", base=base)
        assert report["verification"]["ok"]


def test_a_peft_grouped_conv_adapter_that_reads_every_channel_is_refused(tmp_path):
    cfg = _config("regnet_grouped", [])
    model = peft.get_peft_model(_base(cfg), peft.LoraConfig(r=10, target_modules=[REGNET[1]],
                                                            modules_to_save=["fc"]))
    with torch.no_grad():  # what PEFT's training does to its ungrouped A
        next(p for n, p in model.named_parameters() if "lora_A" in n).normal_()
    model.save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="grouped convolution.*reads every input channel"):
        load_peft_model(tmp_path, {**BASE, "name": "regnet_x_400mf"})


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOHA"}, "PEFT LOHA adapter.*LoRA adapters .peft_type LORA. only"),
    ({"lora_bias": True}, "option lora_bias=True is something lora-cls does not have"),
    ({"init_lora_weights": "pissa_niter_4"}, "base is PEFT's residual model"),
    ({"base_model_name_or_path": "some-org/some-llm"}, "names no base model lora-cls knows.*base.name="),
])
def test_what_lora_cls_cannot_read_is_an_error_naming_it(change, message, tmp_path):
    cfg = _config("mobilenet_v3", [])
    model, meta = _trained_lora_cls(cfg)
    export_peft(model, cfg, meta, tmp_path)
    (tmp_path / "lora_cls.json").unlink()  # a folder PEFT wrote: no lora-cls metadata
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        load_peft_model(tmp_path, {"weights": None})


def test_a_decay_schedule_has_no_peft_form(tmp_path):
    cfg = _config("mobilenet_v3", ["schedule=decay"])
    model, meta = _trained_lora_cls(cfg)
    with pytest.raises(UserError, match="decay schedule.*neither d·W nor C has a PEFT form.*format=torchvision"):
        export_peft(model, cfg, meta, tmp_path)


@pytest.fixture(scope="module")
def run_as_peft(tiny_run, tmp_path_factory):
    """The session's tiny run exported with format=peft: (folder, export.json)."""
    from lora_cls.tasks.export import export_checkpoint

    folder = tmp_path_factory.mktemp("run_as_peft") / "peft"
    return folder, export_checkpoint(tiny_run.run_dir, "peft", folder)


@pytest.mark.slow
def test_a_run_exported_to_peft_is_verified_through_peft_and_evaluates_as_the_run(tiny_run, run_as_peft, tmp_path):
    from lora_cls.tasks.evaluate import evaluate_checkpoint

    folder, report = run_as_peft
    assert report["verification"]["ok"] and report["peft"]["checked"] and report["peft"]["ok"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "export.json", "lora_cls.json"]
    cfg = compose("eval", [f"ckpt={folder}", f"dataset.root={tiny_run.cfg.dataset.root}", "progress=false"])
    metrics = evaluate_checkpoint(cfg, tmp_path / "eval")
    assert metrics["test"]["accuracy"] == tiny_run.metrics["test"]["accuracy"]
    assert OmegaConf.to_container(cfg.base)["weights"] == "imagenet"  # not read: lora_cls.json names the base


@pytest.mark.slow
def test_training_starts_from_a_peft_folder(tiny_run, run_as_peft, tiny_overrides, tmp_path):
    from lora_cls.tasks.train import train

    cfg = compose("train", [*tiny_overrides, "lora.rank=4", f"lora.init_from={run_as_peft[0]}",
                            "trainer.max_steps_per_epoch=1"])
    from lora_cls.runs.checkpoint import load_adapter

    metrics = train(cfg, tmp_path / "run")
    stored = load_adapter(tmp_path / "run" / "checkpoints" / "adapter.safetensors")[1]["config"]["lora"]
    # the folder's adapters (rank 8 on the preset) replace lora.rank=4
    assert metrics["params"]["trainable"] == tiny_run.metrics["params"]["trainable"] and stored["rank"] == 8
    with pytest.raises(UserError, match="not a PEFT adapter folder"):
        train(compose("train", [*tiny_overrides, f"lora.init_from={tmp_path}"]), tmp_path / "run2")


def _tiny_vit() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(32, 16, 2, 2, 16, 32, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit.eval()


@pytest.mark.parametrize("direction", ["to_peft", "from_peft"])
def test_multihead_attention_adapters_map_both_ways(direction, tmp_path):
    """nn.MultiheadAttention (torchvision's ViT): the packed in-projection's and the out-projection's factors
    under PEFT's names; a folder from PEFT < 0.22 (which applied the out-projection twice) is read as PEFT reads it."""
    from lora_cls.adapters.inject import inject_lora
    from lora_cls.adapters.peft import from_peft, to_peft
    from lora_cls.runs.checkpoint import apply_adapter
    from lora_cls.runs.peft import read_peft_folder, write_peft_folder

    target = "encoder.layers.encoder_layer_1.self_attention"
    x = torch.randn(2, 3, 32, 32)
    ours = _tiny_vit()
    inject_lora(ours, [target], rank=2, alpha=4, exclude=["heads.head"])
    if direction == "to_peft":
        with torch.no_grad():
            for _, layer in lora_layers(ours):
                layer.lora_B.normal_(0, 0.5)
        config, tensors = to_peft(ours.eval(), ["heads.head"], "torchvision/vit")
        write_peft_folder(tmp_path, config, tensors, {})
        served = peft.PeftModel.from_pretrained(_tiny_vit(), str(tmp_path)).eval()
        with torch.no_grad():
            _close(served(x), ours(x))
        return
    trained = peft.get_peft_model(_tiny_vit(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[target],
                                                               modules_to_save=["heads.head"]))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    trained.save_pretrained(str(tmp_path))
    config, tensors, _ = read_peft_folder(tmp_path)
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("heads."))
    apply_adapter(ours, from_peft(ours, tensors, config, "test"))
    with torch.no_grad():
        _close(ours.eval()(x), trained.eval()(x))
        old = from_peft(ours, tensors, {**config, "peft_version": "0.17.1"}, "test")
        key = f"{target}.out_proj.lora_B"
        torch.testing.assert_close(old[key], 2 * from_peft(ours, tensors, config, "test")[key])



def test_a_foreign_peft_folder_loads_inside_a_running_hydra_job(tmp_path):
    """lora-eval/predict/export run as Hydra jobs: reading a folder without lora_cls.json composes no config."""
    from hydra import initialize_config_module

    cfg = _config("mobilenet_v3", [])
    model, meta = _trained_lora_cls(cfg)
    export_peft(model, cfg, meta, tmp_path)
    (tmp_path / "lora_cls.json").unlink()
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        back, back_cfg, back_meta = load_peft_model(tmp_path, {"weights": None, "image_size": 32})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(merge_lora(back)(x), model(x))
    assert back_meta["classes"] == ["0", "1"] and back_cfg.model.name == "mobilenet_v3_small"
