"""scripts/check_models.py: one model trained briefly and reproduced by lora-eval, as the script reports it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_models.py"


@pytest.mark.slow
def test_check_models_trains_a_model_and_lora_eval_reproduces_it(tmp_path):
    spec = importlib.util.spec_from_file_location("check_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    rows = module.main(["squeezenet1_1", "--size", "32", "--device", "cpu", "--root", str(tmp_path / "data"),
                        "--out", str(out)])
    assert [r["model"] for r in rows] == ["squeezenet1_1"]
    row = rows[0]
    assert row["status"] == "ok" and row["eval_reproduces"] is True and row["size"] == 32
    assert row["trainable"] == 47_362  # default targets at rank 8 (as `lora-models` lists them) + the new head
    summary = json.loads(out.read_text())
    assert summary["models"] == 1 and summary["trained_and_reproduced"] == 1
