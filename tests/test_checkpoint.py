"""Adapter files: no pickle, bad files and foreign checkpoints refused, older schemas still read."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_cls.errors import UserError
from lora_cls.runs import checkpoint as ckpt
from lora_cls.tasks.build import load_model_from_checkpoint


def test_adapter_files_hold_no_pickle(noisy_reference):
    _, run, _ = noisy_reference
    raw = (run / "checkpoints" / "adapter.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[: 8 + header_len]  # a JSON header, no pickle opcode


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a checkpoint at all", "not a readable safetensors adapter"),
    ("truncate", "not a readable safetensors adapter"),
])
def test_bad_checkpoints_are_user_errors(noisy_reference, tmp_path, content, message):
    _, run, _ = noisy_reference
    path = tmp_path / "adapter.safetensors"
    if content == "truncate":
        good = (run / "checkpoints" / "adapter.safetensors").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model_from_checkpoint(path)


def test_checkpoint_for_another_class_set_or_model_is_refused(noisy_reference, tmp_path):
    _, run, _ = noisy_reference
    tensors, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    meta["classes"] = ["a", "b", "c"]
    ckpt.save_adapter(tmp_path / "three.safetensors", tensors, meta)
    with pytest.raises(UserError, match="another model or class set"):
        load_model_from_checkpoint(tmp_path / "three.safetensors")
    meta["classes"] = ["parasitized", "uninfected"]
    meta["config"]["model"]["name"] = "vgg16"
    meta["config"]["lora"]["targets"] = None
    ckpt.save_adapter(tmp_path / "vgg.safetensors", tensors, meta)
    with pytest.raises(UserError, match="trained on other base weights"):
        load_model_from_checkpoint(tmp_path / "vgg.safetensors")


def test_a_checkpoint_from_an_older_schema_still_loads_and_a_foreign_key_is_dropped(noisy_reference, tmp_path, caplog):
    _, run, _ = noisy_reference
    tensors, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    expected, _, _ = load_model_from_checkpoint(run / "checkpoints" / "adapter.safetensors")
    # A file written before trainer.compile and dataset.skip_bad existed: they take the schema's defaults.
    del meta["config"]["trainer"]["compile"], meta["config"]["dataset"]["skip_bad"]
    ckpt.save_adapter(tmp_path / "older.safetensors", tensors, meta)
    model, train_cfg, _ = load_model_from_checkpoint(tmp_path / "older.safetensors")
    assert train_cfg.trainer.compile is False and train_cfg.dataset.skip_bad is False
    assert train_cfg.lora.rank == 8 and train_cfg.schedule.kind == "decay_noise"  # the stored values are kept
    torch.testing.assert_close(model.state_dict(), expected.state_dict(), rtol=0, atol=0)
    # A key lora-cls never read (a `+key=` override from before those were refused) is dropped, with a warning.
    meta["config"]["lora"]["rnk"] = 4
    meta["config"]["lora"]["a.b"] = 1  # a key with a dot in it is one key, not a path
    ckpt.save_adapter(tmp_path / "plus.safetensors", tensors, meta)
    with caplog.at_level(logging.WARNING):
        _, plus_cfg, _ = load_model_from_checkpoint(tmp_path / "plus.safetensors")
    assert "ignoring config key(s) that lora-cls does not know: lora.rnk, lora.a.b" in caplog.text
    assert "rnk" not in plus_cfg.lora and plus_cfg.lora.rank == 8
    # Anything else that is not a training config is an error naming the file, never a traceback.
    for bad, message in [({**meta["config"], "lora": {**meta["config"]["lora"], "rank": "eight"}}, "key lora.rank"),
                         ({**meta["config"], "dataset": 5}, "cannot read"),
                         ({**meta["config"], "model": {"name": "${nope.x}"}}, "cannot read"),
                         ("hello", "no lora-cls training config"), ([1, 2], "no lora-cls training config")]:
        ckpt.save_adapter(tmp_path / "bad.safetensors", tensors, {**meta, "config": bad})
        with pytest.raises(UserError, match=message):
            load_model_from_checkpoint(tmp_path / "bad.safetensors")


def test_damaged_or_non_finite_checkpoints_are_refused_naming_the_file(noisy_reference, tmp_path):
    _, run, _ = noisy_reference
    good = (run / "checkpoints" / "adapter.safetensors").read_bytes()
    header = int.from_bytes(good[:8], "little")
    damaged = bytearray(good)
    for i in range(8 + header + 16, len(damaged), 97):  # flip tensor bytes, keep the header intact
        damaged[i] ^= 0xFF
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=rf"checkpoint {path} is damaged: its tensors do not match the checksum"):
        load_model_from_checkpoint(path)

    tensors, meta = ckpt.load_adapter(run / "checkpoints" / "adapter.safetensors")
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name][0] = float("nan")  # a diverged run's weights, written with a matching checksum
    ckpt.save_adapter(tmp_path / "nan.safetensors", tensors, meta)
    with pytest.raises(UserError, match=rf"holds non-finite values \(NaN/inf\) in {name}"):
        load_model_from_checkpoint(tmp_path / "nan.safetensors")

    state = ckpt.load_last(run / "checkpoints" / "last.pt")
    key = next(iter(state["trainable"]))
    state["trainable"][key] = state["trainable"][key].clone().fill_(float("inf"))
    ckpt.save_last(tmp_path / "last.pt", state)
    with pytest.raises(UserError, match=r"resume state .*last.pt \(trainable\) holds non-finite values"):
        ckpt.load_last(tmp_path / "last.pt")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["tensors_sha256"]) == {"trainable", "best_state"}  # both weight sets are checksummed
    state["best_state"][key] = state["best_state"][key] + 1e-3  # changed after it was written
    torch.save(state, tmp_path / "changed.pt")
    with pytest.raises(UserError, match=r"changed.pt \(best_state\) is damaged: its tensors do not match"):
        ckpt.load_last(tmp_path / "changed.pt")


def test_an_adapter_loads_into_a_model_that_checks_its_state_dict_version():
    """MNASNet refuses a state dict without its version metadata; adapter tensors are loaded with the model's."""
    from lora_cls.models.build import build_model
    from lora_cls.models.finetune import prepare_finetune, trainable_state

    torch.manual_seed(0)
    trained = build_model("mnasnet0_5", None, 2)
    prepare_finetune(trained, "mnasnet0_5", "lora")
    fresh = build_model("mnasnet0_5", None, 2)
    prepare_finetune(fresh, "mnasnet0_5", "lora")
    with torch.no_grad():
        trained.classifier[1].weight.add_(1.0)
    ckpt.apply_adapter(fresh, trainable_state(trained, "train"))
    assert torch.equal(fresh.classifier[1].weight, trained.classifier[1].weight)
