"""Precision choice: what `auto` picks on each kind of CPU, and the refusals and warnings of forced settings."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_cls.engine import device
from lora_cls.engine.device import Precision, resolve_precision
from lora_cls.errors import UserError


def test_precision_choice_and_refusals(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("32", cpu) == Precision("32", None, False)
    for native, auto in ((True, "bf16"), (False, "32")):
        monkeypatch.setattr(device, "cpu_supports_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu).name == auto
        assert resolve_precision("bf16", cpu) == Precision("bf16", torch.bfloat16, False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_precision("16", cpu)


@pytest.mark.parametrize("native", [True, False])
def test_forced_bf16_warns_only_on_a_cpu_without_native_bf16(monkeypatch, caplog, native):
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="lora_cls.engine.device"):
        resolve_precision("bf16", torch.device("cpu"))
        resolve_precision("32", torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "without native bf16" in warnings[0]


@pytest.mark.parametrize("native, reason", [(True, "auto: the CPU has native bf16"), (False, "auto: the CPU has no "
                                                                                                   "native bf16")])
def test_the_start_of_a_run_says_which_precision_and_why(monkeypatch, native, reason):
    from lora_cls.engine.device import Runtime

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: native)
    precision = resolve_precision("auto", torch.device("cpu"))
    line = Runtime(torch.device("cpu"), precision, channels_last=True).describe()
    assert line.startswith(f"device cpu, precision {precision.name} ({reason}")
    assert "channels_last on" in line and f"{torch.get_num_threads()} CPU threads" in line
    assert resolve_precision("32", torch.device("cpu")).reason == "as set"
