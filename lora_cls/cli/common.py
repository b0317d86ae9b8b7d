"""The one place user mistakes become `error: <message>` and exit status 2 (docs/DESIGN.md §8), and the one
shape of every Hydra command (`command`).

Before Hydra starts, `precheck` composes and validates the command line. Inside a job, a UserError ends a single
run with `error:`; in a multirun it marks the job failed (metrics.json status "failed") and the sweep goes on.
A command's exit status is read back from what it wrote (a sweep's summary.csv, lora-data's datacheck.json).
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_cls.cli.interrupt import (
    caused_by_interrupt,
    interrupted,
    interrupted_outside_jobs,
    run_resume_command,
    terminate,
)
from lora_cls.cli.precheck import precheck
from lora_cls.conf.load import register_configs
from lora_cls.conf.overrides import override_value
from lora_cls.errors import UserError
from lora_cls.files import write_json
from lora_cls.runs import folder as runfolder
from lora_cls.runs.folder import RunDir, failed_metrics, read_metrics

log = logging.getLogger("lora_cls")
Job = Callable[[DictConfig, Path], dict]
Validate = Callable[[DictConfig], None]
CheckRunDir = Callable[[DictConfig, Path], object]
ExitStatus = Callable[[Path, bool], int]  # (the command's output folder, multirun) -> exit status


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _log_to_file(message: str) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


# Environment faults (not the user's config, not a bug): what happened, and what to do about it.
_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space on that disk (or choose a run folder on another one)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space (or choose a run folder elsewhere)"),
    errno.EROFS: ("read-only filesystem", "choose a writable hydra.run.dir (or hydra.sweep.dir)"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another folder"),
    errno.EPERM: ("permission denied", "fix the permissions or choose another folder"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or lower trainer.num_workers"),
    errno.ENFILE: ("too many open files on this machine", "close other programs or lower trainer.num_workers"),
}


def environment_fault(exc: BaseException, run_dir: Path | None = None, overrides: list[str] | None = None,
                      training: bool = False) -> str | None:
    """The one-line `error:` message for an environment fault anywhere in `exc`'s chain (a full disk, a
    read-only folder, a permission, too many open files), or None when `exc` is not one. For a training run
    it says what is kept: last.pt of the last completed epoch, and the command that resumes from it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _FAULTS:
            what, advice = _FAULTS[current.errno]
            where = f": could not write {current.filename}" if current.filename else ""
            message = f"{what}{where}; {advice}"
            last = RunDir(run_dir).last if run_dir is not None else None
            if training and last is not None and last.is_file():
                message += (f"; {last} (the last completed epoch) is intact: resume with "
                            f"{run_resume_command(overrides or [], run_dir)}")
            return message
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def run_job(cfg: DictConfig, job: Callable[[DictConfig, Path], dict], metric_key: str | None = None):
    """Run one Hydra job; failures end a single run with `error:` but only mark a multirun job failed."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    run = RunDir(run_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    training = hc.job.config_name == "train"
    try:
        if multirun and training and run.metrics.is_file():
            # A resumed sweep (check_sweep_dir): this job ended before the interruption; its result stays.
            log.info("job %s already ended in %s; kept", hc.job.num, run_dir)
            metrics = read_metrics(run.metrics) or {}
        else:
            metrics = job(cfg, run_dir)
    except (KeyboardInterrupt, Exception) as exc:
        if caused_by_interrupt(exc):  # also when a library (torch.save) turned the Ctrl-C into its own error
            interrupted(run_dir, list(hc.overrides.task), training=training,
                        sweep_dir=Path(hc.sweep.dir) if multirun else None)
        fault = environment_fault(exc, run_dir, list(hc.overrides.task), training and not multirun)
        user = isinstance(exc, UserError) or fault is not None
        message = fault or (str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        if user and multirun:
            log.error("job %s failed: %s", hc.job.num, message)
        elif user:
            _log_to_file(f"error: {message}")  # the console gets it once, as the `error:` line
        else:
            log.error("internal error:\n%s", traceback.format_exc())
        if not run.metrics.exists():
            try:
                write_json(run.metrics, failed_metrics(cfg if "trainer" in cfg else None, message))
            except OSError as write_error:  # the same full disk or read-only folder: the error line says it all
                log.debug("metrics.json not written: %s", write_error)
        if multirun:
            return None
        if user:
            fail(message.replace("\n", " | ") if "\n" in message and len(message) < 2000 else message)
        raise
    if metric_key:
        return (metrics.get("val") or {}).get(metric_key)
    return None


def check_fresh_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """check_run_dir for the commands that only ever write a new folder (lora-eval, lora-predict, lora-data)."""
    runfolder.check_fresh_run_dir(run_dir)


def main_with_errors(hydra_main: Callable[[], None], config_name: str, validate: Validate,
                     check_run_dir: CheckRunDir | None = None, exit_status: ExitStatus | None = None) -> None:
    """Check the command line, then run Hydra; exit with `exit_status(output folder, multirun)` when given.

    The output folder is fixed before Hydra starts (Hydra's `${now:}` would otherwise resolve again), so what the
    command wrote there can be read back after it."""
    register_configs()
    signal.signal(signal.SIGTERM, terminate)
    argv = sys.argv[1:]
    try:
        output = precheck(argv, config_name, validate, check_run_dir)
    except UserError as exc:
        fail(str(exc))
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if output is not None and override_value([a for a in argv if not a.startswith("-")], key) is None:
        sys.argv.append(f"{key}={output}")
        argv = sys.argv[1:]
    try:
        hydra_main()
    except KeyboardInterrupt:  # outside any job (run_job handles those): a launcher waiting on its workers
        interrupted_outside_jobs(argv, config_name)
    status = exit_status(output, multirun) if exit_status is not None and output is not None else 0
    if status:
        sys.exit(status)


def sweep_exit_status(output: Path, multirun: bool) -> int:
    """1 when a job of the sweep in `output` failed (its summary.csv says so), else 0."""
    if not multirun:
        return 0
    from lora_cls.runs.summary import read_summary_csv

    rows = read_summary_csv(output) or []
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} sweep jobs failed; see summary.md at the sweep root",
              file=sys.stderr)
    return 1 if failed else 0


class SweepSummary(Callback):
    """Hydra's multirun-end callback (lora_cls/conf/train.yaml): summary.csv, summary.md and summary.png at the
    sweep root, and the table on the console, even when a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lora_cls.runs.console import print_sweep_summary
        from lora_cls.runs.summary import write_sweep_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        print_sweep_summary(write_sweep_summary(sweep_dir))
        log.info("sweep summary: %s", sweep_dir / "summary.md")


def command(config_name: str, job: Job, validate: Validate, check_run_dir: CheckRunDir | None = check_fresh_run_dir,
            metric_key: str | None = None, exit_status: ExitStatus | None = None) -> Callable[[], None]:
    """The console-script `main` of a Hydra command: `job(cfg, run_dir)` run by `run_job` inside `@hydra.main` over
    the packaged config `config_name`, checked by `validate` (and `check_run_dir`) before Hydra starts."""

    def task(cfg: DictConfig):
        return run_job(cfg, job, metric_key)

    task.__module__ = job.__module__
    hydra_main = hydra.main(config_path="pkg://lora_cls.conf", config_name=config_name, version_base="1.3")(task)

    def main() -> None:
        main_with_errors(hydra_main, config_name, validate, check_run_dir, exit_status)

    return main
