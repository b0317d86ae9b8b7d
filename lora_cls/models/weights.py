"""Base weights: torchvision's ImageNet files (torch hub cache, offline error), timm's hub weights, or a state dict of the user's, fitted to the model (heads skipped, ViT position embeddings interpolated)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import urllib.error
from pathlib import Path

import torch
from torch import nn

from lora_cls.errors import UserError
from lora_cls.models.registry import ModelSpec, model_spec

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 30


def imagenet_cache_path(name: str) -> Path:
    """Where torchvision looks for (and caches) this model's ImageNet weights."""
    url = model_spec(name).weights_url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _download_imagenet(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    url = model_spec(name).weights_url
    path = imagenet_cache_path(name)
    if not path.exists():
        try:
            _download_imagenet(url, path)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise UserError(
                f"ImageNet weights for {name} are not cached and could not be downloaded ({exc}). "
                f"Download {url} on a machine with network access and place it at {path} "
                f"(or set TORCH_HOME), or pass model.weights=<path to a state dict>, or model.weights=null "
                "for random initialisation") from None
    return _read_state_dict(path)


def _timm_pretrained(spec: ModelSpec, model: nn.Module) -> None:
    """timm's pretrained weights from the Hugging Face hub cache (downloaded if the hub can be reached)."""
    import timm.models

    try:
        timm.models.load_pretrained(model, num_classes=model.pretrained_cfg.get("num_classes", 1000))
    except Exception as exc:  # offline, or no weights for this name: the user's to supply
        raise UserError(
            f"timm weights for {spec.name} are not cached and could not be downloaded ({type(exc).__name__}). "
            f"Download https://huggingface.co/{spec.weights_url}/resolve/main/model.safetensors on a machine with "
            f"network access into the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface), or pass "
            "model.weights=<path to that file>, or model.weights=null for random initialisation") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"model.weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's to fix, not a crash
        raise UserError(f"model.weights file {path} is not a readable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.weights file {path} does not hold a state dict of tensors")
    return state


def _fit_to_model(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position embeddings of a ViT built for another size, interpolated (torchvision / timm's own filter)."""
    if spec.source == "timm":
        fit = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        return fit(state, model) if fit is not None else state
    own = model.state_dict()
    key = "encoder.pos_embedding"
    if key in state and key in own and state[key].shape != own[key].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        log.info("model.weights: position embeddings interpolated from %s to %s", tuple(state[key].shape),
                 tuple(own[key].shape))
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    return state


def load_base_weights(model: nn.Module, name: str, weights: str | None, source: str = "torchvision") -> None:
    """Load `imagenet`, a state-dict path, or nothing (None/'null': random init) into the unmodified model.

    A state dict must fit the model except, possibly, its classification heads (which are replaced anyway; a
    head of another shape is skipped, and the log says so).
    """
    if weights is None or str(weights).lower() in ("null", "none", "random"):
        return
    spec = model_spec(name, source)
    if weights == "imagenet" and source == "timm":
        _timm_pretrained(spec, model)
        return
    state = _imagenet_state_dict(name) if weights == "imagenet" else _read_state_dict(Path(weights).expanduser())
    state = _fit_to_model(model, spec, {k.removeprefix("module."): v for k, v in state.items()})
    heads = tuple(h + "." for h in (spec.head, *spec.aux))
    own = model.state_dict()
    # State dicts saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked; torch's own loader accepts
    # them too (the counter only matters for momentum=None).
    missing = [k for k in own if k not in state and not k.startswith(heads) and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape and not k.startswith(heads)]
    if missing or unexpected or mismatched:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
            f"wrong shape {len(mismatched)} (e.g. {', '.join(mismatched[:3])})" if mismatched else ""]))
        raise UserError(f"model.weights={weights} does not fit {name}: {detail}")
    skipped = [k for k, v in state.items() if k.startswith(heads) and v.shape != own[k].shape]
    if skipped:
        log.info("model.weights: head not loaded (%s in the file has another class count: %s); the new head "
                 "starts from random", ", ".join(skipped), ", ".join(str(tuple(state[k].shape)) for k in skipped))
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
