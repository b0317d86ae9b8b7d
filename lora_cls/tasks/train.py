"""`train(cfg, run_dir)`: build → fit → final evaluation, writing the run folder (docs/DESIGN.md §6).

A plain function (no Hydra), callable from tests; lora-train's entry point calls it once per job.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from torch import nn

from lora_cls.conf.checks import validate
from lora_cls.conf.load import to_container
from lora_cls.data.splits import DatasetSplits, write_splits_json
from lora_cls.engine import distributed
from lora_cls.engine.evaluation import evaluate_split
from lora_cls.engine.timing import Stopwatch, describe, startup_seconds
from lora_cls.engine.trainer import Trainer
from lora_cls.files import write_json
from lora_cls.metrics.calibration import fit_temperature
from lora_cls.models.finetune import parameter_report
from lora_cls.runs import checkpoint as ckpt
from lora_cls.runs import reports
from lora_cls.runs.console import print_metrics, print_parameter_report
from lora_cls.runs.folder import RunDir, run_metrics
from lora_cls.runs.plots import plot_curves
from lora_cls.runs.resume import prepare_run_dir, restore, resume_state
from lora_cls.runs.tracking import Loggers
from lora_cls.tasks import build
from lora_cls.tasks.peft import with_init_from

log = logging.getLogger(__name__)
console = Console(stderr=True)


CURVES_EVERY_SECONDS = 30.0


class RunRecorder:
    """The Trainer's epoch callback: what the run folder keeps after each epoch (only the first process writes).

    The best epoch's adapter when it improved; last.pt and history.csv every epoch. The curves PNG takes ~0.3 s to
    draw (as long as a whole epoch of a small set on a GPU), so it is drawn after the first epoch, then at most
    every CURVES_EVERY_SECONDS, and after the last epoch (`finish`).
    """

    def __init__(self, cfg: DictConfig, run: RunDir, model: nn.Module, metadata: dict, writes: bool) -> None:
        self.cfg, self.run, self.model, self.metadata, self.writes = cfg, run, model, metadata, writes
        self.loggers = Loggers(cfg.get("logger"), run.path, metadata["config"], writes)  # logger=tensorboard/mlflow
        self._curves_drawn: tuple[float, int] = (-math.inf, -1)  # (when, after which epoch)

    def save_adapter(self, trainer: Trainer, **extra) -> None:
        state = trainer.state
        ckpt.save_adapter(self.run.adapter, state.best_state, {**self.metadata, "best_epoch": state.best_epoch,
                                                                **extra})

    def save_last(self, trainer: Trainer) -> None:
        ckpt.save_last(self.run.last, resume_state(self.cfg, self.model, trainer))

    def on_epoch_end(self, trainer: Trainer, row: dict, improved: bool) -> None:
        if not self.writes:
            return
        if improved:
            self.save_adapter(trainer, d=row["d"])
        self.save_last(trainer)
        reports.write_history(self.run.history, trainer.state.history)
        self.draw_curves(trainer, last=False)
        self.loggers.epoch(row)

    def draw_curves(self, trainer: Trainer, last: bool) -> None:
        when, epoch = self._curves_drawn
        now = time.monotonic()
        if not self.writes or epoch == trainer.state.epoch or (not last and now - when < CURVES_EVERY_SECONDS):
            return
        plot_curves(trainer.state.history, self.run.curves, trainer.state.best_epoch)
        self._curves_drawn = (now, trainer.state.epoch)


def final_metrics(cfg: DictConfig, run: RunDir, trainer: Trainer, loaders: dict, splits: DatasetSplits,
                  params: dict, adapted_layers: int, recorder: RunRecorder) -> dict:
    """metrics.json: the best epoch's weights (at the d they were validated at) evaluated on val and test, with
    the reports of both splits written and the temperature fitted on val saved with the adapter (by the first
    process only)."""
    state, runtime, schedule = trainer.state, trainer.settings.runtime, trainer.settings.schedule
    if schedule.kind != "none" and state.best_d > schedule.d_min:
        log.warning("the best epoch (%d, by %s) ran at d=%.3g, before d reached d_min=%g: the adapter saved and "
                    "evaluated still leans on the frozen weight", state.best_epoch, trainer.settings.monitor,
                    state.best_d, schedule.d_min)
    ckpt.apply_adapter(trainer.base_model, state.best_state, "best-epoch state")
    title = f"{cfg.model.name} {cfg.finetune} on {cfg.dataset.name}"
    outs = {split: evaluate_split(trainer.base_model, loaders[split].dataset, trainer.preprocess, runtime,
                                  trainer.settings.eval_batch_size, split, len(splits.classes))
            for split in ("val", "test")}
    # Temperature scaling (docs/evaluation.md): one scalar fitted on the validation split's logits, kept with the
    # adapter; lora-eval, lora-predict and the API apply it with calibrate=true.
    temperature = fit_temperature(outs["val"].logits, outs["val"].y_true)
    results = {split: reports.split_results(out, splits.classes, splits.positive_class,
                                            run.reports(split) if runtime.dist.is_main else None,
                                            f"{title} — {split}", temperature,
                                            [p for p, _ in loaders[split].dataset.samples])
               for split, out in outs.items()}
    if recorder.writes:
        recorder.save_adapter(trainer, d=state.best_d, temperature=temperature)
    return {**run_metrics(cfg), "params": {k: params[k] for k in ("total", "trainable", "trainable_pct")},
            "best_epoch": state.best_epoch, "d": state.best_d, "epochs_run": state.epoch, "temperature": temperature,
            "stopped_early": state.stopped_early,
            "val": results["val"], "test": results["test"],
            "timing": {"train_seconds": round(state.train_seconds, 3),
                       "train_images_per_second": round(state.train_images / max(state.train_seconds, 1e-9), 3)},
            "class_weights": (dict(zip(splits.classes, trainer.settings.class_weight))
                              if trainer.settings.class_weight is not None else None),
            "device": str(runtime.device), "precision": runtime.precision.name, "adapted_layers": adapted_layers,
            "processes": runtime.dist.world_size, "skipped_images": splits.skipped}


def _data_cache_note(loaders: dict) -> str:
    datasets = [loader.dataset for loader in loaders.values()]
    if not datasets[0].cached:
        return "decoded every epoch (dataset.cache.enabled=false)"
    mib = sum(len(d) for d in datasets) * 3 * datasets[0].image_size ** 2 / 2**20
    size = f"{mib:.1f} MiB" if mib < 10 else f"{mib:.0f} MiB"
    hits = sum(bool(d.cache_hit) for d in datasets)
    state = "from the decoded-image cache (hit)" if hits == len(datasets) else \
        "decoded once into the decoded-image cache (miss)" if hits == 0 else \
        f"from the decoded-image cache (hit for {hits} of {len(datasets)} splits, the others decoded)"
    kept = [d.cache_path.parent for d in datasets if d.cache_path is not None]
    where = f"in {kept[0]}" if kept else "in a temporary file (larger than dataset.cache.max_gb)"
    return f"{state} {where}, memory-mapped ({size})"


def _log_data(cfg: DictConfig, splits: DatasetSplits, loaders: dict, runtime) -> None:
    log.info("data: %s at %s, classes %s, train/val/test = %d/%d/%d", cfg.dataset.name, splits.root,
             splits.classes, len(splits.train), len(splits.val), len(splits.test))
    log.info("run: %s; images %s", runtime.describe(), _data_cache_note(loaders))
    log.info("images per class: %s", "; ".join(f"{split} " + ", ".join(f"{c} {n}" for c, n in counts.items())
                                                for split, counts in splits.class_counts().items()))


def _start_or_resume(cfg: DictConfig, resume: tuple | None, trainer: Trainer, recorder: RunRecorder) -> None:
    """A new run writes its first last.pt; a resumed one restores model, optimizer, schedules and state."""
    if resume is None:
        if recorder.writes:
            recorder.save_last(trainer)
        return
    resume_from, state = resume
    restore(state, recorder.model, trainer)
    log.info("resuming from %s: %d of %d epochs done (global step %d)", resume_from, trainer.state.epoch,
             cfg.trainer.epochs, trainer.state.global_step)
    if resume_from != recorder.run.last and recorder.writes:  # from another folder's run: carry its best adapter
        recorder.save_adapter(trainer)


def _prepare_run_dir(cfg: DictConfig, run: RunDir, info: distributed.DistInfo) -> tuple | None:
    """The main process checks the run folder and clears what a killed run left half-written; under torchrun the
    others then read the same resume state, all before the main process writes anything there (a process that
    cleared the folder later would delete the temp file of a write in progress)."""
    if not info.enabled:
        return prepare_run_dir(cfg, run.path)
    resume = prepare_run_dir(cfg, run.path) if info.is_main else None
    distributed.barrier(info)
    if not info.is_main:
        resume = prepare_run_dir(cfg, run.path, clean=False)
    distributed.barrier(info)
    return resume


def run_timing(watch: Stopwatch, trainer: Trainer, trained_before: float) -> dict:
    """metrics.json `timing`: the wall-time breakdown of this process's part of the run, and `data_seconds`
    (from the start of the run to its first training step: reading and decoding the data, building the model)."""
    watch.add("train", trainer.state.train_seconds - trained_before)
    timing = watch.breakdown(wall=watch.since_start() + watch.seconds["startup"])
    if trainer.first_step_started is not None:
        timing["data_seconds"] = round(trainer.first_step_started - watch.started, 3)
    return timing


def train(cfg: DictConfig, run_dir: str | Path, splits: DatasetSplits | None = None) -> dict:
    """Train per `cfg` (on `splits` when given: a cross-validation fold), write the run folder, and return
    metrics.json's content."""
    watch = Stopwatch()
    watch.add("startup", startup_seconds())
    run = RunDir(run_dir)
    cfg = with_init_from(cfg)  # lora.init_from: the PEFT folder's adapters decide lora.*
    validate(cfg)
    info = distributed.init_distributed()
    resume = _prepare_run_dir(cfg, run, info)
    runtime = build.train_runtime(cfg, info)
    watch.device = runtime.device
    prep = build.preprocessing(cfg)
    with watch.phase("data_load"):
        splits, loaders = build.load_data(cfg, runtime, prep, splits)
    if info.is_main:
        write_splits_json(splits, run.splits)
    _log_data(cfg, splits, loaders, runtime)
    log.info("preprocessing: %s", prep.describe())

    with watch.phase("model_build"):
        model, adapted, identity = build.build_classifier(cfg, len(splits.classes))
    params = parameter_report(model)
    if runtime.progress:
        print_parameter_report(params, f"{cfg.model.name} · finetune={cfg.finetune}", console=console)
    log.info("params: total %d, trainable %d (%.4f%%), %d adapted layers", params["total"], params["trainable"],
             params["trainable_pct"], len(adapted))
    with watch.phase("model_build"):
        trainer = build.build_trainer(cfg, model, runtime, loaders, splits, timing=watch, prep=prep)
    metadata = {"config": to_container(cfg), "classes": splits.classes, "positive_class": splits.positive_class,
                "base_weights": identity, "eval_batch_size": build.eval_batch_size(cfg),
                "preprocessing": prep.to_json(),
                "precision": runtime.precision.name}
    recorder = RunRecorder(cfg, run, model, metadata, writes=info.is_main)
    _start_or_resume(cfg, resume, trainer, recorder)

    trained_before = trainer.state.train_seconds
    try:
        trainer.fit(recorder)
        with watch.phase("writing"):
            recorder.draw_curves(trainer, last=True)
        with watch.phase("final_eval"):
            metrics = final_metrics(cfg, run, trainer, loaders, splits, params, len(adapted), recorder)
    except BaseException:
        recorder.loggers.fail()  # an MLflow run ends FAILED instead of staying RUNNING
        raise
    metrics["timing"] = run_timing(watch, trainer, trained_before) | metrics["timing"]
    log.info("time: %s", describe(metrics["timing"]))
    if not info.is_main:
        return metrics
    write_json(run.metrics, metrics)
    recorder.loggers.finish(metrics)
    if runtime.progress:
        print_metrics(metrics["test"], f"test ({len(splits.test)} images, best epoch {metrics['best_epoch']})",
                              console=console)
    log.info("done: best epoch %d (d %.3g), val accuracy %.4f, test accuracy %.4f; run folder %s",
             metrics["best_epoch"], metrics["d"], metrics["val"]["accuracy"], metrics["test"]["accuracy"], run.path)
    return metrics
