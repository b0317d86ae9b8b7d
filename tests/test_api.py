"""The Python API (`lora_cls.load`, `Classifier`): the user guide's example (docs/inference.md) runs, and every
input kind gives the model the same tensor as training does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "inference.md"


def guide_example() -> str:
    section = GUIDE.read_text(encoding="utf-8").split("## The Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has one python example"
    return blocks[0]


def test_import_lora_cls_stays_light():
    code = "import sys, lora_cls; assert 'torch' not in sys.modules; print(lora_cls.Classifier.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "Classifier", done.stderr


@pytest.mark.slow
def test_guide_example_runs(tiny_run, synthetic_root, tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "demo-d0").symlink_to(tiny_run.run_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(synthetic_root)
    done = subprocess.run([sys.executable, "-c", guide_example()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Classifier(ResNet, classes=['parasitized', 'uninfected'], image_size=32")
    assert lines[-2:] == ["True", "ResNet True"]
    assert (tmp_path / "outputs" / "export" / "demo-d0" / "model.pth").is_file()


@pytest.mark.slow
def test_every_input_kind_is_preprocessed_as_in_training(tiny_run, synthetic_root):
    import numpy as np

    import lora_cls
    from lora_cls.data.decode import decode_image
    from lora_cls.data.preprocess import EvalTransform

    clf = lora_cls.load(tiny_run.run_dir)
    path = sorted((synthetic_root / "test" / "parasitized").glob("*.png"))[0]
    # what training feeds the model: the stored square of the file (the run's geometry), centre-cropped, normalised
    reference = EvalTransform(clf.preprocessing)(decode_image(path, clf.preprocessing.geometry)[None])
    uint8 = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # the file's own pixels
    for given in (path, str(path), Image.open(path), uint8, uint8[None], uint8.float() / 255, [uint8]):
        assert torch.allclose(clf.preprocess(given), reference, atol=1e-5), type(given)
    big = torch.nn.functional.interpolate(uint8[None].float(), size=128, mode="nearest")[0].to(torch.uint8)
    assert clf.preprocess(big).shape == (1, 3, 32, 32)
    assert clf.probabilities([path, path]).shape == (2, 2)


@pytest.mark.slow
def test_unsupported_input_is_a_user_error(tiny_run):
    import lora_cls

    clf = lora_cls.load(tiny_run.run_dir)
    with pytest.raises(lora_cls.UserError, match="cannot classify a Tensor of shape \\(4, 4\\)"):
        clf.predict(torch.zeros(4, 4))
