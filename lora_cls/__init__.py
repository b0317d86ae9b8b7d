"""lora-cls: LoRA fine-tuning of pretrained CNN image classifiers.

The Python API (imported on first use, so `import lora_cls` stays fast):

- `load(path, device="cpu", base=None) -> Classifier`: a run folder, its adapter file, a lora-export folder or a PEFT
  LoRA folder (`base`: its base model where the folder does not name it) as a ready model;
- `Classifier`: `.predict(images)`, `.probabilities(images)`, `.preprocess(images)`, `.export(format, folder)`,
  `.classes`, `.image_size`, `.model`;
- `export_checkpoint(ckpt, format, folder, ...)`: lora-export from Python (returns export.json's content);
- `load_exported(folder) -> (model, model.json)`: a torchvision/lowrank export as a plain torch module;
- `compare_runs(paths, folder)`: lora-compare from Python (returns the table's rows);
- `UserError`: what every user mistake raises.
"""

__version__ = "0.1.0"

_API = {"load": "lora_cls.tasks.inference", "Classifier": "lora_cls.tasks.inference", "export_checkpoint": "lora_cls.tasks.export",
        "load_exported": "lora_cls.tasks.inference", "compare_runs": "lora_cls.tasks.compare",
        "UserError": "lora_cls.errors"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lora_cls' has no attribute {name!r}")
    import importlib  # here: `import lora_cls` loads no torch

    return getattr(importlib.import_module(_API[name]), name)
