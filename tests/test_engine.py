"""Engine pieces with exact expectations: LR schedule, monitor direction, BN recalibration under a decay schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_cls.device import Precision
from lora_cls.engine import is_better, recalibrate_batchnorm, warmup_cosine
from lora_cls.inject import inject_lora, set_decay


def test_warmup_then_cosine_to_min_ratio():
    f = warmup_cosine(total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.01)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.01)
    assert warmup_cosine(10, 0.0, 0.0)(0) == pytest.approx(1.0)


def test_monitor_direction():
    assert is_better(0.9, 0.8, "val_accuracy") and not is_better(0.7, 0.8, "val_accuracy")
    assert is_better(0.2, 0.3, "val_loss") and not is_better(0.4, 0.3, "val_loss")
    assert is_better(0.0, None, "val_loss")


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    inject_lora(model, ["0"], rank=2, alpha=2, noise=True, bias_comp=True)
    with torch.no_grad():
        model[0].lora_B.normal_()
    return model


def test_recalibrated_bn_statistics_are_the_data_statistics_at_current_d():
    model = _bn_model()
    batches = [(torch.randn(8, 3, 6, 6) * 40 + 100, torch.zeros(8)) for _ in range(4)]
    set_decay(model, 0.5)  # noise is active at d = 0.5 while training: it must not enter the statistics
    recalibrate_batchnorm(model, batches, nn.Identity(), torch.device("cpu"), Precision("32", None, False), False)
    bn = model[1]
    with torch.no_grad():
        model.eval()
        acts = torch.cat([model[0](x) for x, _ in batches])  # merged conv at d = 0.5, no noise
    torch.testing.assert_close(bn.running_mean, acts.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-5)
    n = acts.numel() / acts.shape[1]
    # BN keeps the unbiased variance of each batch; the cumulative average of equal-sized batches' values
    per_batch = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts.split(8)])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), atol=1e-3, rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training and n > 0
    # deterministic: no noise entered, so a second pass gives the same statistics
    first = bn.running_mean.clone()
    recalibrate_batchnorm(model, batches, nn.Identity(), torch.device("cpu"), Precision("32", None, False), False)
    assert torch.equal(bn.running_mean, first)


def test_recalibration_changes_stale_statistics():
    model = _bn_model()
    bn = model[1]
    batches = [(torch.randn(8, 3, 6, 6) + 5, torch.zeros(8))]
    recalibrate_batchnorm(model, batches, nn.Identity(), torch.device("cpu"), Precision("32", None, False), False)
    assert bn.running_mean.abs().max() > 0.1  # the freshly initialised stats (0) were replaced


def test_trainer_sees_the_module_inside_compile_and_its_step_trains_it():
    """`base_model` (what validation, BN recalibration and the best state use) is the model itself under
    torch.compile: an adapter file written from a compiled run has the model's own keys."""
    from lora_cls.device import Runtime
    from lora_cls.engine import Trainer, TrainerSettings
    from lora_cls.models import trainable_state

    model = nn.Sequential(*_bn_model(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 4) logits
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    settings = TrainerSettings(Runtime(torch.device("cpu"), Precision("32", None, False), False, progress=False),
                               epochs=1, steps_per_epoch=1)
    trainer = Trainer(compiled, optimizer, nn.Identity(), settings)
    assert trainer.base_model is model
    before = model[0].lora_B.detach().clone()
    loss, logits = trainer.step(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3]))
    assert trainer.state.global_step == 1 and logits.shape == (4, 4) and loss.ndim == 0
    assert not torch.equal(model[0].lora_B, before)
    assert all(not k.startswith("_orig_mod") for k in trainable_state(trainer.base_model, "train"))
