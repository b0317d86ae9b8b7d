"""A PEFT adapter folder on disk (docs/DESIGN.md §7): `adapter_config.json`, `adapter_model.safetensors` (or a
PEFT `adapter_model.bin`), and, when lora-cls wrote it, `lora_cls.json` (classes, preprocessing, the training
config and base-weight identity: what lora-cls needs beyond PEFT's files, ignored by PEFT)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lora_cls.errors import UserError
from lora_cls.files import atomic_open, write_json
from lora_cls.runs.checkpoint import check_tensors

CONFIG, WEIGHTS, WEIGHTS_BIN, META = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                                     "lora_cls.json")


def is_peft_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def write_peft_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG, config)
    with atomic_open(folder / WEIGHTS, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))  # PEFT's own metadata
    write_json(folder / META, meta)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def read_peft_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(adapter_config.json, the adapter's tensors, lora_cls.json or None) of a PEFT adapter folder."""
    folder = Path(folder)
    config = _json(folder / CONFIG)
    try:
        if (folder / WEIGHTS).is_file():
            tensors = load_file(str(folder / WEIGHTS))
        elif (folder / WEIGHTS_BIN).is_file():
            tensors = torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"PEFT folder {folder} holds {CONFIG} but no {WEIGHTS} (or {WEIGHTS_BIN})")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserError(f"the adapter weights in {folder} cannot be read ({str(exc).splitlines()[0]})") from None
    check_tensors(tensors, None, f"PEFT adapter {folder}")
    meta = _json(folder / META) if (folder / META).is_file() else None
    return config, tensors, meta
