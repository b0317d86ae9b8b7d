"""scripts/bench.py's variants: the recipe of each row (what it fine-tunes, at which precision and memory
format), and how it is built: its own copy of one base model, placed on the device, with its optimizer and a
callable that runs one step (the engine's training step, or one evaluation forward) on the shared batch.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import bench_timing
import torch
from torch import nn

from lora_cls.adapters.inject import merge_lora, merged_view, select_targets, set_merge_on_eval
from lora_cls.adapters.layer import LoRALayer
from lora_cls.engine.device import Precision, Runtime, autocast, resolve_precision
from lora_cls.engine.optim import build_optimizer
from lora_cls.engine.trainer import Trainer, TrainerSettings
from lora_cls.models.build import build_model
from lora_cls.models.finetune import prepare_finetune
from lora_cls.models.registry import model_spec
from lora_cls.tasks.build import compiled


class Recipe(NamedTuple):
    """A row of the table: what it shows and how its model is made."""

    kind: str  # "train" | "eval"
    label: str
    impl: str  # "lora-cls" | "peft" | "torchvision"
    finetune: str
    precision: str  # "fp32" | "fast" (the fast path's precision, --precision)
    channels_last: bool
    build: str  # train: "finetuned" | "compiled" | "fused" | "compiled_fused" | "dora" | "peft" | "peft_dora"; eval:
    #            "base" | "unmerged" | "merged" | "exported". fused: lora.fused=true (lora_cls/fused.py); dora:
    #            lora.dora=true; the others lora.fused's default


# The variants, in the order they are built, timed and reported.
RECIPES: dict[str, Recipe] = {
    "full_fp32": Recipe("train", "full fine-tune", "torchvision", "full", "fp32", False, "finetuned"),
    "full_fast": Recipe("train", "full fine-tune", "torchvision", "full", "fast", True, "finetuned"),
    "head_fp32": Recipe("train", "head only (floor)", "torchvision", "linear", "fp32", False, "finetuned"),
    "head_fast": Recipe("train", "head only (floor)", "torchvision", "linear", "fast", True, "finetuned"),
    "lora_fp32": Recipe("train", "lora-cls LoRA", "lora-cls", "lora", "fp32", False, "finetuned"),
    "lora_fp32_cl": Recipe("train", "lora-cls LoRA, default path without bf16", "lora-cls", "lora", "fp32",
                           True, "finetuned"),
    "lora_fast": Recipe("train", "lora-cls LoRA, default path", "lora-cls", "lora", "fast", True,
                        "finetuned"),
    "lora_compiled": Recipe("train", "lora-cls LoRA, default path + torch.compile", "lora-cls", "lora",
                            "fast", True, "compiled"),
    "lora_fp32_fused": Recipe("train", "lora-cls LoRA, fused conv (lora.fused=true)", "lora-cls", "lora", "fp32",
                              False, "fused"),
    "lora_fast_fused": Recipe("train", "lora-cls LoRA, default path + fused conv", "lora-cls", "lora", "fast",
                              True, "fused"),
    "lora_compiled_fused": Recipe("train", "lora-cls LoRA, fused conv + torch.compile", "lora-cls", "lora",
                                  "fast", True, "compiled_fused"),
    "dora_fp32": Recipe("train", "lora-cls DoRA (lora.dora=true)", "lora-cls", "lora", "fp32", False, "dora"),
    "dora_fast": Recipe("train", "lora-cls DoRA, default path", "lora-cls", "lora", "fast", True, "dora"),
    "peft_fp32": Recipe("train", "PEFT LoRA", "peft", "lora", "fp32", False, "peft"),
    "peft_dora_fp32": Recipe("train", "PEFT DoRA (use_dora=True)", "peft", "lora", "fp32", False, "peft_dora"),
    "peft_fast": Recipe("train", "PEFT LoRA", "peft", "lora", "fast", True, "peft"),
    "eval_base": Recipe("eval", "eval: base model", "torchvision", "none", "fast", True, "base"),
    "eval_unmerged": Recipe("eval", "eval: adapters unmerged", "lora-cls", "lora", "fast", True, "unmerged"),
    "eval_merged": Recipe("eval", "eval: merged view (lora-train, lora-eval)", "lora-cls", "lora", "fast", True,
                          "merged"),
    "eval_exported": Recipe("eval", "eval: merge_lora export", "lora-cls", "lora", "fast", True, "exported"),
}
PEFT_MISSING = "peft not installed (pip install 'lora-cls[bench]')"
VARIANTS = tuple(RECIPES)
QUICK_SKIPS = ("head_fast", "lora_fp32_cl", "lora_fp32_fused", "lora_fast_fused", "dora_fast",
               "peft_dora_fp32")  # rows --quick leaves out
COMPILED = ("lora_compiled", "lora_compiled_fused")  # rows only --compile (or --variants) runs


@dataclass
class Variant:
    """One row of the table: a model, its settings and a callable that runs one step on the shared batch."""

    name: str
    kind: str  # "train" | "eval"
    label: str
    impl: str  # "lora-cls" | "peft" | "torchvision"
    finetune: str
    precision: str
    channels_last: bool
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], None] | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)  # seconds per step, one value per round
    first_step_seconds: float | None = None
    memory: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.step is not None


def count_params(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, precision, channels_last: bool) -> Callable[[], None]:
    """The engine's own training step (`Trainer.step`, what lora-train's epochs run) on a fixed batch."""
    settings = TrainerSettings(Runtime(device, precision, channels_last, progress=False), epochs=1, steps_per_epoch=1)
    trainer = Trainer(model, optimizer, nn.Identity(), settings)
    return lambda: trainer.step(x, y)


def eval_step(model: nn.Module, x: torch.Tensor, device: torch.device, precision,
              channels_last: bool) -> Callable[[], None]:
    """The engine's evaluation step (engine.evaluate): inference_mode, autocast, one forward."""

    def run() -> None:
        with torch.inference_mode():
            xb = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with autocast(device, precision):
                model(xb).float()

    return run


def peft_model(base: nn.Module, targets: list[str], rank: int, alpha: float, head: str,
               dora: bool = False) -> nn.Module:
    """PEFT LoRA (or DoRA) on exactly the layers lora-cls adapts, the new head trained in full (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=[head], use_dora=dora)
    return get_peft_model(base, config)


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Non-zero B (a non-trivial merged weight) for the evaluation variants; speed does not depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 1e-3)


def selected(name: str, args: argparse.Namespace) -> bool:
    """Whether the run times `name`: the --variants named, else all but COMPILED (unless --compile) and,
    with --quick, all but QUICK_SKIPS."""
    if args.variants:
        return name in args.variants
    if name in COMPILED:
        return args.compile
    return not (args.quick and name in QUICK_SKIPS)


class VariantBuilder:
    """Makes each variant from its recipe: its own copy of one base model, fine-tuned, placed on the device,
    with its optimizer and step on the shared batch (x, y for training, xe for evaluation)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                 xe: torch.Tensor, fast: Precision | None = None) -> None:
        self.args, self.device, self.x, self.y, self.xe = args, device, x, y, xe
        self.spec = model_spec(args.model)
        self.rank = args.rank
        self.alpha = float(self.rank) if args.alpha is None else args.alpha
        self.precisions = {"fast": fast or resolve_precision(args.precision, device),
                           "fp32": resolve_precision("32", device)}
        torch.manual_seed(args.seed)
        self.base = build_model(args.model, args.weights, args.classes, image_size=args.image_size)
        self.patterns = list(args.targets) if args.targets else list(self.spec.targets)
        self.targets = select_targets(self.base, self.patterns, exclude=[self.spec.head])
        if args.no_peft:
            self.peft_error = "skipped (--no-peft)"
        else:
            self.peft_error = None if bench_timing.peft_version() else PEFT_MISSING

    def build(self, name: str) -> Variant:
        r = RECIPES[name]
        precision = self.precisions[r.precision]
        v = Variant(name=name, kind=r.kind, label=r.label, impl=r.impl, finetune=r.finetune,
                    precision=precision.name, channels_last=r.channels_last)
        if r.kind == "eval":
            return self.evaluated(v, self.eval_model(r.build), precision)
        if r.build.startswith("peft"):
            return self.with_peft(v, precision, dora=r.build == "peft_dora")
        self.trained(v, self.finetuned(r.finetune, fused=r.build.endswith("fused"), dora=r.build == "dora"),
                     precision)
        if r.build.startswith("compiled"):
            mode = getattr(self.args, "compile_mode", "default")
            v.step = train_step(compiled(v.model, mode, self.device), v.optimizer, self.x, self.y, self.device, precision,
                                v.channels_last)
        return v

    def finetuned(self, finetune: str, fused: bool = False, dora: bool = False) -> nn.Module:
        model = copy.deepcopy(self.base)
        options = {"fused": "true"} if fused and finetune == "lora" else {}
        if dora and finetune == "lora":
            options["dora"] = True
        prepare_finetune(model, self.args.model, finetune, targets=self.patterns, rank=self.rank,
                         alpha=self.alpha, **options)
        return model

    def placed(self, model: nn.Module, channels_last: bool) -> nn.Module:
        return model.to(self.device,
                        memory_format=torch.channels_last if channels_last else torch.preserve_format)

    def trained(self, v: Variant, model: nn.Module, precision: Precision) -> Variant:
        v.model = self.placed(model, v.channels_last)
        v.optimizer = build_optimizer(v.model.parameters(), "adamw", 1e-4, 0.01, device=self.device)
        v.step = train_step(v.model, v.optimizer, self.x, self.y, self.device, precision, v.channels_last)
        return v

    def with_peft(self, v: Variant, precision: Precision, dora: bool = False) -> Variant:
        """PEFT's LoRA (or DoRA) on the layers lora-cls adapts; without PEFT (or with --no-peft), a note and no
        step."""
        if self.peft_error:
            v.note = self.peft_error
            return v
        model = peft_model(copy.deepcopy(self.base), self.targets, self.rank, self.alpha, self.spec.head, dora)
        return self.trained(v, model, precision)

    def eval_model(self, build: str) -> nn.Module:
        """The base model, or LoRA with random adapters: unmerged, merged on eval, or merge_lora's export."""
        if build == "base":
            return copy.deepcopy(self.base)
        model = self.finetuned("lora")
        randomize_adapters(model, self.args.seed)
        set_merge_on_eval(model, build != "unmerged")
        if build == "merged":  # what lora-train's validation, lora-eval and lora-predict evaluate on
            return merged_view(model)
        return merge_lora(model) if build == "exported" else model

    def evaluated(self, v: Variant, model: nn.Module, precision: Precision) -> Variant:
        v.model = self.placed(model, v.channels_last).eval()
        v.step = eval_step(v.model, self.xe, self.device, precision, v.channels_last)
        return v


def build_variants(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                   xe: torch.Tensor, fast: Precision | None = None) -> list[Variant]:
    builder = VariantBuilder(args, device, x, y, xe, fast)
    variants = [builder.build(name) for name in VARIANTS if selected(name, args)]
    unknown = sorted(set(args.variants or ()) - {v.name for v in variants})
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return variants
