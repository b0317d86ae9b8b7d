"""Engine pieces with exact expectations: LR schedule, monitor direction, BN recalibration under a decay schedule."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from lora_cls.adapters.inject import inject_lora, set_decay
from lora_cls.engine.device import Precision
from lora_cls.engine.evaluation import recalibrate_batchnorm
from lora_cls.engine.optim import warmup_cosine
from lora_cls.engine.trainer import is_better


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
    from lora_cls.engine.device import Runtime
    from lora_cls.engine.trainer import Trainer, TrainerSettings
    from lora_cls.models.finetune import trainable_state

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


def test_the_progress_bar_gives_the_time_left_for_the_whole_run():
    from lora_cls.engine.device import Runtime
    from lora_cls.engine.trainer import Trainer, TrainerSettings

    model = nn.Linear(2, 2)
    settings = TrainerSettings(Runtime(torch.device("cpu"), Precision("32", None, False), False, progress=False),
                               epochs=10, steps_per_epoch=10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.Identity(), settings)
    trainer.state.global_step = 40
    assert trainer._run_eta(epoch_seconds=10.0, epoch_steps=10) == "1m00s"  # 60 steps left at 1 s a step
    assert trainer._run_eta(epoch_seconds=1000.0, epoch_steps=10) == "1h40m"  # 100 s a step


def _stalled_fit(kind: str, caplog, patience: int = 1, end: float = 0.9) -> tuple:
    """10 epochs of 2 steps with lr 0 (validation never improves), schedule `kind`."""
    from torch.utils.data import DataLoader, TensorDataset

    from lora_cls.adapters.schedule import DecaySchedule
    from lora_cls.engine.device import Runtime
    from lora_cls.engine.trainer import Trainer, TrainerSettings

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 2, 2), torch.tensor([0, 1] * 4))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    settings = TrainerSettings(Runtime(torch.device("cpu"), Precision("32", None, False), False, progress=False),
                               epochs=10, steps_per_epoch=2, schedule=DecaySchedule(kind, end=end), classes=("a", "b"),
                               eval_batch_size=8, bn="frozen", patience=patience)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.Identity(), settings,
                      DataLoader(data, batch_size=4), data)
    with caplog.at_level(logging.INFO, logger="lora_cls.engine"):
        state = trainer.fit()
    return state, caplog.text


def test_early_stopping_never_ends_a_decay_schedule_before_d_min(caplog):
    from lora_cls.adapters.schedule import DecaySchedule

    state, log = _stalled_fit("none", caplog)
    assert state.epoch == 2 and state.stopped_early  # plain LoRA: patience 1 ends it after the second epoch
    assert "early stopping at epoch 2 of 10" in log
    caplog.clear()
    state, log = _stalled_fit("decay", caplog, end=0.5)
    # d = d_min from step round(0.5 * 20) = 10 on (the 11th step, in epoch 6): the first epoch that trained at
    # d_min is the 6th, and the run stops after it, not one epoch earlier
    assert state.epoch == 6 and state.global_step == 12 and state.stopped_early
    schedule = DecaySchedule("decay", end=0.5)  # (this model has no adapters: d is read off the schedule)
    assert schedule.factor(state.global_step - 1, 20) == 0.0 and schedule.factor(state.global_step - 3, 20) > 0.0
    assert "has not reached d_min=0 yet: training goes on" in log and "early stopping at epoch 6 of 10" in log


def test_a_run_that_reaches_its_last_epoch_does_not_claim_early_stopping(caplog):
    state, log = _stalled_fit("none", caplog, patience=10)
    assert state.epoch == 10 and not state.stopped_early
    assert "early stopping" not in log


def test_evaluation_runs_a_merged_view_equal_to_the_adapted_model_and_sharing_its_batchnorm():
    """merged_view: plain layers in place of adapters (W' = d·W + s·BA), everything else the model's own."""
    import torchvision

    from lora_cls.adapters.inject import lora_layers, merged_view
    from lora_cls.adapters.layer import LoRALayer

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).double()
    inject_lora(model, ["layer1.0.conv1", "layer4.1.conv2", "fc"], rank=2, alpha=4)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    set_decay(model, 0.3)
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        view = merged_view(model)
        got = view(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert not any(isinstance(m, LoRALayer) for m in view.modules())
    assert len(lora_layers(model)) == 3  # the model itself is unchanged
    assert view.bn1 is model.bn1 and view.layer1[0].bn1 is model.layer1[0].bn1  # shared, not copied
    assert view.layer2 is model.layer2  # nothing adapted below: the same module
    assert view.layer1 is not model.layer1 and isinstance(view.fc, nn.Linear)
    # BN statistics recomputed through the view are the model's own
    before = model.bn1.running_mean.clone()
    recalibrate_batchnorm(model, [(x, None)], nn.Identity(), torch.device("cpu"), Precision("32", None, False), False)
    assert not torch.equal(model.bn1.running_mean, before)
    assert merged_view(nn.Linear(2, 2)).__class__ is nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["eager", "reduce-overhead"])
def test_cuda_epochs_prefetch_and_cuda_graphs_train_the_same_batches(mode):
    """On CUDA the train loader is prefetched in a thread, and trainer.compile_mode=reduce-overhead captures the
    step in CUDA graphs: an epoch sees every batch of the loader and the adapters train."""
    from torch.utils.data import DataLoader, TensorDataset

    from lora_cls.engine.device import Runtime
    from lora_cls.engine.trainer import Trainer, TrainerSettings
    from lora_cls.tasks.build import compiled

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(*_bn_model(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(device)
    run_model = compiled(model, mode, device) if mode != "eager" else model
    data = TensorDataset(torch.randn(24, 3, 8, 8), torch.arange(24) % 4)
    settings = TrainerSettings(Runtime(device, Precision("32", None, False), False, progress=False),
                               epochs=1, steps_per_epoch=6, bn="frozen")
    trainer = Trainer(run_model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                      nn.Identity(), settings, DataLoader(data, batch_size=4, pin_memory=True))
    before = model[0].lora_B.detach().clone()
    row = trainer.train_epoch()
    assert trainer.state.global_step == 6 and math.isfinite(row["train_loss"])
    assert not torch.equal(model[0].lora_B, before)
    assert trainer.timing.seconds["first_step"] > 0
