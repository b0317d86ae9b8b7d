"""Side-by-side training and evaluation throughput of lora-cls, its baselines and PEFT, in one process.

Every variant gets its own copy of the same base model and runs on the same batch. Timings are interleaved
round-robin (each round times a block of steps of every variant, starting one variant later than the round
before), after a warm-up of each variant, and summarised by the median per variant: a change in machine load
hits all variants alike, and the claims are ratios of those medians (docs/BENCHMARKS.md).

    python scripts/bench.py                    # ResNet34, LoRA rank 8 on the preset, batch 16, 224 px
    python scripts/bench.py --quick            # fewer rounds: about a minute on 2 CPU cores
    python scripts/bench.py --e2e              # + lora-train epochs on the synthetic set vs the pure step
    python scripts/bench.py --compile          # + the default path under torch.compile
    python scripts/bench.py --device cuda      # on a GPU (bf16 autocast, cudnn.benchmark)

A training step is forward + backward + optimizer step (AdamW from the engine's `build_optimizer`) on a fixed
batch; an evaluation step is one forward under `torch.inference_mode`. PEFT (`pip install 'lora-cls[bench]'`)
is imported only here; without it its rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lora_cls.engine import (
    Precision,
    autocast,
    build_optimizer,
    cpu_supports_bf16,
    resolve_device,
    resolve_precision,
)
from lora_cls.lora import LoRALayer, merge_lora, select_targets, set_merge_on_eval
from lora_cls.models import build_model, model_spec, prepare_finetune

PEFT_MISSING = "peft not installed (pip install 'lora-cls[bench]')"
VARIANTS = ("full_fp32", "full_fast", "head_fp32", "head_fast", "lora_fp32", "lora_fp32_cl", "lora_fast",
            "lora_compiled", "peft_fp32", "peft_fast",
            "eval_base", "eval_unmerged", "eval_merged", "eval_exported")
QUICK_SKIPS = ("head_fast", "lora_fp32_cl")  # rows --quick leaves out (no target depends on them)

# (key, numerator, denominator, what is divided, comparison, target): ratios of median throughputs, or of
# median step times where the target is about step time. A ratio whose variants did not run is null.
RATIOS: tuple[tuple[str, str, str, str, str, float | None], ...] = (
    ("lora_fast_vs_peft_fp32", "lora_fast", "peft_fp32", "throughput", ">=", 2.0),
    ("lora_fp32_vs_peft_fp32", "lora_fp32", "peft_fp32", "throughput", ">=", 1.0),
    ("lora_fast_vs_peft_fast", "lora_fast", "peft_fast", "throughput", ">=", None),
    ("peft_fast_vs_peft_fp32", "peft_fast", "peft_fp32", "throughput", ">=", None),
    ("lora_fast_vs_lora_fp32", "lora_fast", "lora_fp32", "throughput", ">=", None),
    ("lora_fp32_cl_vs_lora_fp32", "lora_fp32_cl", "lora_fp32", "throughput", ">=", None),
    ("lora_fp32_step_over_full_fp32_step", "lora_fp32", "full_fp32", "step_time", "<=", 0.5),
    ("lora_fast_step_over_full_fast_step", "lora_fast", "full_fast", "step_time", "<=", 0.5),
    ("lora_fp32_vs_head_fp32", "lora_fp32", "head_fp32", "throughput", ">=", None),
    ("lora_fast_vs_head_fast", "lora_fast", "head_fast", "throughput", ">=", None),
    ("eval_merged_vs_base", "eval_merged", "eval_base", "throughput", ">=", 0.97),
    ("eval_unmerged_vs_base", "eval_unmerged", "eval_base", "throughput", ">=", None),
    ("eval_exported_vs_base", "eval_exported", "eval_base", "throughput", ">=", None),
    ("lora_compiled_vs_lora_fast", "lora_compiled", "lora_fast", "throughput", ">=", None),
)
E2E_TARGET = 0.85  # lora-train's epoch throughput within 15% of the pure model step


# -- settings and machine --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet34", help="registry name (lora_cls.models.MODELS)")
    p.add_argument("--weights", default=None,
                   help="base weights: imagenet, a state-dict path, or none (random)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the model's preset)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, so s = 1)")
    p.add_argument("--targets", nargs="+", default=None, help="target patterns (default: the model's preset)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", "--resolution", dest="image_size", type=int, default=224)
    p.add_argument("--eval-batch", type=int, default=None, help="evaluation batch (default: --batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="the fast path's precision: auto | bf16 | 16 | 32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (needs --threads 1; steadier "
                        "when the machine is shared)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each round, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds (median over rounds)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help=f"run only these variants ({', '.join(VARIANTS)}; default: all but lora_compiled)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT even when it is installed")
    p.add_argument("--compile", action="store_true", help="add the default path under torch.compile")
    p.add_argument("--e2e", action="store_true",
                   help="add lora-train epochs on the synthetic set, compared with the pure step")
    p.add_argument("--e2e-image-size", type=int, default=64)
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--e2e-epochs", type=int, default=4)
    p.add_argument("--e2e-runs", type=int, default=2,
                   help="lora-train runs, interleaved with pure-step blocks")
    p.add_argument("--e2e-root", default=None,
                   help="synthetic data folder (default: a folder under the temp dir)")
    p.add_argument("--e2e-overrides", nargs="*", default=[], help="more lora-train overrides (e2e runs)")
    p.add_argument("--quick", action="store_true",
                   help=f"3 rounds of 1 step, 1 warm-up step, without {' and '.join(QUICK_SKIPS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = min(args.rounds, 3), 1, min(args.warmup, 1)
    if args.clock == "cpu" and (args.threads != 1 or args.device not in ("cpu", "auto")):
        p.error("--clock cpu measures one thread's CPU time: it needs --threads 1 on the CPU")
    return args


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def machine_info(device: torch.device) -> dict:
    flags = cpu_flags()
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": cpu_supports_bf16(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "peft": _peft_version(), "platform": platform.platform(),
            "device": str(device), "load_average": _load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _peft_version() -> str | None:
    """PEFT's installed version, read from its metadata (importing peft pulls in transformers: seconds)."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- variants --------------------------------------------------------------------------------------------

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
    """The engine's training step (Trainer.train_epoch) on a fixed batch, the input conversion included."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)

    def run() -> None:
        xb = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with autocast(device, precision):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return run


def eval_step(model: nn.Module, x: torch.Tensor, device: torch.device, precision,
              channels_last: bool) -> Callable[[], None]:
    """The engine's evaluation step (engine.evaluate): inference_mode, autocast, one forward."""

    def run() -> None:
        with torch.inference_mode():
            xb = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with autocast(device, precision):
                model(xb).float()

    return run


def peft_model(base: nn.Module, targets: list[str], rank: int, alpha: float, head: str) -> nn.Module:
    """PEFT LoRA on exactly the layers lora-cls adapts, the new head trained in full (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=[head])
    return get_peft_model(base, config)


def randomize_adapters(model: nn.Module, seed: int) -> None:
    """Non-zero B (a non-trivial merged weight) for the evaluation variants; speed does not depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 1e-3)


def build_variants(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                   xe: torch.Tensor, fast: Precision | None = None) -> list[Variant]:
    spec = model_spec(args.model)
    rank = spec.rank if args.rank is None else args.rank
    alpha = float(rank) if args.alpha is None else args.alpha
    fast = fast or resolve_precision(args.precision, device)
    fp32 = resolve_precision("32", device)
    torch.manual_seed(args.seed)
    base = build_model(args.model, args.weights, args.classes)
    patterns = list(args.targets) if args.targets else list(spec.targets)
    targets = select_targets(base, patterns, exclude=[spec.head])

    wanted = set(args.variants) if args.variants else None

    def want(name: str) -> bool:
        if wanted is not None:
            return name in wanted
        if name == "lora_compiled":
            return args.compile
        return not (args.quick and name in QUICK_SKIPS)

    def finetuned(finetune: str) -> nn.Module:
        model = copy.deepcopy(base)
        prepare_finetune(model, args.model, finetune, targets=patterns, rank=rank, alpha=alpha)
        return model

    def placed(model: nn.Module, channels_last: bool) -> nn.Module:
        return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    def trained(v: Variant, model: nn.Module, precision) -> Variant:
        v.model = placed(model, v.channels_last)
        v.optimizer = build_optimizer(v.model.parameters(), "adamw", 1e-4, 0.01, device=device)
        v.step = train_step(v.model, v.optimizer, x, y, device, precision, v.channels_last)
        return v

    def evaluated(v: Variant, model: nn.Module) -> Variant:
        v.model = placed(model, v.channels_last).eval()
        v.step = eval_step(v.model, xe, device, fast, v.channels_last)
        return v

    variants: list[Variant] = []

    def add(name: str, make: Callable[[Variant], Variant], **kw) -> None:
        if want(name):
            variants.append(make(Variant(name=name, **kw)))

    fp32_kw = {"precision": fp32.name, "channels_last": False}
    fast_kw = {"precision": fast.name, "channels_last": True}
    add("full_fp32", lambda v: trained(v, finetuned("full"), fp32), kind="train", label="full fine-tune",
        impl="torchvision", finetune="full", **fp32_kw)
    add("full_fast", lambda v: trained(v, finetuned("full"), fast), kind="train", label="full fine-tune",
        impl="torchvision", finetune="full", **fast_kw)
    add("head_fp32", lambda v: trained(v, finetuned("linear"), fp32), kind="train", label="head only (floor)",
        impl="torchvision", finetune="linear", **fp32_kw)
    add("head_fast", lambda v: trained(v, finetuned("linear"), fast), kind="train", label="head only (floor)",
        impl="torchvision", finetune="linear", **fast_kw)
    add("lora_fp32", lambda v: trained(v, finetuned("lora"), fp32), kind="train", label="lora-cls LoRA",
        impl="lora-cls", finetune="lora", **fp32_kw)
    add("lora_fp32_cl", lambda v: trained(v, finetuned("lora"), fp32), kind="train",
        label="lora-cls LoRA, default path without bf16", impl="lora-cls", finetune="lora",
        precision=fp32.name, channels_last=True)
    add("lora_fast", lambda v: trained(v, finetuned("lora"), fast), kind="train",
        label="lora-cls LoRA, default path", impl="lora-cls", finetune="lora", **fast_kw)

    def compiled(v: Variant) -> Variant:
        trained(v, finetuned("lora"), fast)
        v.step = train_step(torch.compile(v.model), v.optimizer, x, y, device, fast, True)
        return v

    add("lora_compiled", compiled, kind="train", label="lora-cls LoRA, default path + torch.compile",
        impl="lora-cls", finetune="lora", **fast_kw)

    peft_error = None if _peft_version() else PEFT_MISSING
    if args.no_peft:
        peft_error = "skipped (--no-peft)"

    def with_peft(v: Variant, precision) -> Variant:
        if peft_error:
            v.note = peft_error
            return v
        model = peft_model(copy.deepcopy(base), targets, rank, alpha, spec.head)
        return trained(v, model, precision)

    add("peft_fp32", lambda v: with_peft(v, fp32), kind="train", label="PEFT LoRA", impl="peft",
        finetune="lora", **fp32_kw)
    add("peft_fast", lambda v: with_peft(v, fast), kind="train", label="PEFT LoRA", impl="peft",
        finetune="lora", **fast_kw)

    def adapted_for_eval(merge: bool) -> nn.Module:
        model = finetuned("lora")
        randomize_adapters(model, args.seed)
        set_merge_on_eval(model, merge)
        return model

    add("eval_base", lambda v: evaluated(v, copy.deepcopy(base)), kind="eval", label="eval: base model",
        impl="torchvision", finetune="none", **fast_kw)
    add("eval_unmerged", lambda v: evaluated(v, adapted_for_eval(False)), kind="eval",
        label="eval: adapters unmerged", impl="lora-cls", finetune="lora", **fast_kw)
    add("eval_merged", lambda v: evaluated(v, adapted_for_eval(True)), kind="eval",
        label="eval: adapters merged (default)", impl="lora-cls", finetune="lora", **fast_kw)
    add("eval_exported", lambda v: evaluated(v, merge_lora(adapted_for_eval(True))), kind="eval",
        label="eval: merge_lora export", impl="lora-cls", finetune="lora", **fast_kw)
    unknown = sorted((wanted or set()) - {v.name for v in variants})
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return variants


# -- measurement -----------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(variants: list[Variant], steps: int, device: torch.device) -> None:
    for v in variants:
        if not v.available:
            continue
        for i in range(max(1, steps)):
            start = time.perf_counter()
            v.step()
            synchronize(device)
            if i == 0:
                v.first_step_seconds = time.perf_counter() - start


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc; None without /proc."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]  # utime, stime
        return sum(values) - values[3] - values[4], int(own[0]) + int(own[1])  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return None


class ForeignLoad:
    """CPU time used by other processes while measuring, in cores (0.0 = the machine was ours alone)."""

    def __init__(self) -> None:
        self.start = cpu_jiffies()
        self.t0 = time.perf_counter()

    def cores(self) -> float | None:
        end = cpu_jiffies()
        seconds = time.perf_counter() - self.t0
        if self.start is None or end is None or seconds <= 0:
            return None
        busy, own = end[0] - self.start[0], end[1] - self.start[1]
        return max(0.0, (busy - own) / os.sysconf("SC_CLK_TCK") / seconds)


def wait_for_idle(max_seconds: float, threshold: float = 0.15) -> float:
    """Sleep until other processes use under `threshold` cores over one second; return the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_seconds:
        probe = ForeignLoad()
        time.sleep(1.0)
        load = probe.cores()
        if load is None or load < threshold:
            break
    return time.perf_counter() - start


def time_round_robin(variants: list[Variant], rounds: int, steps: int, device: torch.device,
                     progress: Callable[[str], None] | None = None, clock: str = "wall",
                     wait_idle: float = 0.0, loads: list | None = None, max_load: float = 0.1) -> int:
    """Append one seconds-per-step sample per round to each variant; round r starts at variant r mod n.

    With `wait_idle` > 0 (a shared machine), each round first waits (at most that many seconds) for other
    processes to go quiet, and a round during which they used more than `max_load` cores is discarded and
    run again (at most `rounds` times in all). The other processes' load of each kept round is appended to
    `loads`. Returns the number of discarded rounds.
    """
    now = CLOCKS[clock]
    active = [v for v in variants if v.available]
    kept = discarded = 0
    while kept < rounds and active:
        if wait_idle > 0:
            wait_for_idle(wait_idle)
        probe = ForeignLoad()
        shift = (kept + discarded) % len(active)
        for v in active[shift:] + active[:shift]:
            synchronize(device)
            start = now()
            for _ in range(steps):
                v.step()
            synchronize(device)
            v.samples.append((now() - start) / steps)
        load = probe.cores()
        busy = wait_idle > 0 and load is not None and load > max_load and discarded < rounds
        if busy:
            discarded += 1
            for v in active:
                v.samples.pop()
        else:
            kept += 1
            if loads is not None:
                loads.append(load)
        if progress:
            what = f"round {kept}/{rounds}" if not busy else f"round discarded ({discarded} so far)"
            progress(what + ("" if load is None else f", other processes used {load:.2f} cores"))
    return discarded


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _cache_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors a LoRALayer keeps between steps (its merged-weight cache for evaluation and similar caches)."""
    out = []
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for value in vars(module).values():
                if isinstance(value, tuple):
                    out += [t for t in value if isinstance(t, torch.Tensor)]
    return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    params = _storages(model.parameters())
    buffers = _storages(model.buffers())
    grads = _storages(p.grad for p in model.parameters() if p.grad is not None)
    opt = {}
    if optimizer is not None:
        opt = _storages(t for s in optimizer.state.values() for t in s.values())
    caches = {k: v for k, v in _storages(_cache_tensors(model)).items() if k not in params}
    return {"params": sum(params.values()), "buffers": sum(buffers.values()), "grads": sum(grads.values()),
            "optimizer_state": sum(opt.values()), "caches": sum(caches.values())}


def saved_activations(v: Variant) -> tuple[int, list[int] | None]:
    """Bytes autograd keeps for backward during one step (unique storages, parameters excluded), and the
    largest spatial size (H, W) among the saved 4-D tensors: where backward starts to keep activations."""
    params = set(_storages(v.model.parameters()))
    saved: dict[int, int] = {}
    largest: list[int] | None = None

    def pack(t: torch.Tensor):
        nonlocal largest
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
            if t.dim() == 4 and (largest is None or t.shape[2] * t.shape[3] > largest[0] * largest[1]):
                largest = [int(t.shape[2]), int(t.shape[3])]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v.step()
    return sum(saved.values()), largest


def measure_memory(v: Variant, device: torch.device) -> dict:
    """Resident state of the variant, bytes saved for backward and, on CUDA, the allocator's peak of one step.

    peak_bytes is measured on CUDA (resident state + the step's peak above it); on CPU, where torch keeps no
    allocator statistics, it is the estimate resident state + saved activations (transient buffers excluded).
    """
    out: dict = {}
    if v.kind == "train":
        out["saved_activations"], out["saved_largest_hw"] = saved_activations(v)
    synchronize(device)
    state = state_bytes(v.model, v.optimizer)
    out.update(state)
    resident = sum(state.values())
    out["resident"] = resident
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        v.step()
        synchronize(device)
        out["peak_bytes"] = resident + torch.cuda.max_memory_allocated(device) - before
        out["peak_measured"] = True
    else:
        out["peak_bytes"] = resident + out.get("saved_activations", 0)
        out["peak_measured"] = False
    return out


# -- summary ---------------------------------------------------------------------------------------------

def summarize(v: Variant, batch: int) -> dict:
    row = {"kind": v.kind, "label": v.label, "impl": v.impl, "finetune": v.finetune, "precision": v.precision,
           "channels_last": v.channels_last, "available": v.available, "note": v.note or None}
    if v.model is not None:
        total, trainable = count_params(v.model)
        row.update({"params_total": total, "params_trainable": trainable})
    if v.samples:
        med = statistics.median(v.samples)
        row.update({"step_seconds": med, "step_seconds_min": min(v.samples),
                    "step_seconds_max": max(v.samples),
                    "spread": (max(v.samples) - min(v.samples)) / med if med else None,
                    "images_per_second": batch / med, "step_seconds_samples": v.samples,
                    "first_step_seconds": v.first_step_seconds, "memory": v.memory})
    return row


def compute_ratios(rows: dict[str, dict]) -> tuple[dict, dict, dict]:
    """(ratios of medians, medians of per-round paired ratios, target checks), keyed as RATIOS."""
    ratios, paired, checks = {}, {}, {}
    for key, num, den, what, op, target in RATIOS:
        a, b = rows.get(num, {}), rows.get(den, {})
        if "step_seconds" not in a or "step_seconds" not in b:
            if num in rows and den in rows:
                ratios[key] = paired[key] = None
            continue
        if what == "step_time":
            ratios[key] = a["step_seconds"] / b["step_seconds"]
            pairs = [sa / sb for sa, sb in zip(a["step_seconds_samples"], b["step_seconds_samples"])]
        else:
            ratios[key] = b["step_seconds"] / a["step_seconds"]  # throughput = batch / step time
            pairs = [sb / sa for sa, sb in zip(a["step_seconds_samples"], b["step_seconds_samples"])]
        paired[key] = statistics.median(pairs) if pairs else None
        if target is not None:
            ok = ratios[key] >= target if op == ">=" else ratios[key] <= target
            checks[key] = {"value": ratios[key], "target": f"{op} {target}", "pass": bool(ok)}
    return ratios, paired, checks


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def format_table(rows: dict[str, dict], ratios: dict, reference: str = "peft_fp32") -> str:
    ref = rows.get(reference, {}).get("images_per_second")
    base_eval = rows.get("eval_base", {}).get("images_per_second")
    header = ("variant", "what", "trainable", "prec", "format", "ms/step", "spread", "img/s", "ratio",
              "peak MiB", "saved MiB")
    lines = []
    for name, r in rows.items():
        fmt = "CL" if r["channels_last"] else "NCHW"
        trainable = f"{r['params_trainable']:,}" if r["kind"] == "train" and "params_trainable" in r else "–"
        if "step_seconds" not in r:
            lines.append((name, r["label"], trainable, r["precision"], fmt, *["–"] * 5, r["note"] or "–"))
            continue
        denom = base_eval if r["kind"] == "eval" else ref
        ratio = f"{r['images_per_second'] / denom:.2f}x" if denom else "–"
        memory = r["memory"]
        lines.append((name, r["label"], trainable, r["precision"], fmt, f"{1000 * r['step_seconds']:.1f}",
                      f"{100 * r['spread']:.0f}%", f"{r['images_per_second']:.1f}", ratio,
                      _mib(memory.get("peak_bytes")), _mib(memory.get("saved_activations"))))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths)))
           for row in [header, *lines]]
    out.insert(1, "-" * len(out[0]))
    out.append("")
    out.append(f"ratio column: training rows against {reference}, evaluation rows against eval_base; "
               "peak MiB: measured on CUDA, estimated on CPU (resident state + saved activations)")
    for key, value in ratios.items():
        out.append(f"  {key:40s} {'–' if value is None else f'{value:.3f}'}")
    return "\n".join(out)


# -- end to end ------------------------------------------------------------------------------------------

def run_e2e(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    """lora-train epochs (pipeline.train, the same code as the CLI) on the synthetic set, interleaved with
    blocks of the pure model step at the same resolution and batch; compares metrics.json's
    timing.train_images_per_second with the pure step's throughput."""
    from hydra import compose, initialize_config_module

    from lora_cls.config import register_configs
    from lora_cls.pipeline import train

    size, batch = args.e2e_image_size, args.e2e_batch
    root = Path(args.e2e_root or Path(tempfile.gettempdir()) / "lora-cls-bench" / "synthetic")
    overrides = ["experiment=demo", f"model={args.model}", f"dataset.root={root}",
                 f"dataset.image_size={size}", f"trainer.batch_size={batch}",
                 f"trainer.epochs={args.e2e_epochs}", "trainer.progress=false",
                 f"trainer.device={args.device}", f"trainer.precision={args.precision}",
                 f"trainer.seed={args.seed}"]
    if args.rank is not None:
        overrides.append(f"lora.rank={args.rank}")
    overrides += list(args.e2e_overrides)
    register_configs()
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)

    # The pure step with the run's settings: same model, adapters, precision, memory format and optimizer.
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    e2e_args = argparse.Namespace(**{**vars(args), "image_size": size, "batch": batch,
                                     "variants": ["lora_fast"], "quick": False, "compile": False})
    (pure,) = build_variants(e2e_args, device, x, y, x)
    op = cfg.optimizer
    pure.optimizer = build_optimizer(pure.model.parameters(), op.name, op.lr, op.weight_decay,
                                     tuple(op.betas), op.momentum, op.nesterov, device)
    precision = resolve_precision(cfg.trainer.precision, device)
    channels_last = bool(cfg.trainer.channels_last)
    pure.step = train_step(pure.model, pure.optimizer, x, y, device, precision, channels_last)
    warm_up([pure], args.warmup, device)

    runs, step_loads = [], []
    blocks = {"rounds": max(2, args.rounds // 2), "steps": max(2, args.steps)}
    with tempfile.TemporaryDirectory(prefix="lora-cls-bench-") as tmp:
        for i in range(args.e2e_runs):
            # wall clock whatever --clock says: metrics.json's timing is wall time
            time_round_robin([pure], blocks["rounds"], blocks["steps"], device, wait_idle=args.wait_idle,
                             loads=step_loads)
            run_dir = Path(tmp) / f"run{i}"
            if args.wait_idle > 0:
                wait_for_idle(args.wait_idle)
            probe = ForeignLoad()
            metrics = train(cfg, run_dir)
            history = list(csv.DictReader((run_dir / "history.csv").open()))
            per_epoch = [float(h["images_per_second"]) for h in history]
            runs.append({"train_images_per_second": metrics["timing"]["train_images_per_second"],
                         "train_seconds": metrics["timing"]["train_seconds"], "epochs": len(history),
                         "epoch_images_per_second": per_epoch, "precision": metrics.get("precision"),
                         "test_accuracy": metrics["test"]["accuracy"], "foreign_load_cores": probe.cores()})
            log(f"e2e run {i + 1}/{args.e2e_runs}: {runs[-1]['train_images_per_second']:.1f} img/s")
        time_round_robin([pure], blocks["rounds"], blocks["steps"], device, wait_idle=args.wait_idle,
                         loads=step_loads)
    step = statistics.median(pure.samples)
    e2e = statistics.median(r["train_images_per_second"] for r in runs)
    later = [v for r in runs for v in r["epoch_images_per_second"][1:]]
    out = {"image_size": size, "batch": batch, "epochs": args.e2e_epochs, "data_root": str(root),
           "overrides": overrides, "runs": runs, "step_seconds_samples": pure.samples,
           "step_round_foreign_load_cores": step_loads,
           "pure_step_images_per_second": batch / step, "train_images_per_second": e2e,
           "e2e_vs_step": e2e / (batch / step)}
    if later:
        out["steady_epochs_images_per_second"] = statistics.median(later)
        out["steady_e2e_vs_step"] = statistics.median(later) / (batch / step)
    return out


# -- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("error: --clock cpu is for CPU runs")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline does on CUDA
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    eval_batch = args.eval_batch or args.batch
    xe = x if eval_batch == args.batch else torch.randn(eval_batch, 3, args.image_size, args.image_size,
                                                        generator=g).to(device)

    fast = resolve_precision(args.precision, device)  # once: it warns where bf16 is only emulated
    variants = build_variants(args, device, x, y, xe, fast)
    log(f"{len(variants)} variants on {device}: {', '.join(v.name for v in variants)}")
    compile_seconds = None
    warm_up(variants, args.warmup, device)
    for v in variants:
        if v.name == "lora_compiled" and v.first_step_seconds is not None:
            compile_seconds = v.first_step_seconds
    log("warmed up")
    for v in variants:
        if v.available:
            v.memory = measure_memory(v, device)
    log("memory measured")
    loads: list = []
    discarded = time_round_robin(variants, args.rounds, args.steps, device, progress=log, clock=args.clock,
                                 wait_idle=args.wait_idle, loads=loads)

    rows = {}
    for v in variants:
        batch = eval_batch if v.kind == "eval" else args.batch
        rows[v.name] = summarize(v, batch)
    ratios, paired, checks = compute_ratios(rows)
    spec = model_spec(args.model)
    result = {
        "command": [sys.executable, *sys.argv] if argv is None else ["scripts/bench.py", *argv],
        "settings": {"model": args.model, "weights": args.weights, "rank": args.rank or spec.rank,
                     "alpha": args.alpha or float(args.rank or spec.rank),
                     "targets": args.targets or list(spec.targets), "classes": args.classes,
                     "batch": args.batch, "eval_batch": eval_batch, "image_size": args.image_size,
                     "device": str(device), "fast_precision": fast.name,
                     "threads": args.threads, "clock": args.clock, "rounds": args.rounds,
                     "steps_per_round": args.steps, "warmup": args.warmup, "quick": args.quick,
                     "optimizer": "AdamW (lora_cls.engine.build_optimizer)"},
        "machine": machine_info(device),
        "variants": rows,
        "ratios": ratios,
        "ratios_paired": paired,
        "round_foreign_load_cores": loads,
        "discarded_rounds": discarded,
        "checks": checks,
    }
    if compile_seconds is not None:
        result["compile"] = {"first_step_seconds": compile_seconds}
    if args.e2e:
        log("end to end: lora-train on the synthetic set")
        result["e2e"] = run_e2e(args, device, log)
        value = result["e2e"]["e2e_vs_step"]
        checks["e2e_vs_step"] = {"value": value, "target": f">= {E2E_TARGET}", "pass": value >= E2E_TARGET}
    result["elapsed_seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = _load_average()

    print(format_table(rows, ratios))
    if "e2e" in result:
        e = result["e2e"]
        print(f"  {'e2e_vs_step':40s} {e['e2e_vs_step']:.3f}  (lora-train {e['train_images_per_second']:.1f} "
              f"img/s vs pure step {e['pure_step_images_per_second']:.1f} img/s at {e['image_size']} px, "
              f"batch {e['batch']})")
    for key, c in checks.items():
        print(f"  target {key}: {c['value']:.3f} {c['target']}: {'pass' if c['pass'] else 'MISS'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
