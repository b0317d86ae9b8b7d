"""Each model's own preprocessing (docs/DESIGN.md §5): the resize-and-crop geometry is torchvision's, the statistics
are the weights' own, and training, lora-eval, the API and model.json all use the same ones; the epochs=auto rule
and the learning rate per fine-tune mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lora_cls.conf.checks import learning_rate, stopping_patience, training_length
from lora_cls.data.decode import Geometry, decode_image
from lora_cls.data.preprocess import EvalTransform, Preprocessing, centre_crop
from lora_cls.tasks.build import preprocessing


@pytest.mark.parametrize("width, height", [(45, 60), (60, 45), (46, 46), (37, 90), (101, 38), (36, 36)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_stored_square_holds_torchvisions_resize_and_centre_crop(tmp_path, width, height, interpolation):
    """Resize(R) then CenterCrop(S) of torchvision, on the PIL image, equals the centre S crop of the R × R square
    lora-cls stores (the square is placed so that the rounding of both crops agrees)."""
    rng = np.random.default_rng(width * height)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    mode = T.InterpolationMode(interpolation)
    expected = T.CenterCrop(32)(T.Resize(36, interpolation=mode)(Image.open(path).convert("RGB")))
    stored = decode_image(path, Geometry(36, 32, interpolation))
    assert stored.shape == (3, 36, 36)
    got = centre_crop(stored[None], 32)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.asarray(expected))


def test_preprocessing_sizes_and_the_legacy_rule():
    p = Preprocessing.of(224, crop_pct=0.875)
    assert (p.resize, p.geometry) == (256, Geometry(256, 224, "bilinear"))  # torchvision's 256 → 224
    assert Preprocessing.of(32).resize == 36  # floor(32 / 0.875), timm's rule
    assert Preprocessing.of(32, fit="squash").geometry == Geometry(32)  # the whole image, squashed
    legacy = Preprocessing.from_json(None, 64)  # an adapter written before model-specific preprocessing
    assert (legacy.fit, legacy.resize, legacy.mean) == ("squash", 64, (0.485, 0.456, 0.406))
    vit = Preprocessing.of(32, crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, source="t")
    assert Preprocessing.from_json(json.loads(json.dumps(vit.to_json())), 99) == vit


def test_eval_transform_normalises_with_the_models_statistics():
    p = Preprocessing.of(4, crop_pct=4 / 6, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.arange(6 * 6, dtype=torch.uint8).view(1, 1, 6, 6).expand(1, 3, 6, 6).contiguous()
    out = EvalTransform(p)(x)
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out, (x[..., 1:5, 1:5].float() / 255 - 0.5) / 0.25)


def test_the_run_takes_the_weights_own_preprocessing_or_imagenets(compose_cfg):
    eff = preprocessing(compose_cfg("model.name=efficientnet_b0", "model.weights=imagenet"))
    assert (eff.interpolation, eff.source) == ("bicubic", "torchvision:EfficientNet_B0_Weights.IMAGENET1K_V1")
    random = preprocessing(compose_cfg("model.name=efficientnet_b0", "model.weights=null"))
    assert (random.interpolation, random.source, random.resize) == ("bilinear", "imagenet", 73)  # 64 / 0.875
    vit = preprocessing(compose_cfg("model.source=timm", "model.name=vit_tiny_patch16_224", "model.weights=null",
                                    "model.preprocess=own"))
    assert (vit.mean, vit.std, vit.interpolation, vit.resize) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 71)  # 64 / 0.9
    forced = preprocessing(compose_cfg("model.source=timm", "model.name=vit_tiny_patch16_224",
                                       "model.weights=imagenet", "model.preprocess=imagenet", "dataset.crop_pct=1.0"))
    assert (forced.mean, forced.resize) == ((0.485, 0.456, 0.406), 64)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, tiny_overrides):
    """A timm ViT whose statistics are 0.5/0.5 (not ImageNet's), trained one step at 32 px."""
    from conftest import compose_config

    from lora_cls.tasks.train import train

    cfg = compose_config("train", [*tiny_overrides, "model.source=timm", "model.name=vit_tiny_patch16_224",
                                   "model.preprocess=own", "trainer.max_steps_per_epoch=1", "lora.targets=[blocks.11]"])
    run = tmp_path_factory.mktemp("vit") / "run"
    train(cfg, run)
    return run


@pytest.mark.slow  # a ViT run and an export
def test_a_timm_model_with_its_own_statistics_is_never_fed_imagenet_normalised_images(vit_run, synthetic_root,
                                                                                       tmp_path):
    import lora_cls
    from lora_cls.runs.checkpoint import load_adapter
    from lora_cls.tasks.inference import load_exported

    _, meta = load_adapter(vit_run / "checkpoints" / "adapter.safetensors")
    recorded = meta["preprocessing"]
    assert (recorded["mean"], recorded["std"], recorded["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    assert (recorded["image_size"], recorded["resize"], recorded["fit"]) == (32, 35, "crop")  # floor(32 / 0.9)
    clf = lora_cls.load(vit_run)  # what lora-eval, lora-predict and the API run on
    assert clf.preprocessing.mean == (0.5, 0.5, 0.5)
    report = clf.export("torchvision", tmp_path / "export")
    desc = json.loads((tmp_path / "export" / "model.json").read_text())
    assert desc["mean"] == [0.5] * 3 and desc["preprocessing"]["resize"] == 35 and report["verification"]["ok"]

    # Outside lora-cls: torchvision's own transforms with model.json's numbers, on the image file.
    path = sorted((synthetic_root / "test" / "parasitized").glob("*.png"))[0]
    p = desc["preprocessing"]
    outside = T.Compose([T.Resize(p["resize"], interpolation=T.InterpolationMode(p["interpolation"])),
                         T.CenterCrop(p["image_size"]), T.ToTensor(), T.Normalize(p["mean"], p["std"])])
    model, _ = load_exported(tmp_path / "export")
    with torch.inference_mode():
        theirs = model(outside(Image.open(path).convert("RGB"))[None])
    ours = clf.logits(path).cpu()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    wrong = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet statistics would differ
    with torch.inference_mode():
        assert not torch.allclose(model(wrong(T.ToTensor()(T.CenterCrop(32)(T.Resize(35)(
            Image.open(path).convert("RGB")))))[None]), ours, atol=1e-3)


def test_epochs_auto_gives_small_sets_enough_steps_and_large_ones_ten_plain_epochs(compose_cfg):
    cfg = compose_cfg()  # trainer.epochs=auto, trainer.min_steps=500
    # (batches in one pass over the training set) -> (epochs, steps per epoch)
    got = {n: training_length(cfg, n) for n in (1, 7, 49, 50, 51, 1000)}
    assert got == {1: (10, 50), 7: (10, 50), 49: (10, 50), 50: (10, 50), 51: (10, 51), 1000: (10, 1000)}
    assert training_length(compose_cfg("trainer.epochs=3"), 7) == (3, 7)  # set epochs: plain passes
    assert training_length(compose_cfg("trainer.min_steps=1001"), 7) == (10, 101)
    assert training_length(compose_cfg("trainer.max_steps_per_epoch=20"), 7) == (10, 20)
    assert [stopping_patience(cfg, epochs) for epochs in (10, 21, 72)] == [5, 6, 18]
    assert stopping_patience(compose_cfg("trainer.early_stopping.patience=3"), 72) == 3


@pytest.mark.slow  # a short training run
def test_an_auto_epoch_goes_through_a_small_training_set_again(tiny_overrides, tmp_path):
    from conftest import compose_config

    from lora_cls.tasks.train import train

    # 40 images per class: 56 training images, batch 16 → 3 steps a pass (the last partial batch dropped);
    # min_steps 100 → 10 epochs of 10 steps: each epoch takes the loader 4 times (3 + 3 + 3 + 1)
    cfg = compose_config("train", [*[o for o in tiny_overrides if not o.startswith("trainer.epochs")],
                                   "trainer.epochs=auto", "trainer.min_steps=100", "lora.bn=frozen"])
    metrics = train(cfg, tmp_path / "run")
    history = [int(r["step"]) for r in __import__("csv").DictReader(open(tmp_path / "run" / "history.csv"))]
    assert metrics["epochs_run"] == len(history) and history[:3] == [10, 20, 30]


def test_each_finetune_mode_has_its_own_learning_rate_unless_optimizer_lr_is_set(compose_cfg):
    got = {mode: learning_rate(compose_cfg(f"finetune={mode}")) for mode in ("lora", "full", "linear")}
    assert got == {"lora": 5e-3, "full": 3e-4, "linear": 1e-2}
    assert learning_rate(compose_cfg("finetune=full", "optimizer.lr=0.02")) == 0.02
    assert learning_rate(compose_cfg("experiment=smoking_resnet34")) == 1e-4  # the seeds' published settings
