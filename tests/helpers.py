"""Small assertions shared by several test files (files the tests read back)."""

import csv
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from lora_cls.conf.load import compose

# A deterministic tiny run; with NOISY (weight noise on two layers only) every RNG stream is exercised without
# the CPU cost of drawing 19.8M Gaussians per step for the whole preset (docs/training.md, "Noise cost on CPU").
DETERMINISTIC_TINY = ["experiment=demo", "dataset.image_size=32", "dataset.synthetic.num_per_class=40",
                      "trainer.epochs=3", "trainer.batch_size=16", "trainer.progress=false",
                      "trainer.deterministic=true"]
NOISY = ["schedule=decay_noise", "lora.dropout=0.1", "lora.targets=[layer3.0.conv1,layer4.2.conv2]"]


def train_cfg(*overrides: str) -> DictConfig:
    """The training config composed with these overrides, as lora-train would."""
    return compose("train", overrides)


def without_timing(metrics: dict) -> dict:
    """metrics.json without its timings: what two runs of the same config must agree on exactly."""
    return {k: v for k, v in metrics.items() if k != "timing"}


def assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= min_side


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def killed_in_second_epoch(monkeypatch, train_once) -> None:
    """Run `train_once()` with a KeyboardInterrupt raised as its second epoch starts (after epoch 1's last.pt),
    then put the real epoch back, so the caller can resume."""
    import pytest

    from lora_cls.engine import trainer as engine

    original = engine.Trainer.train_epoch

    def interrupt_second_epoch(self):
        if self.state.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_once()
    monkeypatch.setattr(engine.Trainer, "train_epoch", original)
