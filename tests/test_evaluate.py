"""lora-eval's refusals (its exact reproduction of a run is pinned end to end in test_cli.py)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from lora_cls.conf.load import register_configs
from lora_cls.errors import UserError
from lora_cls.tasks.evaluate import evaluate_checkpoint


def test_eval_on_data_with_other_classes_is_refused(noisy_reference, tmp_path):
    _, run, _ = noisy_reference
    for cls in ("cats", "dogs", "birds"):
        (tmp_path / "other" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(tmp_path / "other" / cls / f"{i}.png")
    register_configs()
    with initialize_config_module("lora_cls.conf", version_base="1.3"):
        cfg = compose("eval", [f"ckpt={run}", f"dataset.root={tmp_path / 'other'}", "progress=false"])
    with pytest.raises(UserError, match=r"classes \['birds', 'cats', 'dogs'\].*same classes"):
        evaluate_checkpoint(cfg, tmp_path / "eval")
