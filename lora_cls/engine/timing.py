"""Where a run's wall time goes (metrics.json `timing`, docs/DESIGN.md §6): start-up, data, the first step
(compilation, cuDNN autotuning), training, validation with its BatchNorm recalibration, the final evaluation
and writing the run folder. Every phase is timed on the host, after the device has finished its work.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The phases in the order a run goes through them, with the words the end-of-run log line uses.
PHASES = {"startup": "start-up", "data_load": "data", "model_build": "model", "first_step": "first step",
          "train": "training", "validation": "validation", "bn_recalibration": "BN recalibration",
          "final_eval": "final evaluation", "writing": "writing"}
INSIDE = {"bn_recalibration": "validation"}  # timed within another phase: shown in its brackets, not summed
_first_run_in_process = True


def process_start() -> float:
    """When this process started (epoch seconds): from /proc on Linux, else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def startup_seconds() -> float:
    """Seconds from process start to now for the first run of a process; 0 for later ones (sweep jobs)."""
    global _first_run_in_process
    if not _first_run_in_process:
        return 0.0
    _first_run_in_process = False
    return max(0.0, time.time() - process_start())


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds per phase, summed over every time a phase runs."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def since_start(self) -> float:
        return time.perf_counter() - self.started

    def breakdown(self, wall: float) -> dict[str, float]:
        """{phase}_seconds for every phase that ran, `other_seconds` (the rest) and `wall_seconds`."""
        out = {f"{name}_seconds": round(self.seconds[name], 3) for name in PHASES if name in self.seconds}
        counted = sum(v for k, v in self.seconds.items() if k not in INSIDE)
        out["other_seconds"] = round(max(0.0, wall - counted), 3)
        out["wall_seconds"] = round(wall, 3)
        return out


def describe(timing: dict[str, float]) -> str:
    """One line: 'wall 38.5 s: start-up 3.1, data 8.0, ...' (the phases that took 0.05 s or more)."""
    def shown(name: str) -> bool:
        return timing.get(f"{name}_seconds", 0.0) >= 0.05

    parts = []
    for name, word in PHASES.items():
        if name in INSIDE or not shown(name):
            continue
        inner = [f"{PHASES[n]} {timing[f'{n}_seconds']:.1f}" for n, outer in INSIDE.items() if outer == name and shown(n)]
        parts.append(f"{word} {timing[f'{name}_seconds']:.1f}" + (f" ({', '.join(inner)})" if inner else ""))
    if timing.get("other_seconds", 0.0) >= 0.05:
        parts.append(f"other {timing['other_seconds']:.1f}")
    return f"wall {timing['wall_seconds']:.1f} s: " + ", ".join(parts)
