"""Training-recipe options (trainer.label_smoothing, trainer.class_weights, trainer.ema, optimizer.head_lr_scale):
each changes exactly what it should, checked against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_cls.engine.device import Precision, Runtime
from lora_cls.engine.ema import WeightEMA
from lora_cls.engine.loss import loss_and_logits
from lora_cls.engine.optim import build_optimizer, param_groups
from lora_cls.engine.trainer import Trainer, TrainerSettings
from lora_cls.errors import UserError
from lora_cls.models.finetune import trainable_state
from lora_cls.tasks.build import class_weights

CPU32 = Runtime(torch.device("cpu"), Precision("32", None, False), False, progress=False)


def test_balanced_class_weights_are_inverse_frequencies():
    splits = SimpleNamespace(classes=["big", "small", "none"],
                             class_counts=lambda: {"train": {"big": 30, "small": 6, "none": 0}})
    cfg = OmegaConf.create({"trainer": {"class_weights": "balanced"}})
    w = class_weights(cfg, splits)
    assert w == pytest.approx((36 / (3 * 30), 36 / (3 * 6), 1.0))  # N / (K · n_c); an absent class gets 1
    assert class_weights(OmegaConf.create({"trainer": {"class_weights": None}}), splits) is None


def test_weighted_and_smoothed_losses_match_their_definitions():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 0, 0, 0, 1, 2])
    w = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    loss, _ = loss_and_logits(logits, y, class_weight=w.float())
    nll = -logits.log_softmax(1)[torch.arange(6), y]
    assert loss.item() == pytest.approx(float((w[y] * nll).sum() / w[y].sum()), rel=1e-6)
    eps = 0.2
    smoothed, _ = loss_and_logits(logits, y, label_smoothing=eps)
    logp = logits.log_softmax(1)
    expected = ((1 - eps) * nll - eps / 3 * logp.sum(1)).mean()
    assert smoothed.item() == pytest.approx(float(expected), rel=1e-6)
    plain, _ = loss_and_logits(logits, y)
    assert plain.item() == pytest.approx(float(nll.mean()), rel=1e-6) and plain.item() != smoothed.item()


def test_head_lr_scale_gives_the_head_its_own_learning_rate_through_the_schedule():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # "1" is the head
    model[0].bias.requires_grad_(False)
    groups = param_groups(model, ["1"], lr=0.01, head_lr_scale=10.0)
    opt = build_optimizer(groups, "adamw", 0.01, 0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]  # the frozen bias left out
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])
    del sched
    one = param_groups(model, ["1"], lr=0.01, head_lr_scale=1.0)  # as before the option: one group, in order
    assert len(one) == 1 and one[0]["params"] == list(model.parameters())
    only_head = param_groups(nn.Sequential(nn.Linear(4, 2)), ["0"], 0.01, 3.0)
    assert [g["lr"] for g in build_optimizer(only_head, "sgd", 0.01, 0.0).param_groups] == pytest.approx([0.03])


def test_ema_follows_its_warmed_up_rate_and_swaps_back():
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, 0.9)
    start = model.weight.detach().clone()
    assert ema.rate() == pytest.approx(1 / 10)  # β_0 = min(0.9, 1/10)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], start + 0.9)  # moved 1 − 0.1 of the way
    assert ema.rate() == pytest.approx(2 / 11)
    raw = model.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(model.weight, start + 0.9)
    torch.testing.assert_close(model.weight, raw)
    ema.updates = 10**6
    assert ema.rate() == pytest.approx(0.9)
    with pytest.raises(ValueError):
        WeightEMA(model, 1.0)


def _tiny_trainer(ema: float) -> Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 2, 2), torch.tensor([0, 1] * 8))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    settings = TrainerSettings(CPU32, epochs=2, steps_per_epoch=4, classes=("a", "b"), eval_batch_size=8,
                               bn="frozen", ema=ema)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), nn.Identity(), settings,
                   DataLoader(data, batch_size=4), data)


def test_ema_weights_are_what_is_validated_and_saved_and_training_continues_from_the_raw_ones():
    trainer = _tiny_trainer(ema=0.5)
    state = trainer.fit()
    raw = dict(trainer.base_model.named_parameters())
    shadow = dict(zip(trainer.ema.names, trainer.ema.shadow))
    assert not torch.allclose(raw["1.weight"], shadow["1.weight"])  # the average lags the raw weights
    # the best epoch is the last or the first; its saved state is the EMA at that epoch, never the raw weights
    if state.best_epoch == 2:
        torch.testing.assert_close(state.best_state["1.weight"], shadow["1.weight"])
    assert not torch.allclose(state.best_state["1.weight"], raw["1.weight"])
    # without EMA the saved state is the raw weights of the best epoch
    plain = _tiny_trainer(ema=0.0)
    plain_state = plain.fit()
    assert plain.ema is None
    if plain_state.best_epoch == 2:
        torch.testing.assert_close(plain_state.best_state["1.weight"], trainable_state(plain.base_model, "frozen")["1.weight"])


def test_ema_state_round_trips():
    a, b = _tiny_trainer(0.9), _tiny_trainer(0.9)
    a.fit()
    b.ema.load_state_dict(a.ema.state_dict())
    assert b.ema.updates == a.ema.updates == 8
    for x, y in zip(a.ema.shadow, b.ema.shadow):
        assert torch.equal(x, y)


@pytest.mark.parametrize("key,value", [("trainer.label_smoothing", 1.0), ("trainer.class_weights", "inverse"),
                                       ("trainer.ema", 1.0), ("optimizer.head_lr_scale", 0)])
def test_bad_recipe_values_are_refused_naming_the_key(compose_cfg, key, value):
    from lora_cls.conf.checks import validate

    cfg = compose_cfg(f"{key}={value}", "dataset.root=unused")
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_a_run_with_every_recipe_option_states_them_and_resumes_exactly(tmp_path, tiny_overrides, monkeypatch):
    """class weights land in metrics.json; EMA state is in last.pt, so an interrupted EMA run resumes to the
    same result as an uninterrupted one."""
    from lora_cls.runs.checkpoint import load_last
    from lora_cls.tasks.train import train
    from tests.conftest import compose_config
    from tests.helpers import killed_in_second_epoch, without_timing

    recipe = [*tiny_overrides, "trainer.class_weights=balanced", "trainer.label_smoothing=0.1", "trainer.ema=0.9",
              "optimizer.head_lr_scale=5", "trainer.epochs=2", "trainer.deterministic=true"]
    full = train(compose_config("train", recipe), tmp_path / "full")
    assert sorted(full["class_weights"]) == ["parasitized", "uninfected"]
    assert sum(full["class_weights"].values()) == pytest.approx(2.0, abs=0.2)  # near-balanced synthetic set
    last = load_last(tmp_path / "full" / "checkpoints" / "last.pt")
    assert last["ema"]["updates"] == last["global_step"] > 0

    killed_in_second_epoch(monkeypatch, lambda: train(compose_config("train", recipe), tmp_path / "killed"))
    resumed = train(compose_config("train", recipe), tmp_path / "killed")
    assert without_timing(resumed) == without_timing(full)


def test_lora_plus_gives_every_b_its_own_learning_rate_as_peft_does():
    from lora_cls.adapters.inject import inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))  # "2" is the head
    inject_lora(model, ["0"], rank=2)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("2.") or "lora_" in name)
    groups = param_groups(model, ["2"], lr=0.01, head_lr_scale=1.0, lora_b_lr_ratio=16.0)
    opt = build_optimizer(groups, "adamw", 0.01, 0.0)
    named = {id(p): n for n, p in model.named_parameters()}
    got = {named[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert got == pytest.approx({"0.lora_A": 0.01, "0.lora_B": 0.16, "2.weight": 0.01, "2.bias": 0.01})


def test_dora_magnitudes_train_at_the_base_rate_without_weight_decay():
    from lora_cls.adapters.inject import inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))  # "2" is the head
    inject_lora(model, ["0"], rank=2, dora=True)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("2.") or "lora_" in name)
    opt = build_optimizer(param_groups(model, ["2"], lr=0.01, lora_b_lr_ratio=4.0), "adamw", 0.01, 0.05)
    named = {id(p): n for n, p in model.named_parameters()}
    got = {named[id(p)]: (round(g["lr"], 6), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert got == {"0.lora_A": (0.01, 0.05), "0.lora_B": (0.04, 0.05), "0.lora_magnitude": (0.01, 0.0),
                   "2.weight": (0.01, 0.05), "2.bias": (0.01, 0.05)}
