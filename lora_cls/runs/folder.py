"""The run folder (docs/DESIGN.md §6): its named files, the one atomic writer, and the fresh-folder guard.

Every file lora-cls writes goes through `atomic_open` (temp file in the same folder, fsync, `os.replace`, the
umask's normal permissions), so a killed process leaves either the previous version of a file or the new one,
never half of one. `RunDir` names the files of a run folder, so no path is spelt out twice. This module imports
neither torch nor matplotlib: the CLI's checks and the checkpoint code use it without the plotting stack.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cls.data.splits import SPLITS
from lora_cls.errors import UserError

METRICS = "metrics.json"
HISTORY = "history.csv"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter.safetensors"
LAST = "last.pt"
PREDICTIONS = "predictions.csv"
PREDICT_SUMMARY = "predict.json"
DATACHECK = "datacheck.json"
EXPORT_SUMMARY = "export.json"

# Files that mark a folder as holding results: training's, lora-predict's and lora-data check's.
RUN_MARKERS = (METRICS, HISTORY, f"{CHECKPOINTS}/{LAST}", f"{CHECKPOINTS}/{ADAPTER}", PREDICTIONS, PREDICT_SUMMARY,
               DATACHECK, EXPORT_SUMMARY)


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder by name (docs/DESIGN.md §6)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def splits(self) -> Path:
        return self.path / SPLITS

    @property
    def adapter(self) -> Path:
        return self.path / CHECKPOINTS / ADAPTER

    @property
    def last(self) -> Path:
        return self.path / CHECKPOINTS / LAST

    @property
    def curves(self) -> Path:
        return self.path / "plots" / "curves.png"

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def predict_summary(self) -> Path:
        return self.path / PREDICT_SUMMARY

    @property
    def datacheck(self) -> Path:
        return self.path / DATACHECK

    def reports(self, split: str) -> Path:
        """The folder of one split's classification report and confusion matrix."""
        return self.path / "reports" / split

    @classmethod
    def of_checkpoint(cls, adapter_path: str | os.PathLike) -> RunDir:
        """The run folder an adapter file was written into (`<run>/checkpoints/adapter.safetensors`)."""
        return cls(Path(adapter_path).parent.parent)


def run_metrics(cfg: Any) -> dict:
    """The head of every metrics.json: status and what was run (`cfg`: a training config)."""
    return {"status": "ok", "error": None, "finetune": cfg.finetune, "dataset": cfg.dataset.name,
            "model": cfg.model.name}


def failed_metrics(cfg: Any | None, error: str) -> dict:
    """metrics.json of a run that ended with an error (`cfg` None: before a training config existed)."""
    return {**(run_metrics(cfg) if cfg is not None else {}), "status": "failed", "error": error}


def check_fresh_run_dir(run_dir: str | os.PathLike) -> None:
    """Runs never write into a folder that already holds another run's results. (An empty checkpoints/ is no
    result: a run killed while writing its first last.pt leaves only that, and starts again there.)"""
    run_dir = Path(run_dir)
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if found:
        raise UserError(f"run folder {run_dir} already holds a run ({', '.join(found)}); choose another "
                        "hydra.run.dir (runs never overwrite each other)")


def remove_stale_temp_files(run_dir: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the hidden temp files (`.<name>.<8 hex>.tmp`) that a killed process left in a run folder; each
    stands beside the complete previous version of its file, or beside nothing. Returns what was removed."""
    removed = []
    for tmp in (Path(run_dir).rglob if recursive else Path(run_dir).glob)(".*.tmp"):
        if _TEMP_NAME.fullmatch(tmp.name) and tmp.is_file():
            with suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def check_writable(folder: str | os.PathLike, key: str = "hydra.run.dir") -> None:
    """A folder a command will create (or write into) can be written: its nearest existing ancestor is a
    writable folder on a writable filesystem. Checked before Hydra makes the folder."""
    path = Path(folder).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write the run folder {path}: {probe} is a file; choose another {key}")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows) or no answer: let the writes themselves tell
        read_only = False
    if read_only:
        raise UserError(f"cannot write the run folder {path}: read-only filesystem; choose a writable {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {path}: permission denied on {probe}; choose a "
                        f"writable {key}")


def read_metrics(path: str | os.PathLike) -> dict | None:
    """A metrics.json as a dict; None when it is missing, unreadable or not a JSON object."""
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None
