"""The decay/noise/compensating-bias schedule of docs/DESIGN.md §3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_cls.adapters.inject import get_decay_state, inject_lora, set_decay
from lora_cls.adapters.layer import DecayState, LoRAConv2d, LoRALinear
from lora_cls.adapters.options import LoRAOptions
from lora_cls.adapters.schedule import DecaySchedule, decay_factor
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.models.finetune import prepare_finetune


def test_decay_factor_at_the_corners():
    total, start, end, d_min = 200, 0.1, 0.9, 0.2
    t0, t1 = 20, 180
    assert decay_factor(t0 - 1, total, start, end, d_min) == 1.0
    assert decay_factor(t0, total, start, end, d_min) == 1.0
    assert decay_factor((t0 + t1) // 2, total, start, end, d_min) == pytest.approx(0.6)
    assert decay_factor(t0 + 40, total, start, end, d_min) == pytest.approx(1.0 - 0.8 * 40 / 160)
    assert decay_factor(t1, total, start, end, d_min) == pytest.approx(0.2)
    assert decay_factor(total, total, start, end, d_min) == pytest.approx(0.2)


def test_decay_factor_defaults_and_rounding():
    # t0 = round(0.1·15) = 2 (banker's rounding of 1.5), t1 = round(0.9·15) = 14 (13.5 → 14)
    defaults = DecaySchedule("decay")  # start 0.1, end 0.9, d_min 0
    assert defaults.factor(1, 15) == 1.0 and defaults.factor(2, 15) == 1.0
    assert defaults.factor(8, 15) == pytest.approx(0.5)
    assert defaults.factor(14, 15) == 0.0
    assert [defaults.factor(t, 10) for t in range(11)] == pytest.approx(
        [1, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0, 0])


def test_schedule_kinds():
    assert DecaySchedule("none").factor(90, 100) == 1.0
    assert DecaySchedule("decay").factor(100, 100) == 0.0
    assert DecaySchedule("none").adapter_options()["bias_comp"] is False
    assert DecaySchedule("decay").adapter_options() == {"noise": False, "noise_per_channel": False,
                                                        "noise_cutoff": 0.3, "bias_comp": True}
    assert DecaySchedule("decay_noise").adapter_options()["noise"] is True
    with pytest.raises(UserError, match="schedule.kind"):
        DecaySchedule("cosine")
    with pytest.raises(UserError, match="start <= end"):
        DecaySchedule("decay", start=0.9, end=0.1)


def test_a_schedule_that_does_not_reach_d_min_by_the_last_step_is_named():
    # end=1.0 over 100 steps: t0 = 10, t1 = 100, so the last step (99) runs at d = 1/90, not 0.
    message = DecaySchedule("decay", end=1.0).unreached(100)
    assert message is not None and "reaches only 0.0111 at the last step (99 of 100)" in message
    assert "(reached at step 100); set schedule.end to 0.99 or less" in message
    assert DecaySchedule("decay", end=0.99).unreached(100) is None  # ...and that advice is right
    # The advice stays exact for long runs, and moves start too when end alone cannot go low enough.
    assert "set schedule.end to 0.9995 or less" in DecaySchedule("decay", end=1.0).unreached(2000)
    assert DecaySchedule("decay", end=0.9995).unreached(2000) is None
    assert "set schedule.start and schedule.end to 0.75 or less" in DecaySchedule(
        "decay", start=1.0, end=1.0).unreached(4)
    assert DecaySchedule("decay", start=0.75, end=0.75).unreached(4) is None
    assert "set schedule.start and schedule.end to 0 or less" in DecaySchedule("decay").unreached(1)
    # 4 steps at the defaults: t0 = 0, t1 = round(3.6) = 4: the last step runs at d = 1 - 3/4.
    assert "reaches only 0.25 " in DecaySchedule("decay_noise").unreached(4)
    assert DecaySchedule("decay").unreached(5) is None  # t1 = round(4.5) = 4: the last step is at d_min
    assert DecaySchedule("decay", end=1.0, d_min=0.5).unreached(100) is not None
    assert DecaySchedule("decay").unreached(100) is None
    assert DecaySchedule("none", end=1.0).unreached(100) is None  # plain LoRA has no d_min to reach


@pytest.mark.parametrize("d", [0.9, 0.5, 0.3])
@pytest.mark.parametrize("per_channel", [False, True])
def test_effective_weight_keeps_mean_and_std(d, per_channel):
    torch.manual_seed(0)
    base = nn.Conv2d(16, 32, 3).double()
    with torch.no_grad():
        base.weight.mul_(3.0).add_(torch.linspace(-0.5, 0.5, 32, dtype=torch.float64).view(-1, 1, 1, 1))
    layer = LoRAConv2d(base, LoRAOptions(noise=True, noise_per_channel=per_channel), DecayState(d)).train()
    w = layer.weight
    draws = torch.stack([d * w + layer.sample_noise() for _ in range(400)])
    if per_channel:
        eff = draws.transpose(0, 1).reshape(32, -1)
        ref = w.reshape(32, -1)
        torch.testing.assert_close(eff.mean(1), ref.mean(1), atol=0.01, rtol=0)
        torch.testing.assert_close(eff.std(1), ref.std(1), atol=0.0, rtol=0.02)
    else:
        assert draws.mean().item() == pytest.approx(w.mean().item(), abs=0.005)
        assert draws.std().item() == pytest.approx(w.std().item(), rel=0.01)
    # and the noise is not trivially zero: the effective weight differs from d·W
    assert (draws[0] - d * w).abs().mean() > 0.05 * w.std()


def test_noise_only_while_training_and_above_cutoff():
    torch.manual_seed(0)
    decay = DecayState(0.5)
    layer = LoRALinear(nn.Linear(20, 6).double(), LoRAOptions(noise=True, noise_cutoff=0.3), decay)
    x = torch.randn(4, 20, dtype=torch.float64)
    layer.train()
    with torch.no_grad():
        assert layer.noise_active() and not torch.equal(layer(x), layer(x))
        decay.set(0.29)
        assert not layer.noise_active() and torch.equal(layer(x), layer(x))
        decay.set(1.0)  # variance (1 − d²)σ² is zero at d = 1: nothing to add
        assert not layer.noise_active()
        decay.set(0.5)
        layer.eval()
        assert not layer.noise_active() and torch.equal(layer(x), layer(x))


def test_bias_comp_starts_at_zero_and_compensates_decayed_bias():
    layer = LoRALinear(nn.Linear(3, 2).double(), LoRAOptions(bias_comp=True), DecayState(1.0))
    assert torch.equal(layer.lora_C, torch.zeros(2, dtype=torch.float64))
    layer.decay.set(0.25)
    with torch.no_grad():
        layer.lora_C.copy_(0.75 * layer.bias)  # C = (1 − d)·b restores the full bias
        torch.testing.assert_close(layer.merged_bias(), layer.bias, atol=1e-15, rtol=0)


def test_one_shared_decay_saved_with_the_model():
    model = build_model("resnet34", None, 2)
    prepare_finetune(model, "resnet34", "lora", rank=2, alpha=2, **DecaySchedule("decay").adapter_options())
    set_decay(model, 0.37)
    layers = [m for m in model.modules() if isinstance(m, LoRAConv2d)]
    assert {id(m.decay) for m in layers} == {id(get_decay_state(model))}
    state = model.state_dict()
    assert [k for k in state if "decay" in k] == ["layer3.0.conv1.lora_decay.d"]
    assert state["layer3.0.conv1.lora_decay.d"].item() == pytest.approx(0.37)

    other = build_model("resnet34", None, 2)
    prepare_finetune(other, "resnet34", "lora", rank=2, alpha=2, bias_comp=True)
    other.load_state_dict(state)
    assert all(m.decay.value == pytest.approx(0.37) for m in other.modules() if isinstance(m, LoRAConv2d))


def test_inject_creates_one_decay_state_for_repeated_injection():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inject_lora(model, ["0"], rank=2, alpha=2)
    inject_lora(model, ["1"], rank=2, alpha=2)
    assert model[0].decay is model[1].decay is get_decay_state(model)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.lora_A", "0.lora_B", "0.lora_decay.d",
                                        "1.weight", "1.bias", "1.lora_A", "1.lora_B"]
