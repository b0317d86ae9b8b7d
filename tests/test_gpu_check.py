"""scripts/gpu_check.py, the prepared GPU run: the data it generates is read by the real layouts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from conftest import make_cfg

from lora_cls.data.layouts import malaria_patient, prepare_splits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_sets_have_the_real_layouts(tmp_path):
    gpu_check = _script()
    smoking, malaria = gpu_check.generate(tmp_path, small=True)
    s = prepare_splits(make_cfg("smoking", smoking))
    # the published split's proportions (716/180/224), at 1/20 of the size; both classes in every split
    assert (len(s.train), len(s.val), len(s.test)) == (2 * (358 // 20), 2 * (90 // 20), 2 * (112 // 20))
    assert s.classes == ["notsmoking", "smoking"] and {label for _, label in s.test} == {0, 1}
    m = prepare_splits(make_cfg("malaria", malaria, val_fraction=0.15, test_fraction=0.15))
    everything = m.train + m.val + m.test
    assert len(everything) == 2 * (gpu_check.MALARIA_PER_CLASS // 200)
    train_patients = {malaria_patient(p) for p, _ in m.train}
    assert train_patients.isdisjoint({malaria_patient(p) for p, _ in m.test})  # grouped by patient
    assert (tmp_path / ".generated").is_file()
    gpu_check.generate(tmp_path, small=True)  # made once: a second call writes nothing new
    assert len(list((malaria / "cell_images" / "Parasitized").iterdir())) == gpu_check.MALARIA_PER_CLASS // 200
