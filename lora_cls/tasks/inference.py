"""The one inference path: a run, its adapter file or a `lora-export` folder as a ready `Classifier` (`load`).

Loading, merging the adapters into plain layers (W' = d·W + s·BA, docs/DESIGN.md §3), preprocessing and the
forward pass under the run's precision are written once, here: lora-eval, lora-predict, the Python API
(`lora_cls.load`) and lora-export's verification of the file it wrote all go through `Classifier`. An export of
any format (model.pth with model.json, ONNX, TorchScript) is read back by `read_export`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import Dataset

from lora_cls.adapters.inject import merge_lora
from lora_cls.data.loaders import eval_loader
from lora_cls.data.preprocess import EvalTransform, Preprocessing, centre_crop
from lora_cls.engine.device import Precision, autocast, prepare_batch, resolve_device, resolve_precision
from lora_cls.engine.evaluation import TTA_MODES, EvalOutput, evaluate, merge_views, tta_views
from lora_cls.engine.explain import grad_cam, target_layer
from lora_cls.engine.loss import plain_logits
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.runs.checkpoint import resolve_checkpoint

ImageInput = Any  # a PIL image, a path, a (3, H, W) / (N, 3, H, W) tensor, or a sequence of these
MODEL_FILES = {"torchvision": "model.pth", "lowrank": "model.pth", "onnx": "model.onnx", "torchscript": "model.pt",
               "peft": "adapter_model.safetensors"}
MODEL_JSON = "model.json"  # beside every export: what running it needs (classes, input, constructor, format)
FLOAT32 = Precision("32", None, False, "float32")


@dataclass
class Explanation:
    """Grad-CAM of a batch (`Classifier.explain`): `heatmaps` (N, S, S) float32 in [0, 1] over `images`, the model's
    input crops as uint8 (N, S, S, 3); `probs` (N, K) as `probabilities` gives them (without tta); `classes` the
    class index each heatmap is for; `layer` the module it was taken at."""

    heatmaps: np.ndarray
    images: np.ndarray
    probs: np.ndarray
    classes: list[int]
    layer: str


class Classifier:
    """A trained classifier in eval mode on `device`, adapters merged into plain layers.

    `classes` are the class names in logit order; `preprocessing` how an image becomes the model's input (the
    run's own: data.preprocess.Preprocessing; an int S means lora-cls's behaviour before it, squashed to S × S with
    ImageNet statistics); `model` is the plain torch module (float32 input (N, 3, S, S), normalised as in
    training); `precision` is what its forward runs under (float32 unless asked otherwise); `tta` test-time
    augmentation (none, or flip: the mean of the image's and its mirror's probabilities); `checkpoint` is the adapter file it came from (None for a
    `lora-export` folder), `config` and `meta` that file's training config and metadata (None for an export),
    `batch_size` the training run's evaluation batch. `temperature` is the run's fitted temperature T (None for
    runs from before it was fitted); with `calibrate` every probability is softmax(logits / T) (the predicted
    class is the same).
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], preprocessing: Preprocessing | int,
                 checkpoint: Path | None = None, device: str | torch.device = "cpu", precision: Precision = FLOAT32,
                 channels_last: bool = False, positive_class: str | None = None, config: Any = None,
                 meta: dict | None = None, batch_size: int = 64, tta: str = "none",
                 temperature: float | None = None, calibrate: bool = False, head: str | None = None) -> None:
        self.device = torch.device(device)
        self.precision, self.channels_last = precision, bool(channels_last)
        memory = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.eval().to(self.device, memory_format=memory)
        self.classes = [str(c) for c in classes]
        self.preprocessing = (preprocessing if isinstance(preprocessing, Preprocessing)
                              else Preprocessing.legacy(int(preprocessing)))
        self.image_size = self.preprocessing.image_size
        if tta not in TTA_MODES:
            raise UserError(f"tta: must be {' or '.join(TTA_MODES)}, got {tta!r}")
        self.tta = tta
        self.checkpoint, self.positive_class, self.config, self.meta = checkpoint, positive_class, config, meta
        self.batch_size = int(batch_size)  # the training run's evaluation batch: what evaluate/predict use by default
        self.temperature = None if temperature is None else float(temperature)
        if calibrate and self.temperature is None:
            raise UserError(f"calibrate=true needs the temperature fitted at the end of training, and "
                            f"{checkpoint or 'this export'} has none (trained before lora-cls fitted one); train "
                            "the run again, or use calibrate=false")
        self.calibrate = bool(calibrate)
        self.head = head  # the classifier head's module name (never a Grad-CAM target)
        self._normalize = EvalTransform(self.preprocessing).to(self.device)

    def __repr__(self) -> str:
        return (f"Classifier({type(self.model).__name__}, classes={self.classes}, image_size={self.image_size}, "
                f"device={self.device})")

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images → the model's input: float32 (N, 3, S, S) on the device, fitted and normalised as in training.

        PIL images and paths are decoded as training does (EXIF orientation, RGB, the run's resize and crop); uint8
        tensors are taken as 0–255 and float tensors as 0–1, (3, H, W) or (N, 3, H, W), RGB, at any size (a batch
        of the run's stored squares, (N, 3, R, R) uint8, as it is).
        """
        return self._normalize(self._batch(images))

    @torch.inference_mode()
    def logits(self, images: ImageInput) -> torch.Tensor:
        """float32 logits (N, K) on the device, under the classifier's precision (without test-time augmentation)."""
        x = self.preprocess(images)
        with autocast(self.device, self.precision):
            return plain_logits(self.model(x)).float()

    @property
    def scale(self) -> float:
        """What the logits are divided by before the softmax: T with calibrate, else 1."""
        return self.temperature if self.calibrate else 1.0

    @torch.inference_mode()
    def probabilities(self, images: ImageInput) -> torch.Tensor:
        """Class probabilities, float32 (N, K) on the CPU, columns in the order of `classes` (with tta=flip the
        mean over the image and its mirror; with calibrate, of the logits divided by the temperature)."""
        x = self.preprocess(images)
        views = tta_views(x, self.tta)
        with autocast(self.device, self.precision):
            probs = (plain_logits(self.model(views)).float() / self.scale).softmax(dim=1)
        return merge_views(probs, self.tta).cpu()

    def predict(self, images: ImageInput) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes[i] for i in self.probabilities(images).argmax(dim=1).tolist()]

    def evaluate(self, dataset: Dataset, batch_size: int | None = None, desc: str = "eval",
                 progress: bool = True) -> EvalOutput:
        """Loss and class probabilities over a dataset of (uint8 image, label), as training's final evaluation."""
        loader = eval_loader(dataset, int(batch_size or self.batch_size))
        return evaluate(self.model, loader, self._normalize, self.device, self.precision, self.channels_last,
                        desc=desc, progress=progress, tta=self.tta, temperature=self.scale)

    def explain(self, images: ImageInput, classes: Sequence[int] | None = None,
                layer: str | None = None) -> Explanation:
        """Grad-CAM heatmaps of `images` for `classes` (default: each image's predicted class), at `layer` (a module
        name; default: the model family's, engine/explain.py). Needs the grad-cam package and a model with its
        layers: a run, its adapter file, or a torchvision/lowrank export (ONNX and TorchScript have no hooks)."""
        if isinstance(self.model, (OnnxModule, torch.jit.ScriptModule)):
            raise UserError("explain: Grad-CAM needs the model's own layers, which an ONNX or TorchScript export does "
                            "not expose; use the run folder, its adapter file, or a torchvision/lowrank export")
        batch = self._batch(images)
        x = self._normalize(batch)
        with torch.inference_mode(), autocast(self.device, self.precision):
            probs = (plain_logits(self.model(x)).float() / self.scale).softmax(dim=1).cpu()
        targets = probs.argmax(dim=1).tolist() if classes is None else [int(c) for c in classes]
        name, module, reshape = target_layer(self.model, self.image_size, layer, self.head)
        heatmaps = grad_cam(self.model, x, targets, module, reshape)
        crops = centre_crop(batch, self.image_size).permute(0, 2, 3, 1).cpu().numpy()
        return Explanation(heatmaps, crops, probs.numpy(), targets, name)

    def export(self, format: str, folder: str | Path, **options: Any) -> dict[str, Any]:
        """`lora-export` from Python: write `format` (torchvision, lowrank, onnx, torchscript) into `folder`,
        verified against the trained model; returns export.json's content (options: low_rank, tolerance,
        images, opset)."""
        if self.checkpoint is None:
            raise UserError("this classifier was loaded from an export; export from the run or its adapter file")
        from lora_cls.tasks.export import export_checkpoint

        return export_checkpoint(self.checkpoint, format, folder, **options)

    def _batch(self, images: ImageInput) -> torch.Tensor:
        """uint8 (N, 3, R, R) on the device (the run's stored squares): such a batch as it is, anything else
        through `_uint8` per image."""
        side = self.preprocessing.geometry.size
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.dtype == torch.uint8 and \
                tuple(images.shape[1:]) == (3, side, side):
            return prepare_batch(images, self.device, self.channels_last)
        batch = torch.stack([self._uint8(image) for image in _as_list(images)])
        return prepare_batch(batch, self.device, self.channels_last)

    def _uint8(self, image: Any) -> torch.Tensor:
        """One image as the run's stored square (3, R, R), fitted exactly as training's decoder fits a file."""
        geometry = self.preprocessing.geometry
        if isinstance(image, (str, Path)):
            from lora_cls.data.decode import decode_image

            return decode_image(image, geometry, None)
        if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
            x = image.detach().cpu()
            x = x if x.dtype == torch.uint8 else (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
            image = Image.fromarray(x.permute(1, 2, 0).numpy(), mode="RGB")
        if isinstance(image, Image.Image):
            from lora_cls.data.decode import _to_rgb

            rgb = geometry.apply(_to_rgb(ImageOps.exif_transpose(image)))
            return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
        raise UserError(f"cannot classify a {type(image).__name__}"
                        + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else "")
                        + "; give PIL images, image paths, or RGB tensors (3, H, W) / (N, 3, H, W)")


def _as_list(images: ImageInput) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise UserError("no images to classify")
        return list(images)
    return [images]


def from_checkpoint(path: str | Path, device: str | torch.device = "cpu", precision: str | None = "32",
                    device_key: str = "device", tta: str = "none", calibrate: bool = False,
                    base: dict | None = None) -> Classifier:
    """A run folder, adapter file or PEFT LoRA folder as a Classifier: the model rebuilt from the files alone,
    adapters merged.

    `precision`: "32", "bf16", "16", "auto", or None for the training run's own (what lora-eval uses to reproduce
    the run's metrics exactly); `device`: "cpu", "cuda", "cuda:N" or "auto"; `calibrate`: probabilities at the
    run's fitted temperature; `base`: a PEFT folder's base model where the folder does not name it (name, source,
    weights, image_size, classes: tasks/peft.py)."""
    from lora_cls.models.registry import model_spec
    from lora_cls.tasks.build import eval_batch_size, load_model_from_checkpoint

    adapter = resolve_checkpoint(path)
    model, train_cfg, meta = load_model_from_checkpoint(adapter, base)
    where = resolve_device(str(device), device_key) if not isinstance(device, torch.device) else device
    how = resolve_precision(precision or meta.get("precision", "auto"), where)
    merged = merge_lora(model)
    del model
    prep = Preprocessing.from_json(meta.get("preprocessing"), int(train_cfg.dataset.image_size))
    return Classifier(merged, meta["classes"], prep, adapter, where, how, bool(train_cfg.trainer.channels_last),
                      meta.get("positive_class"), train_cfg, meta,
                      int(meta.get("eval_batch_size") or eval_batch_size(train_cfg)), tta, meta.get("temperature"),
                      calibrate, model_spec(train_cfg.model.name, train_cfg.model.source).head)


def load(path: str | Path, device: str | torch.device = "cpu", precision: str | None = "32",
         tta: str = "none", calibrate: bool = False, base: dict | None = None) -> Classifier:
    """A lora-train run folder, its adapter file, a lora-export folder (any format) or a PEFT LoRA folder (`base`:
    its base model, when the folder does not name it) as a ready Classifier in eval mode; float32 unless
    `precision` says otherwise (None: the training run's precision); with `calibrate`, probabilities at the run's
    fitted temperature (model.json's `temperature` for an export)."""
    path = Path(path).expanduser()
    if (path / MODEL_JSON).is_file() and not (path / "adapter_config.json").is_file():
        model, desc = read_export(path)
        prep = Preprocessing.from_json(desc.get("preprocessing"), int(desc["image_size"]))
        return Classifier(model, desc["classes"], prep, None, device, positive_class=desc.get("positive_class"),
                          tta=tta, temperature=desc.get("temperature"), calibrate=calibrate, head=desc.get("head"))
    return from_checkpoint(path, device, precision, tta=tta, calibrate=calibrate, base=base)


def base_settings(cfg: Any) -> dict | None:
    """The `base.*` settings of lora-eval, lora-predict and lora-export (a PEFT folder's base model) as a dict."""
    from omegaconf import OmegaConf

    base = cfg.get("base") if hasattr(cfg, "get") else None
    return None if base is None else OmegaConf.to_container(base, resolve=True)


# -- exports, read back -----------------------------------------------------------------------------------------

def _two_layers(layer: nn.Module, rank: int, has_bias: bool) -> nn.Sequential:
    """Empty A and B layers of `layer`'s geometry at `rank` (filled by load_state_dict)."""
    if isinstance(layer, nn.Conv2d):
        a = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                      layer.groups, bias=False, padding_mode=layer.padding_mode)
        return nn.Sequential(a, nn.Conv2d(rank, layer.out_channels, 1, groups=layer.groups, bias=has_bias))
    return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False),
                         nn.Linear(rank, layer.out_features, bias=has_bias))


def _description(folder: Path) -> dict[str, Any]:
    try:
        desc = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not a lora-export folder (its {MODEL_JSON} cannot be read: {exc})") from None
    if not isinstance(desc, dict) or "classes" not in desc:
        raise UserError(f"{folder / MODEL_JSON} is not a lora-export model description")
    return desc


def load_exported(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A `torchvision` or `lowrank` export (model.pth + model.json) as a plain model in eval mode, and model.json.

    The model is the constructor's own (torchvision or timm, random init, new head for the classes); the layers in
    model.json's `added_biases` get a bias (a decay schedule's C), those in `low_rank_layers` become two small
    layers; then the state dict is loaded strictly.
    """
    folder = Path(folder)
    desc = _description(folder)
    try:
        state = torch.load(folder / MODEL_FILES["torchvision"], map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{folder} is not a lora-export torchvision/lowrank folder (model.pth + model.json): "
                        f"{exc}") from None
    model = build_model(desc["model"], None, len(desc["classes"]), source=desc["source"],
                        image_size=int(desc["image_size"]), aux=bool(desc["aux_heads"]))
    if desc.get("transform_input"):
        model.transform_input = True
    for name in desc.get("added_biases", []):
        layer = model.get_submodule(name)
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
    for name in desc["low_rank_layers"]:
        layer = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        replacement = _two_layers(layer, int(state[f"{name}.0.weight"].shape[0]), f"{name}.1.bias" in state)
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    model.load_state_dict(state, strict=True)
    return model.eval(), desc


def onnx_runtime():
    """onnxruntime, or the UserError that names the optional extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UserError("format=onnx needs the optional packages onnx and onnxruntime: "
                        "pip install 'lora-cls[export]' (or pip install onnx onnxruntime)") from None
    return onnxruntime


class OnnxModule(nn.Module):
    """An ONNX export as a module: float32 images (N, 3, S, S) → logits, run by onnxruntime on the CPU."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.session = onnx_runtime().InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"images": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)


def read_export(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Any lora-export folder as (a module from normalised float32 images to logits, model.json)."""
    folder = Path(folder)
    desc = _description(folder)
    fmt = desc.get("format", "torchvision")  # exports from before model.json named its format were model.pth
    if fmt in ("torchvision", "lowrank"):
        return load_exported(folder)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still supported
            return torch.jit.load(str(folder / MODEL_FILES[fmt]), map_location="cpu").eval(), desc
    if fmt == "onnx":
        return OnnxModule(folder / MODEL_FILES[fmt]), desc
    raise UserError(f"{folder / MODEL_JSON}: unknown export format {fmt!r}")
