"""lora-cls: LoRA fine-tuning of pretrained CNN image classifiers."""

__version__ = "0.1.0"
