"""Experiment loggers (the `logger=` group): TensorBoard and MLflow beside the run folder's own history.csv.

`logger=csv` (the default) is the run folder alone: history.csv, metrics.json and the reports are always
written. `logger=tensorboard` and `logger=mlflow` (one or both: `logger=[tensorboard,mlflow]`) also record the
resolved config, one point per epoch for every number of the history row, the final val/test metrics, the
confusion matrices and the curves. Only the process that writes the run folder logs (rank 0 under DDP), and
nothing leaves the machine unless `logger.mlflow.tracking_uri` names a server.

The schema dataclasses live here (config.py embeds them); tensorboard and mlflow are imported only when a run
uses them, so this module is cheap to import.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lora_cls.runs.folder import RunDir

log = logging.getLogger(__name__)

TRACKING_JSON = "tracking.json"  # in the run folder: where its MLflow run is (a resumed run continues it)


def history_scalars(row: dict) -> dict[str, float]:
    """One history.csv row as logger tags: train_loss -> train/loss, val_accuracy -> val/accuracy, lr -> lr."""
    out = {}
    for key, value in row.items():
        if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        prefix, _, rest = key.partition("_")
        out[f"{prefix}/{rest}" if prefix in ("train", "val") and rest else key] = float(value)
    return out


def final_scalars(metrics: dict) -> dict[str, float]:
    """metrics.json's headline numbers of both splits: final/val_accuracy, final/test_macro_f1, ..."""
    out = {}
    for split in ("val", "test"):
        for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
            value = (metrics.get(split) or {}).get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"final/{split}_{key}"] = float(value)
    out["final/best_epoch"] = float(metrics.get("best_epoch") or 0)
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """The resolved config as dotted keys with scalar values (lists and null as text), for hparams/params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def run_images(run_dir: Path) -> dict[str, Path]:
    """The figures a logger shows: {tag: PNG} for those the run folder holds."""
    run = RunDir(run_dir)
    found = {f"{split}/confusion_matrix": run.reports(split) / "confusion_matrix.png" for split in ("val", "test")}
    found["curves"] = run.curves
    return {tag: path for tag, path in found.items() if path.is_file()}


class TensorBoardLogger:
    """Event files under the run folder (`tensorboard --logdir <run or sweep folder>`); step = epoch."""

    def __init__(self, settings: Any, run_dir: Path, config: dict, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(settings.dir)
        self.dir = log_dir if log_dir.is_absolute() else run_dir / log_dir
        # A resumed run continues in the same folder; purge_step hides any point a killed process wrote for an
        # epoch after the one its last.pt holds, so no epoch appears twice.
        fresh = not any(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(self.dir), purge_step=None if fresh else first_epoch)
        self.config = config
        if fresh:
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def finish(self, metrics: dict, run_dir: Path) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = int(metrics.get("epochs_run") or 0)
        scalars = final_scalars(metrics)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, path in run_images(run_dir).items():
            self.writer.add_image(tag, _png_array(path), step, dataformats="HWC")
        # The HParams dashboard: the config against the final metrics, in this run's own event file (the
        # writer's add_hparams would start a second run folder).
        for summary in hparams(flat_params(self.config), scalars):
            self.writer.file_writer.add_summary(summary)
        self.close()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _png_array(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def default_mlflow_uri() -> str:
    """./mlruns as a local sqlite store (MLflow 3 refuses its plain-file store unless told to allow it)."""
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


class MLflowLogger:
    """One MLflow run per lora-train run, through MlflowClient (no global active run, so sweep jobs in one
    process cannot collide). A resumed run folder continues the MLflow run that tracking.json names."""

    def __init__(self, settings: Any, run_dir: Path, config: dict, first_epoch: int) -> None:
        from mlflow.tracking import MlflowClient

        uri = settings.tracking_uri or default_mlflow_uri()
        self.client = MlflowClient(uri)
        self.run_id = self._previous_run(run_dir, uri) if first_epoch > 1 else None
        if self.run_id is None:
            self.run_id = self._new_run(settings, run_dir, uri, config)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s", self.run_id)

    def _new_run(self, settings: Any, run_dir: Path, uri: str, config: dict) -> str:
        experiment = self.client.get_experiment_by_name(settings.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif settings.tracking_uri is None:  # the default local store keeps artifacts beside its database
            artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
            experiment_id = self.client.create_experiment(settings.experiment, artifact_location=str(artifacts))
        else:
            experiment_id = self.client.create_experiment(settings.experiment)
        run_name = settings.run_name or _default_run_name(run_dir)
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"lora_cls.run_dir": str(run_dir)})
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        record = {"mlflow": {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id}}
        from lora_cls.files import write_json

        write_json(run_dir / TRACKING_JSON, record)
        log.info("mlflow: run %s (%s) in experiment %s at %s", run.info.run_id, run_name, settings.experiment, uri)
        return run.info.run_id

    @staticmethod
    def _previous_run(run_dir: Path, uri: str) -> str | None:
        try:
            record = json.loads((run_dir / TRACKING_JSON).read_text(encoding="utf-8"))["mlflow"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record.get("run_id") if record.get("tracking_uri") == uri else None

    def epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in scalars.items()])

    def finish(self, metrics: dict, run_dir: Path) -> None:
        self.epoch(int(metrics.get("epochs_run") or 0), final_scalars(metrics))
        run = RunDir(run_dir)
        for path in [run.metrics, run.history, *run_images(run_dir).values(),
                     *sorted((run_dir / "reports").glob("*/classification_report.txt"))]:
            folder = path.parent.relative_to(run_dir).as_posix()
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        self.close()

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _default_run_name(run_dir: Path) -> str:
    # A sweep job's folder is a number: the sweep folder's name keeps it apart from other sweeps' jobs.
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.isdigit() else run_dir.name


_LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


class Loggers:
    """The run's chosen loggers, opened at the first epoch end (a resumed run then knows where it goes on)."""

    def __init__(self, settings: Any, run_dir: Path, config: dict, writes: bool) -> None:
        self.chosen = [name for name in _LOGGERS if writes and settings is not None and settings.get(name)]
        self.settings, self.run_dir, self.config = settings, Path(run_dir), config
        self.open: list[Any] = []

    def _ensure_open(self, first_epoch: int) -> None:
        # Opened once; one that cannot open (a tracking server that is not there) is off with a warning.
        chosen, self.chosen = self.chosen, []
        for name in chosen:
            try:
                self.open.append(_LOGGERS[name](self.settings[name], self.run_dir, self.config, first_epoch))
            except Exception as exc:
                log.warning("could not open the %s logger (%s: %s); it is off for this run (the run folder has "
                            "everything it would record)", name, type(exc).__name__, exc)

    def epoch(self, row: dict) -> None:
        self._ensure_open(int(row["epoch"]))
        scalars = history_scalars(row)
        self._each(f"log epoch {row['epoch']} to", lambda logger: logger.epoch(int(row["epoch"]), scalars))

    def finish(self, metrics: dict) -> None:
        """The final metrics and figures, then close (a run resumed after its last epoch opens here)."""
        self._ensure_open(int(metrics.get("epochs_run") or 0) + 1)
        self._each("finish", lambda logger: logger.finish(metrics, self.run_dir))
        self.open = []

    def _each(self, what: str, call: Any) -> None:
        # A logger that fails (a tracking server gone away) is dropped with a warning: the run folder, which
        # holds everything the logger would, is what the run must not lose.
        for logger in list(self.open):
            try:
                call(logger)
            except Exception as exc:
                log.warning("could not %s %s (%s: %s); it is off for the rest of this run", what,
                            type(logger).__name__, type(exc).__name__, exc)
                self.open.remove(logger)

    def fail(self) -> None:
        """The run ended in an error: close what is open (an MLflow run is marked FAILED), never raising."""
        for logger in self.open:
            try:
                logger.close(failed=True)
            except Exception as exc:  # the training error is the one to report
                log.warning("could not close the %s logger: %s", type(logger).__name__, exc)
        self.open = []
