"""Continuing an interrupted run (docs/DESIGN.md §7): what last.pt holds, the checks before a resume, the restore.

last.pt is written at the end of every epoch; a killed run loses at most the epoch in progress. Everything that
can refuse a resume is checked by `prepare_run_dir` before anything is written, so a refused resume leaves the
interrupted run as it was.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from lora_cls.conf.load import flatten, is_neutral, stored_defaults, to_container
from lora_cls.engine.trainer import Trainer
from lora_cls.errors import UserError
from lora_cls.models.finetune import trainable_state
from lora_cls.runs import checkpoint as ckpt
from lora_cls.runs.folder import (
    CHECKPOINTS,
    LAST,
    RunDir,
    check_fresh_run_dir,
    read_metrics,
    remove_stale_temp_files,
)

log = logging.getLogger(__name__)

# A resume may change the neutral keys (conf.schema.is_neutral) and where the data is.
RESUME_FREE_KEYS = frozenset({"dataset.root"})


def resume_state(cfg: DictConfig, model: nn.Module, trainer: Trainer) -> dict[str, Any]:
    """last.pt: everything needed to continue (plain containers and tensors, readable with weights_only=True)."""
    s = trainer.state
    loader_rng = getattr(trainer.train_loader, "generator", None)
    return {"format": ckpt.FORMAT, "config": flatten(to_container(cfg)),
            "trainable": trainable_state(model, cfg.lora.bn), "best_state": dict(s.best_state),
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
            "lr_scheduler": trainer.lr_scheduler.state_dict(), "epoch": s.epoch, "global_step": s.global_step,
            "best_metric": s.best_metric, "best_epoch": s.best_epoch,
            "epochs_without_improvement": s.epochs_without_improvement, "train_seconds": s.train_seconds,
            "train_images": s.train_images, "history": s.history, "rng": ckpt.rng_state(),
            "loader_rng": loader_rng.get_state() if loader_rng is not None else None, "time": time.time(),
            "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
            # the augmentation's own random stream (data.augment.TrainAugment)
            "augment_rng": trainer.preprocess.rng_state() if hasattr(trainer.preprocess, "rng_state") else None}


def resume_source(resume: str, run_dir: Path) -> Path | None:
    """The last.pt to continue from: `auto` = the run folder's own, if it holds an unfinished run."""
    if resume.lower() in ("never", "none", "null", "false", "no"):
        return None
    if resume == "auto":
        run = RunDir(run_dir)
        if not run.last.is_file():
            return None
        if (metrics := read_metrics(run.metrics)) is not None:
            if metrics.get("status") == "ok":
                raise UserError(f"run folder {run_dir} holds a finished run (metrics.json status ok); nothing to "
                                "resume. Choose another hydra.run.dir for a new run")
        return run.last
    path = Path(resume).expanduser()
    if path.is_dir():
        path = RunDir(path).last
    if not path.is_file():
        raise UserError(f"trainer.resume={resume}: no {LAST} there; pass a run folder or its {CHECKPOINTS}/{LAST}")
    return path


def prepare_run_dir(cfg: DictConfig, run_dir: Path, clean: bool = True) -> tuple[Path, dict] | None:
    """A training run's folder is new, or holds an unfinished run to resume: then (its last.pt, the loaded state).

    lora-train calls this before Hydra writes .hydra/ into the folder, so a refused resume changes nothing.
    `clean`: remove the files a killed run left half-written (only the process that writes the folder may: another
    one would remove the temp file of a write in progress).
    """
    resume_from = resume_source(str(cfg.trainer.resume), Path(run_dir))
    if resume_from is None:
        check_fresh_run_dir(run_dir)
        if clean:
            _remove_half_written(run_dir)
        return None
    state = ckpt.load_last(resume_from)
    if not isinstance(state, dict) or state.get("format") != ckpt.FORMAT or not isinstance(state.get("config"), dict):
        raise UserError(f"{resume_from} is not a lora-cls last.pt")
    # A key the interrupted run's lora-cls did not have yet meant its schema default; a key the schema does not
    # know (a `+key=` override from before those were refused) was never read, so it cannot differ.
    defaults = stored_defaults()
    saved = {**defaults, **{k: v for k, v in state["config"].items() if k in defaults}}
    now = flatten(to_container(cfg))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE_KEYS and not is_neutral(k)
                     and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise UserError(f"cannot resume: the config differs from the interrupted run's ({detail}); resume with the "
                        "same overrides")
    if clean:
        _remove_half_written(run_dir)
    return resume_from, state


def _remove_half_written(run_dir: Path) -> None:
    for stale in remove_stale_temp_files(run_dir):  # a killed run's half-written files: never read, now gone
        log.info("removed %s, a file a killed run left half-written", stale)


def restore(state: dict, model: nn.Module, trainer: Trainer) -> None:
    """Put a last.pt (checked by prepare_run_dir) back into model, optimizer, schedulers, trainer state and RNGs."""
    ckpt.apply_adapter(model, state["trainable"], "resume state")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    s = trainer.state
    s.epoch, s.global_step = int(state["epoch"]), int(state["global_step"])
    s.best_metric, s.best_epoch = state["best_metric"], int(state["best_epoch"])
    s.best_state = dict(state["best_state"])
    s.epochs_without_improvement = int(state["epochs_without_improvement"])
    s.train_seconds, s.train_images = float(state["train_seconds"]), int(state["train_images"])
    s.history = list(state["history"])
    if trainer.ema is not None and state.get("ema") is not None:
        trainer.ema.load_state_dict(state["ema"])
    generator = getattr(trainer.train_loader, "generator", None)
    if state.get("loader_rng") is not None and generator is not None:
        generator.set_state(state["loader_rng"])
    if state.get("augment_rng") is not None and hasattr(trainer.preprocess, "set_rng_state"):
        trainer.preprocess.set_rng_state(state["augment_rng"])
    ckpt.set_rng_state(state["rng"])
