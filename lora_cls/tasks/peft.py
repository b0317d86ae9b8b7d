"""PEFT adapter folders in lora-cls's commands (docs/DESIGN.md §7): a folder as a model to evaluate, predict with or
export (`load_peft_model`), a run written as one (`export_peft`, checked through PEFT itself when it is installed:
`peft_logits`), and a training run started from one (`lora.init_from`: `with_init_from`, `apply_init_from`).

The tensors map through `adapters.peft`; the base model is named by the folder's `base_model_name_or_path`
(`torchvision/<name>` or `timm/<name>[.<tag>]`, as lora-cls writes it) or by the `base.*` settings, with
`base.weights` (ImageNet by default: what a PEFT adapter of a pretrained model was trained on).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lora_cls.adapters.peft import check_peft_config, from_peft, peft_layers, to_peft
from lora_cls.conf.load import stored_train_config, to_container
from lora_cls.conf.schema import TrainConfig
from lora_cls.errors import UserError
from lora_cls.models.build import build_model
from lora_cls.models.registry import SOURCES, model_heads, model_spec, torchvision_names
from lora_cls.runs import checkpoint as ckpt
from lora_cls.runs.peft import is_peft_folder, read_peft_folder, write_peft_folder

log = logging.getLogger(__name__)
META_FORMAT = "lora-cls-peft/1"
BASE_DEFAULTS = {"name": None, "source": None, "weights": "imagenet", "image_size": None, "classes": None}


def base_model_id(source: str, name: str) -> str:
    """What lora-cls writes as `base_model_name_or_path`: `torchvision/<name>` or `timm/<name>`."""
    return f"{source}/{name}"


def parse_base_model(value: Any) -> tuple[str, str] | None:
    """(source, name) of a `base_model_name_or_path`, or None when it names no model lora-cls knows."""
    if not value or not isinstance(value, str):
        return None
    source, _, name = value.rpartition("/")
    if source in SOURCES and name:
        return source, name.split(".")[0] if source == "timm" else name
    return ("torchvision", value) if not source and value in torchvision_names() else None


def lora_settings(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """lora.* of the adapters in a PEFT folder: the layers and ranks its tensors hold, alpha, rsLoRA, DoRA,
    dropout, and lora.bn=train when it carries BatchNorm statistics."""
    ranks = peft_layers(tensors)
    if not ranks:
        raise UserError("the PEFT folder holds no LoRA factors (no *.lora_A.weight tensor)")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    init = str(config.get("init_lora_weights", True)).lower()
    return {"targets": list(ranks), "rank": rank, "alpha": float(config.get("lora_alpha", 8)),
            "rank_pattern": {n: r for n, r in ranks.items() if r != rank} or None,
            "rslora": bool(config.get("use_rslora", False)), "dora": bool(config.get("use_dora", False)),
            "dropout": float(config.get("lora_dropout", 0.0)), "init": "gaussian" if init == "gaussian" else "kaiming",
            "bn": "train" if any(k.endswith(".running_mean") for k in tensors) else "frozen",
            "allow_high_rank": True}


def _train_config(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], meta: dict | None,
                  base: Mapping[str, Any], source: str) -> DictConfig:
    """The training config that rebuilds the adapted model: lora-cls's own (lora_cls.json) or one composed from
    the base settings; lora.* from the folder either way (a pissa/olora run comes back as its plain-LoRA form)."""
    if meta is not None:
        cfg = stored_train_config(meta.get("config"), source)
    else:
        named = (base.get("source"), base.get("name")) if base.get("name") else parse_base_model(
            config.get("base_model_name_or_path"))
        if named is None:
            raise UserError(f"{source} names no base model lora-cls knows (base_model_name_or_path "
                            f"{config.get('base_model_name_or_path')!r}); name it: base.name=<model> "
                            "(base.source=timm for timm's)")
        cfg = OmegaConf.structured(TrainConfig)  # today's defaults (compose would start a second Hydra in a job)
        OmegaConf.update(cfg, "model", {"name": named[1], "source": named[0] or "torchvision",
                                        "weights": base.get("weights")}, merge=True)
        if base.get("image_size"):
            cfg.dataset.image_size = int(base["image_size"])
        else:
            cfg.dataset.image_size = 224
    OmegaConf.update(cfg, "lora", lora_settings(config, tensors), merge=True)
    cfg.finetune, cfg.schedule.kind = "lora", "none"
    return cfg


def load_peft_model(folder: str | Path, base: Mapping[str, Any] | None = None) -> tuple[nn.Module, DictConfig, dict]:
    """A PEFT LoRA folder as (the adapted model, its training config, metadata like an adapter file's)."""
    from lora_cls.tasks.build import build_classifier, preprocessing

    folder = Path(folder)
    source = f"PEFT adapter {folder}"
    config, tensors, meta = read_peft_folder(folder)
    check_peft_config(config, source)
    base = {**BASE_DEFAULTS, **(base or {})}
    cfg = _train_config(config, tensors, meta, base, source)
    head = model_spec(cfg.model.name, cfg.model.source).head
    if f"base_model.model.{head}.weight" not in tensors:
        raise UserError(f"{source} does not hold the classification head {head} (modules_to_save): lora-cls needs "
                        "the trained head to know and compute the classes")
    classes = list(meta["classes"]) if meta else list(base["classes"] or range(
        tensors[f"base_model.model.{head}.weight"].shape[0]))
    model, _, identity = build_classifier(cfg, len(classes), from_file=True)
    if meta and identity["sha256"] != meta.get("base_weights", {}).get("sha256"):
        raise UserError(f"{source} was trained on other base weights (model.weights={cfg.model.weights}); make the "
                        "same base weights available and try again")
    ckpt.apply_adapter(model, from_peft(model, tensors, config, source), source)
    meta = {**(meta or {}), "classes": [str(c) for c in classes], "config": to_container(cfg),
            "base_weights": identity}
    meta.setdefault("preprocessing", preprocessing(cfg).to_json())
    return model, cfg, meta


def kept_modules(model: nn.Module, cfg: DictConfig) -> list[str]:
    """PEFT's modules_to_save for a run: its heads, and every BatchNorm layer when their statistics trained."""
    keep = model_heads(model_spec(cfg.model.name, cfg.model.source), bool(cfg.model.aux_heads))
    if cfg.lora.bn == "train":
        keep += [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return keep


def export_peft(model: nn.Module, cfg: DictConfig, meta: dict, out: Path) -> None:
    """Write `out` as a PEFT LoRA folder (+ lora_cls.json) for the trained `model`."""
    if cfg.finetune != "lora":
        raise UserError(f"format=peft writes a LoRA adapter, and this run is finetune={cfg.finetune}; export "
                        "format=torchvision instead")
    config, tensors = to_peft(model, kept_modules(model, cfg), base_model_id(cfg.model.source, cfg.model.name))
    extra = {k: meta.get(k) for k in ("classes", "positive_class", "preprocessing", "base_weights",
                                      "eval_batch_size", "precision")}
    write_peft_folder(out, config, tensors, {"format": META_FORMAT, "config": to_container(cfg), **extra})


def peft_logits(out: Path, cfg: DictConfig, num_classes: int, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """The logits of `PeftModel.from_pretrained(<the base model>, out)` on `x`, and PEFT's version; None (with a
    warning) when PEFT is not installed. The base is the constructor with the run's base weights, as lora-cls
    built it (a random base is seeded by trainer.seed)."""
    try:
        import peft
    except ImportError:
        log.warning("format=peft: PEFT is not installed, so the folder is not checked through PEFT itself "
                    "(pip install 'lora-cls[peft]'); it was checked by reading it back into lora-cls")
        return None
    torch.manual_seed(int(cfg.trainer.seed))
    base = build_model(cfg.model.name, cfg.model.weights, num_classes, source=cfg.model.source,
                       image_size=int(cfg.dataset.image_size), aux=bool(cfg.model.aux_heads))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about grouped convolutions and unknown model classes
        model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.inference_mode():
        out_logits = model(x)
    return (out_logits[0] if isinstance(out_logits, tuple) else out_logits).float(), peft.__version__


# -- lora.init_from --------------------------------------------------------------------------------------------

def with_init_from(cfg: DictConfig) -> DictConfig:
    """`cfg` with lora.* taken from the PEFT folder `lora.init_from` names (unchanged without one)."""
    folder = cfg.lora.get("init_from")
    if not folder:
        return cfg
    if not is_peft_folder(folder):
        raise UserError(f"lora.init_from={folder}: not a PEFT adapter folder (no adapter_config.json)")
    config, tensors, _ = read_peft_folder(folder)
    check_peft_config(config, f"lora.init_from={folder}")
    named = parse_base_model(config.get("base_model_name_or_path"))
    if named is not None and (named[0], named[1]) != (cfg.model.source, cfg.model.name):
        raise UserError(f"lora.init_from={folder} is an adapter of {named[0]} {named[1]}; add model.name={named[1]}"
                        + (f" model.source={named[0]}" if named[0] != cfg.model.source else ""))
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "lora", lora_settings(config, tensors), merge=True)
    cfg.finetune = "lora"
    return cfg


def apply_init_from(model: nn.Module, cfg: DictConfig) -> None:
    """Load the adapters, head and BatchNorm statistics of `lora.init_from` into the freshly built `model`."""
    folder = cfg.lora.get("init_from")
    config, tensors, _ = read_peft_folder(folder)
    source = f"lora.init_from={folder}"
    ckpt.apply_adapter(model, from_peft(model, tensors, config, source), source)
    log.info("adapters, head and BatchNorm statistics started from %s", folder)
