"""Checkpoint files (docs/DESIGN.md §7): adapter.safetensors (small, no pickle) and last.pt (plain containers).

Both are written through runfolder.atomic_open (temporary file, then rename), so a killed run never leaves half
a file. What goes into last.pt, and how a run continues from it, is `lora_cls.resume`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lora_cls.errors import UserError
from lora_cls.files import atomic_open
from lora_cls.runs.folder import ADAPTER, CHECKPOINTS

FORMAT = "lora-cls/1"


def base_fingerprint(model: nn.Module, exclude_prefix: str) -> str:
    """sha256 over the base model's parameters (all but the head), identifying the frozen weights exactly."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(exclude_prefix + ".") or not tensor.is_floating_point():
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """The adapter file that `ckpt=` names: a run folder's checkpoints/adapter.safetensors, or the file itself; a
    PEFT adapter folder (adapter_config.json) as it is."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path
    if path.is_dir():
        for candidate in (path / CHECKPOINTS / ADAPTER, path / ADAPTER):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path} holds no {CHECKPOINTS}/{ADAPTER} (nor a PEFT adapter_config.json); pass a "
                        "lora-train run folder, its adapter file or a PEFT LoRA folder")
    return path


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (in name order): what a file's tensors must
    still be when it is read back."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_tensors(tensors: dict[str, torch.Tensor], stored_sha256: str | None, source: str) -> None:
    """Refuse tensors that changed since they were written (checksum) or hold NaN/inf (damaged or diverged)."""
    if stored_sha256 is not None and tensors_sha256(tensors) != stored_sha256:
        raise UserError(f"{source} is damaged: its tensors do not match the checksum written with them; use "
                        "another copy of the file or train again")
    bad = [name for name, t in sorted(tensors.items()) if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{source} holds non-finite values (NaN/inf) in {', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; the file is damaged or comes "
                        "from a diverged run")


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["format"] = FORMAT
    meta["tensors_sha256"] = tensors_sha256(tensors)
    with atomic_open(path, "wb") as f:
        f.write(save(tensors, metadata=meta))


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of an adapter file; any unreadable or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=<run folder> or "
                        f"ckpt=<run folder>/{CHECKPOINTS}/{ADAPTER}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} is not a readable safetensors adapter (truncated or another format: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if raw_meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} was not written by lora-cls (format {raw_meta.get('format')!r})")
    # Files from before checksums were written have none: their tensors are still checked for NaN/inf.
    check_tensors(tensors, raw_meta.get("tensors_sha256"), f"checkpoint {path}")
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


def apply_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load adapter tensors into a model built from the same config; every tensor must fit."""
    own = model.state_dict()
    unexpected = [k for k in tensors if k not in own]
    mismatched = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(tensors))
    if unexpected or mismatched or missing:
        detail = ", ".join(filter(None, [
            f"unexpected {unexpected[:3]}" if unexpected else "", f"wrong shape {mismatched[:3]}" if mismatched else "",
            f"missing {missing[:3]}" if missing else ""]))
        raise UserError(f"{source} does not fit the model built from its own config ({detail}); "
                        "it is for another model or class set")
    # With the model's own state-dict metadata: modules that check their version on load (MNASNet) need it.
    state = OrderedDict(tensors)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=False)


# -- last.pt ---------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """All RNG states as plain containers and tensors (readable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The parts of last.pt that are model weights: checksummed and checked for NaN/inf.
_WEIGHT_KEYS = ("trainable", "best_state")


def save_last(path: str | Path, state: dict[str, Any]) -> None:
    state = {**state, "tensors_sha256": {k: tensors_sha256(state[k]) for k in _WEIGHT_KEYS if k in state}}
    buffer = io.BytesIO()  # serialised first, so a full disk is an OSError of the write, not torch's own error
    torch.save(state, buffer)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())


def load_last(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"resume state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that would run code, a truncated file: never executed, always refused
        raise UserError(f"resume state {path} cannot be loaded safely ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if isinstance(state, dict):
        sums = state.get("tensors_sha256") if isinstance(state.get("tensors_sha256"), dict) else {}
        for key in _WEIGHT_KEYS:
            if isinstance(state.get(key), dict):
                check_tensors(state[key], sums.get(key), f"resume state {path} ({key})")
    return state
