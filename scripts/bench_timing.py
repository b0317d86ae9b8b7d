"""scripts/bench.py's measuring machinery: warm-up and round-robin timing, probes of other processes' CPU
load, memory of one step (resident state, saved activations, CUDA peak) and the machine's description.

It times anything shaped like bench.Variant (the `Measured` protocol below) and knows nothing of the variants.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from torch import nn

from lora_cls.adapters.layer import LoRALayer
from lora_cls.engine.device import cpu_supports_bf16


class Measured(Protocol):
    """What the timing and memory functions read and fill in of a variant (bench.Variant)."""

    kind: str
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    step: Callable[[], None] | None
    samples: list[float]
    first_step_seconds: float | None

    @property
    def available(self) -> bool: ...


# -- machine ---------------------------------------------------------------------------------------------

def _cpuinfo(field: str) -> str | None:
    """What follows the colon on the first /proc/cpuinfo line starting with `field`; None if there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1]
    return None


def cpu_model() -> str:
    value = _cpuinfo("model name")
    return value.strip() if value is not None else (platform.processor() or platform.machine())


def cpu_flags() -> set[str]:
    value = _cpuinfo("flags")
    return set(value.split()) if value is not None else set()


def machine_info(device: torch.device) -> dict:
    flags = cpu_flags()
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": cpu_supports_bf16(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "peft": peft_version(), "platform": platform.platform(),
            "device": str(device), "load_average": load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def peft_version() -> str | None:
    """PEFT's installed version, read from its metadata (importing peft pulls in transformers: seconds)."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- other processes' load -------------------------------------------------------------------------------

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


def probe_when_idle(wait_idle: float) -> ForeignLoad:
    """With `wait_idle` > 0, first wait (at most that many seconds) for other processes to go quiet; then start
    measuring their load."""
    if wait_idle > 0:
        wait_for_idle(wait_idle)
    return ForeignLoad()


# -- timing ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(variants: list[Measured], steps: int, device: torch.device) -> None:
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


def time_round_robin(variants: list[Measured], rounds: int, steps: int, device: torch.device,
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
        probe = probe_when_idle(wait_idle)
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


# -- memory ----------------------------------------------------------------------------------------------

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


def saved_activations(v: Measured) -> tuple[int, list[int] | None]:
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


def measure_memory(v: Measured, device: torch.device) -> dict:
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
