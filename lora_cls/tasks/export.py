"""lora-export: a trained run as a model that runs without lora-cls, checked against the trained model.

Formats (docs/DESIGN.md §3 for the math): `torchvision` (the merged model W' = d·W + s·BA, b' = d·b + C, as a
plain state dict for the model's own constructor with the new head), `lowrank` (at d = 0 every adapted layer as
two small layers A then s·B with bias C), `onnx` and `torchscript` (the merged model, or with `lowrank=true` the
low-rank one, with a dynamic batch dimension). Every export is read back from its file and run on a batch of the
run's test images; the largest absolute logit difference against the training model (float32, adapters on their
two-path forward) is stored in export.json, and one above `tolerance` times the largest |logit| (at least 1) is
an error.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_cls.adapters.inject import (
    adapted_units,
    export_low_rank,
    get_decay_state,
    merge_lora,
    set_merge_on_eval,
)
from lora_cls.adapters.layer import LoRALayer
from lora_cls.conf.load import to_container
from lora_cls.conf.schema import EXPORT_FORMATS
from lora_cls.data.decode import Geometry
from lora_cls.data.loaders import ImageDataset
from lora_cls.data.preprocess import EvalTransform, Preprocessing
from lora_cls.data.splits import read_splits_json
from lora_cls.engine.loss import plain_logits
from lora_cls.errors import UserError
from lora_cls.files import atomic_open, write_json
from lora_cls.models.build import build_model
from lora_cls.models.registry import model_spec
from lora_cls.runs.checkpoint import resolve_checkpoint
from lora_cls.runs.folder import EXPORT_SUMMARY, RunDir
from lora_cls.tasks.build import load_model_from_checkpoint
from lora_cls.tasks.inference import MODEL_FILES, MODEL_JSON, load, onnx_runtime
from lora_cls.tasks.peft import export_peft, peft_logits

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
EXPORT_JSON = EXPORT_SUMMARY


# -- sizes -----------------------------------------------------------------------------------------------------

def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of one forward pass of a (1, 3, S, S) image, summed over the Conv2d and Linear modules
    (forward hooks; matrix products outside such modules, e.g. attention scores, are not counted)."""
    total = 0

    def conv(m: nn.Conv2d, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def state_bytes(model: nn.Module) -> bytes:
    """The model's state dict as torch.save writes it (what `torch.load(weights_only=True)` reads back)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def model_stats(model: nn.Module, image_size: int) -> dict[str, int]:
    """Parameters, state-dict file size (bytes) and multiply-adds per image of a plain model."""
    return {"parameters": sum(p.numel() for p in model.parameters()), "file_bytes": len(state_bytes(model)),
            "macs": count_macs(model, image_size)}


# -- the exported model and what rebuilds it -------------------------------------------------------------------

def added_biases(model: nn.Module, plain: nn.Module) -> list[str]:
    """Adapted layers without a bias of their own that have one in the export: the compensating bias C of a
    decay schedule (b' = d·b + C)."""
    return [name for name, unit in adapted_units(model) if isinstance(unit, LoRALayer) and unit.bias is None
            and isinstance(m := plain.get_submodule(name), (nn.Conv2d, nn.Linear)) and m.bias is not None]


def model_description(train_cfg: Any, meta: dict, fmt: str, low_rank: list[str], biased: list[str]) -> dict[str, Any]:
    """model.json: everything besides the weights that running the model needs (format and file, classes, the
    preprocessing, constructor); `lora_cls.load` and `inference.read_export` read it."""
    prep = Preprocessing.from_json(meta.get("preprocessing"), int(train_cfg.dataset.image_size))
    spec = model_spec(train_cfg.model.name, train_cfg.model.source)
    return {"format": fmt, "file": MODEL_FILES[fmt], "model": train_cfg.model.name, "source": train_cfg.model.source,
            "head": spec.head,
            "classes": [str(c) for c in meta["classes"]], "positive_class": meta.get("positive_class"),
            "image_size": int(train_cfg.dataset.image_size), "aux_heads": bool(train_cfg.model.aux_heads),
            "transform_input": train_cfg.model.weights == "imagenet" and train_cfg.model.name in
            ("googlenet", "inception_v3"),
            "input": f"float32 (N, 3, S, S): RGB, {prep.describe()}: (x/255 - mean) / std per channel",
            "preprocessing": prep.to_json(), "mean": list(prep.mean), "std": list(prep.std),
            "low_rank_layers": low_rank,
            "added_biases": biased,
            # temperature scaling (docs/evaluation.md): calibrated probabilities are softmax(logits / temperature)
            "temperature": meta.get("temperature")}


def _plain_model(model: nn.Module, low_rank: bool, path: Path) -> nn.Module:
    if not low_rank:
        return merge_lora(model).eval()
    d = get_decay_state(model)
    if d is None or d.value != 0.0:
        got = "no adapters (finetune is not lora)" if d is None else f"d = {d.value:g}"
        raise UserError(f"a low-rank export needs d = 0 (the frozen weights no longer contribute), but {path} has "
                        f"{got}; train with schedule=decay (or decay_noise) schedule.d_min=0 and a schedule.end the "
                        "run reaches before its best epoch (e.g. schedule.end=0.8), then export that run")
    return export_low_rank(model).eval()


def _save(plain: nn.Module, fmt: str, path: Path, example: torch.Tensor, opset: int) -> None:
    if fmt in ("torchvision", "lowrank"):
        data = state_bytes(plain)
    elif fmt == "torchscript":
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(plain, example, check_trace=False), buffer)
        data = buffer.getvalue()
    else:
        data = _onnx_bytes(plain, example, opset)
    with atomic_open(path, "wb") as f:
        f.write(data)


def _onnx_bytes(plain: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated, still the one on torch 2.1+
        torch.onnx.export(plain, (example,), buffer, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return buffer.getvalue()


# -- verification ----------------------------------------------------------------------------------------------

def verification_images(adapter: Path, geometry: Geometry, count: int) -> tuple[torch.Tensor, str]:
    """uint8 (N, 3, S, S): the first `count` test images of the run's splits.json, or, when that split cannot be
    read, seeded random images (the returned description says which, and why)."""
    splits_path = RunDir.of_checkpoint(adapter).splits
    try:
        splits = read_splits_json(splits_path)
        name = "test" if splits.test else "val"
        # A handful of images: decoded directly, not written to the decoded-image cache as an entry of their own.
        data = ImageDataset(splits.root, splits.split(name)[:count], geometry, cache=False, skip_bad=True)
        if len(data):
            return torch.stack([data[i][0] for i in range(len(data))]), f"{len(data)} {name} images of {splits_path}"
        reason = f"no readable {name} image in {splits_path}"
    except UserError as exc:
        reason = str(exc)
    log.warning("verifying on %d random images instead of the run's test images: %s", count, reason)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, geometry.size, geometry.size), dtype=torch.uint8, generator=generator)
    return images, f"{count} random images (the run's test split is unavailable: {reason})"


@torch.inference_mode()
def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training model's float32 logits, adapters on their two-path forward (not merged)."""
    set_merge_on_eval(model, False)
    try:
        return plain_logits(model.eval()(x)).float()
    finally:
        set_merge_on_eval(model, True)


def _check_fresh(out: Path) -> None:
    found = [f for f in (EXPORT_JSON, MODEL_JSON, *set(MODEL_FILES.values())) if (out / f).exists()]
    if found:
        raise UserError(f"export folder {out} already holds an export ({', '.join(found)}); choose another "
                        "hydra.run.dir")


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path, *, low_rank: bool = False,
                      tolerance: float = 1e-4, images: int = 16, opset: int = 17,
                      base: dict | None = None) -> dict[str, Any]:
    """Export the run, adapter file or PEFT folder (`base`: its base model) `ckpt` as `fmt` into the folder `out`,
    verify it, write export.json.

    Returns export.json's content: files, verification (images, max_abs_logit_diff, tolerance) and, per model
    exported, parameters, file size and multiply-adds (for `lowrank`, also the base model's, and the ratios).
    `peft` is a PEFT LoRA folder, read back by lora-cls and, when PEFT is installed, by
    `PeftModel.from_pretrained` (export.json `peft`): both must match.
    """
    if fmt not in FORMATS:
        raise UserError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    _check_fresh(out)
    if fmt == "onnx":
        onnx_runtime()
    path = resolve_checkpoint(ckpt)
    model, train_cfg, meta = load_model_from_checkpoint(path, base)
    model.float().eval()
    low_rank = low_rank or fmt == "lowrank"
    if fmt == "peft":
        export_peft(model, train_cfg, meta, out)  # refused (UserError) before anything is written where PEFT can't
    plain = _plain_model(model, low_rank, path)
    prep = Preprocessing.from_json(meta.get("preprocessing"), int(train_cfg.dataset.image_size))
    batch, source = verification_images(path, prep.geometry, images)
    x = EvalTransform(prep)(batch)
    names = [n for n, _ in adapted_units(model) if isinstance(plain.get_submodule(n), nn.Sequential)]
    desc = model_description(train_cfg, meta, fmt, names if low_rank else [],
                             [] if low_rank else added_biases(model, plain))
    if fmt != "peft":
        write_json(out / MODEL_JSON, desc)
        _save(plain, fmt, out / MODEL_FILES[fmt], x[:2], opset)
    exported = load(out)  # the file read back through the one inference path, as a user loads it
    with torch.inference_mode():
        reference = reference_logits(model, x)
        diff = float((exported.logits(batch).cpu() - reference).abs().max())
    # float32 rounding of the merged weights grows with the logits' size: the tolerance is relative to it
    allowed = tolerance * max(1.0, float(reference.abs().max()))
    report = _report(fmt, out, path, desc, train_cfg, plain, low_rank)
    report["verification"] = {"images": len(x), "source": source, "max_abs_logit_diff": diff,
                              "max_abs_logit": float(reference.abs().max()), "tolerance": tolerance,
                              "allowed_diff": allowed, "dtype": "float32", "ok": diff <= allowed}
    if fmt == "peft":
        diff = max(diff, _through_peft(report, out, train_cfg, len(meta["classes"]), x, reference, allowed))
    write_json(out / EXPORT_JSON, report)
    if not diff <= allowed:
        raise UserError(f"the {fmt} export differs from the trained model by {diff:.3g} in its logits on {source}, "
                        f"more than tolerance={tolerance:g} × the largest |logit| ({allowed:.3g}); it is kept in "
                        f"{out} for inspection but is not verified")
    return report


def _through_peft(report: dict, out: Path, cfg: Any, num_classes: int, x: torch.Tensor, reference: torch.Tensor,
                  allowed: float) -> float:
    """PEFT's own logits of the folder against the trained model's (export.json `peft`); 0 without PEFT."""
    got = peft_logits(out, cfg, num_classes, x)
    if got is None:
        report["peft"] = {"checked": False, "reason": "peft is not installed"}
        return 0.0
    diff = float((got[0] - reference).abs().max())
    report["peft"] = {"checked": True, "version": got[1], "max_abs_logit_diff": diff, "ok": diff <= allowed,
                      "base_model": f"{cfg.model.source}/{cfg.model.name} (model.weights={cfg.model.weights})"}
    return diff


def _numel(shape: list[int]) -> int:
    n = 1
    for side in shape:
        n *= int(side)
    return n


def _report(fmt: str, out: Path, path: Path, desc: dict, train_cfg: Any, plain: nn.Module,
            low_rank: bool) -> dict[str, Any]:
    size = desc["image_size"]
    stats = {**model_stats(plain, size), "file_bytes_on_disk": (out / MODEL_FILES[fmt]).stat().st_size}
    if fmt == "peft":  # the adapter's own tensors (the base model is PEFT's user's), at the merged model's cost
        from safetensors import safe_open

        with safe_open(str(out / MODEL_FILES[fmt]), framework="pt") as f:
            stats["parameters"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        stats["file_bytes"] = stats["file_bytes_on_disk"]
    report: dict[str, Any] = {"format": fmt, "file": MODEL_FILES[fmt], "checkpoint": str(path),
                              "low_rank": low_rank, **{k: desc[k] for k in ("model", "classes", "image_size",
                                                                            "mean", "std")},
                              "exported": stats, "train_config": to_container(train_cfg)}
    if low_rank:
        base = build_model(desc["model"], None, len(desc["classes"]), source=desc["source"], image_size=size,
                           aux=desc["aux_heads"])
        report["base"] = model_stats(base, size)
        report["ratios_vs_base"] = {k: stats[k] / report["base"][k] for k in ("parameters", "file_bytes", "macs")}
        report["low_rank_layers"] = desc["low_rank_layers"]
    return report


