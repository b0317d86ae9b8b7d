"""Batch augmentation: exact eval normalisation, seeded per-sample flips, rotation geometry, colour jitter."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from lora_cls.data.augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, normalize, rotate


def batch(n: int = 8, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_normalize_matches_the_imagenet_formula():
    x = batch()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-6)
    assert torch.equal(normalize(x.float()), out)


def test_eval_mode_is_exactly_normalization():
    x = batch()
    augment = BatchAugment(hflip=True, rotation=30, color_jitter=0.4).eval()
    assert torch.equal(augment(x), normalize(x))


def test_hflip_flips_exactly_the_drawn_samples():
    x = batch(n=16)
    augment = BatchAugment(hflip=True, rotation=0, color_jitter=0).train()
    out = augment(x, generator=torch.Generator().manual_seed(5))
    flipped = torch.rand(16, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < flipped.sum() < 16
    for i in range(16):
        expected = x[i : i + 1].flip(-1) if flipped[i] else x[i : i + 1]
        assert torch.equal(out[i : i + 1], normalize(expected)), i


def test_no_op_augmentation_is_identity_after_normalization():
    x = batch()
    out = BatchAugment(hflip=False, rotation=0, color_jitter=0).train()(x)
    assert torch.allclose(out, normalize(x), atol=1e-5)


def test_rotate_by_90_degrees_is_rot90_and_by_0_is_identity():
    x = batch(n=2).float()
    assert torch.allclose(rotate(x, torch.tensor([90.0, 90.0])), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-3)
    assert torch.allclose(rotate(x, torch.tensor([0.0, -90.0]))[1], torch.rot90(x[1], -1, dims=(-2, -1)),
                          atol=1e-3)
    assert torch.allclose(rotate(x, torch.zeros(2)), x, atol=1e-4)


def test_rotation_uses_the_drawn_angles():
    x = batch(n=6)
    augment = BatchAugment(hflip=False, rotation=25, color_jitter=0).train()
    out = augment(x, generator=torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)
    torch.rand(6, generator=draws)  # the flip draw comes first, whether or not flips are on
    angles = (2 * torch.rand(6, generator=draws) - 1) * 25
    assert angles.abs().max() <= 25 and angles.abs().min() > 0.1
    assert torch.allclose(out, normalize(rotate(x.float(), angles)), atol=1e-4)
    assert not torch.allclose(out, normalize(x), atol=0.1)


def test_color_jitter_changes_values_keeps_range_and_grey_stays_grey():
    grey = torch.randint(0, 256, (8, 1, 10, 10), dtype=torch.uint8).expand(8, 3, 10, 10).contiguous()
    x = torch.cat([batch(n=8, size=10), grey])
    augment = BatchAugment(hflip=False, rotation=0, color_jitter=0.5).train()
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    per_sample_change = (out - normalize(x)).abs().flatten(1).max(1).values
    assert (per_sample_change > 0.05).all()
    pixels = out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    grey_out = pixels[8:]
    assert torch.allclose(grey_out[:, 0], grey_out[:, 1], atol=1e-3)
    assert torch.allclose(grey_out[:, 1], grey_out[:, 2], atol=1e-3)


def test_color_jitter_matches_torchvision_with_the_drawn_factors():
    x = batch(n=6)
    out = BatchAugment(hflip=False, rotation=0, color_jitter=0.4).train()(
        x, generator=torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    u = [torch.rand(6, generator=draws) for _ in range(5)]
    factors = [0.6 + 0.8 * v for v in u[2:]]  # uniform in [1 - 0.4, 1 + 0.4]
    expected = []
    for i in range(6):
        image = x[i].float() / 255
        image = TF.adjust_brightness(image, factors[0][i].item())
        image = TF.adjust_contrast(image, factors[1][i].item())
        image = TF.adjust_saturation(image, factors[2][i].item())
        expected.append(image * 255)
    assert torch.allclose(out, normalize(torch.stack(expected)), atol=1e-4)


def test_same_generator_seed_gives_same_augmentation():
    x = batch()
    augment = BatchAugment(hflip=True, rotation=15, color_jitter=0.3).train()
    first = augment(x, generator=torch.Generator().manual_seed(9))
    second = BatchAugment(True, 15, 0.3, generator=torch.Generator().manual_seed(9)).train()(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, augment(x, generator=torch.Generator().manual_seed(10)))


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_input_keeps_its_format_and_values(training):
    x = batch()
    augment = BatchAugment(hflip=True, rotation=20, color_jitter=0.3).train(training)
    out_cl = augment(x.contiguous(memory_format=torch.channels_last), generator=torch.Generator().manual_seed(2))
    out = augment(x, generator=torch.Generator().manual_seed(2))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous()
    assert torch.allclose(out_cl, out, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_matches_cpu_with_a_cpu_generator():
    x = batch(n=16, size=32)
    augment = BatchAugment(hflip=True, rotation=20, color_jitter=0.3).train()
    cpu = augment(x, generator=torch.Generator().manual_seed(4))
    cuda = augment(x.cuda(), generator=torch.Generator().manual_seed(4))
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-3)


# -- the presets (TrainAugment) -----------------------------------------------------------------------------

def _prep(size: int = 24):
    from lora_cls.data.preprocess import Preprocessing

    return Preprocessing.of(size)  # stored squares of floor(24 / 0.875) = 27


def _batch(n: int = 6, side: int = 27) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset", ["natural", "microscopy"])
def test_each_image_of_a_batch_gets_its_own_random_parameters(preset):
    from lora_cls.data.augment import TrainAugment

    same = _batch(1).repeat(8, 1, 1, 1)
    out = TrainAugment(_prep(), preset, seed=0).train()(same)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    differs = (out[1:] - out[:1]).abs().flatten(1).amax(1) > 1e-3
    assert differs.sum() >= 6  # (two draws can coincide: a flip and no crop change, say)


@pytest.mark.parametrize("preset", ["light", "natural", "microscopy"])
def test_the_same_seed_gives_the_same_batch_and_leaves_the_global_random_state_alone(preset):
    from lora_cls.data.augment import TrainAugment

    x = _batch()
    before = torch.get_rng_state()
    a = TrainAugment(_prep(), preset, seed=5).train()(x)
    assert torch.equal(torch.get_rng_state(), before)  # its own stream: dropout, noise and shuffles are unaffected
    assert torch.equal(TrainAugment(_prep(), preset, seed=5).train()(x), a)
    assert not torch.equal(TrainAugment(_prep(), preset, seed=6).train()(x), a)  # another rank, another stream


def test_the_saved_random_state_continues_the_same_stream():
    from lora_cls.data.augment import TrainAugment

    aug = TrainAugment(_prep(), "natural", seed=1).train()
    x = _batch()
    aug(x)
    state = aug.rng_state()
    second = aug(x)
    resumed = TrainAugment(_prep(), "natural", seed=99).train()
    resumed.set_rng_state(state)
    assert torch.equal(resumed(x), second)


def test_light_is_the_flip_rotation_jitter_of_before_on_the_centre_crop_and_eval_is_the_centre_crop():
    from lora_cls.data.augment import TrainAugment
    from lora_cls.data.preprocess import EvalTransform, centre_crop

    x = _batch()
    aug = TrainAugment(_prep(), "light", hflip=True, rotation=15, color_jitter=0.3, seed=4).train()
    old = BatchAugment(True, 15, 0.3, generator=torch.Generator().manual_seed(4)).train()
    assert torch.equal(aug(x), old(centre_crop(x, 24)))
    assert torch.equal(aug.eval()(x), EvalTransform(_prep())(x))
    assert torch.equal(TrainAugment(_prep(), "none").train()(x), EvalTransform(_prep())(x))


def test_mixup_targets_are_a_convex_pair_of_labels_and_the_loss_is_the_mixed_loss():
    import torch.nn.functional as F

    from lora_cls.data.augment import TrainAugment

    aug = TrainAugment(_prep(), "none", mixup=1.0, num_classes=4, seed=2).train()
    x = torch.randn(6, 3, 24, 24)
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    mixed, target = aug.mix(x, y)
    onehot, partner = F.one_hot(y, 4).float(), F.one_hot(y.roll(1), 4).float()
    lam = float(target[0, y[0]] - partner[0, y[0]]) if y[0] != y.roll(1)[0] else None
    lam = float(target[1, 1]) if lam is None else lam
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(target, lam * onehot + (1 - lam) * partner)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    logits = torch.randn(6, 4)
    by_hand = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y.roll(1))
    torch.testing.assert_close(F.cross_entropy(logits, target), by_hand)
    assert aug.eval().mix(x, y)[1] is y  # evaluation never mixes


def test_cutmix_pastes_a_box_and_weighs_the_labels_by_its_area():
    from lora_cls.data.augment import TrainAugment

    aug = TrainAugment(_prep(), "none", cutmix=1.0, num_classes=3, seed=7).train()
    x = torch.zeros(4, 3, 24, 24)
    x[1:] = 1.0  # image 0 all zeros, the others all ones: the pasted box is visible in image 1 (partner 0)
    mixed, target = aug.mix(x, torch.tensor([0, 1, 2, 1]))
    pasted = float((mixed[1, 0] == 0).float().mean())  # the share of image 1 that now shows image 0
    torch.testing.assert_close(target[1], torch.tensor([pasted, 1 - pasted, 0.0]))
