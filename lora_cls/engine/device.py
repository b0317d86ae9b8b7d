"""Where and how tensors run: the device, the mixed precision, channels_last, seeding, and the process group.

`Runtime` bundles what evaluation and training both need to place a batch and run a forward pass; lora-eval and
lora-predict build one without any training code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_cls.engine.distributed import DistInfo
from lora_cls.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """`key` is the config key the value came from (lora-eval and lora-predict call it `device`)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={spec} but no CUDA device is available; use {key}=cpu or auto")
    return torch.device(spec)


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX-512 BF16 / AMX), where bf16 autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    name: str  # "32" | "bf16" | "16"
    dtype: torch.dtype | None  # autocast dtype, None for float32
    use_scaler: bool  # fp16 needs loss scaling against gradient underflow; bf16 has float32's range
    reason: str = field(default="", compare=False)  # why this precision (logged at the start of a run)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    spec = str(spec)
    reason = "as set"
    if spec == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            spec, reason = ("bf16", "auto: the GPU has bf16") if bf16 else ("16", "auto: the GPU has no bf16")
        elif cpu_supports_bf16():
            spec, reason = "bf16", "auto: the CPU has native bf16 (AVX-512 BF16 or AMX)"
        else:
            spec, reason = "32", "auto: the CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 is emulated"
    if spec == "32":
        return Precision("32", None, False, reason)
    if spec == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("trainer.precision=bf16 but this GPU has no bf16; use trainer.precision=16 or 32")
        if device.type == "cpu" and not cpu_supports_bf16():
            # Valid (lora-eval reuses a bf16 run's precision to reproduce its metrics), but oneDNN has no fast
            # bf16 kernels here: on an AVX2-only CPU a ResNet34 LoRA training step took 26x, an evaluation
            # 9x as long as in fp32 (docs/BENCHMARKS.md).
            log.warning("precision bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX) is emulated: "
                        "about 10-30x slower than fp32 here; precision 32 (or auto) is faster on this machine")
        return Precision("bf16", torch.bfloat16, False, reason)
    if spec == "16":
        if device.type != "cuda":
            raise UserError("trainer.precision=16 (fp16 + GradScaler) needs a CUDA device; on CPU use bf16 or 32")
        return Precision("16", torch.float16, True, reason)
    raise UserError(f"trainer.precision must be auto, 32, bf16 or 16; got {spec!r}")


def autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def prepare_batch(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every RNG; with `deterministic`, also remove the run-to-run variation of the device's kernels.

    On CUDA that means PyTorch's deterministic mode (cuDNN autotuning and atomics vary between runs). On CPU
    the oneDNN kernels give bit-identical results for a fixed thread count (tests/test_train.py pins this),
    while torch.use_deterministic_algorithms would swap them for reference kernels about 50x slower
    (measured: 1.2 s against 0.025 s for a ResNet34 forward at 32 px), so only the thread count is fixed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
    elif deterministic:
        torch.set_num_threads(torch.get_num_threads())


@dataclass(frozen=True)
class Runtime:
    """Where a model runs and how a batch reaches it: device, precision, memory format, processes, progress bars."""

    device: torch.device
    precision: Precision
    channels_last: bool = True
    dist: DistInfo = field(default_factory=DistInfo)
    progress: bool = True

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A loader's batch on the device, in the model's memory format."""
        return prepare_batch(x, self.device, self.channels_last)

    def autocast(self):
        return autocast(self.device, self.precision)

    def describe(self) -> str:
        """One line for the log: where and how the run computes."""
        threads = f", {torch.get_num_threads()} CPU threads" if self.device.type == "cpu" else ""
        processes = f", {self.dist.world_size} processes" if self.dist.enabled else ""
        return (f"device {self.device}, precision {self.precision.name} ({self.precision.reason}), "
                f"channels_last {'on' if self.channels_last else 'off'}{threads}{processes}")

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` moved to the device in the memory format its batches come in."""
        return model.to(self.device, memory_format=torch.channels_last if self.channels_last
                        else torch.preserve_format)
