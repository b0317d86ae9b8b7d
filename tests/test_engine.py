"""Engine pieces with exact expectations: LR schedule, precision choice, BN recalibration under a decay schedule."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from lora_cls import engine
from lora_cls.engine import Precision, is_better, recalibrate_batchnorm, resolve_precision, warmup_cosine
from lora_cls.errors import UserError
from lora_cls.lora import inject_lora, set_decay


def test_warmup_then_cosine_to_min_ratio():
    f = warmup_cosine(total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.01)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.01)
    assert warmup_cosine(10, 0.0, 0.0)(0) == pytest.approx(1.0)


def test_precision_choice_and_refusals(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("32", cpu) == Precision("32", None, False)
    for native, auto in ((True, "bf16"), (False, "32")):
        monkeypatch.setattr(engine, "cpu_supports_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu).name == auto
        assert resolve_precision("bf16", cpu) == Precision("bf16", torch.bfloat16, False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_precision("16", cpu)


@pytest.mark.parametrize("native", [True, False])
def test_forced_bf16_warns_only_on_a_cpu_without_native_bf16(monkeypatch, caplog, native):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="lora_cls.engine"):
        resolve_precision("bf16", torch.device("cpu"))
        resolve_precision("32", torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "without native bf16" in warnings[0]


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
