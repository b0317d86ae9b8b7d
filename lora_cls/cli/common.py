"""The one place user mistakes become `error: <message>` and exit status 2 (docs/DESIGN.md §8).

Before Hydra starts (and creates a run folder), the command-line overrides are composed and validated, so a
bad value fails at once naming its key. Inside a job, a UserError ends a single run with `error:`; in a
multirun it marks the job failed (metrics.json status "failed") and the sweep goes on.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lora_cls import runfolder
from lora_cls.cli.interrupt import (
    caused_by_interrupt,
    interrupted,
    interrupted_outside_jobs,
    run_resume_command,
    terminate,
)
from lora_cls.cli.overrides import override_value, override_variants
from lora_cls.config import register_configs
from lora_cls.errors import UserError
from lora_cls.runfolder import RunDir, check_writable, failed_metrics, read_metrics, write_json

log = logging.getLogger("lora_cls")
CONFIG_MODULE = "lora_cls.conf"
_NO_PRECHECK = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(exc: BaseException) -> str:
    parts = [str(exc)]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(str(cause))
    text = "; ".join(p.strip() for p in parts if p.strip())
    text = text.split("Config search path")[0]  # Hydra's search-path dump says nothing a user can act on
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _quoting_hint(overrides: list[str]) -> str:
    """Hydra's grammar takes only ASCII (and some punctuation) in an unquoted value: say how to quote one."""
    for override in overrides:
        key, _, value = override.partition("=")
        if value and not value.isascii() and value[:1] not in "'\"":
            return (f"; a value with non-ASCII characters (or spaces, quotes, brackets) needs Hydra's quotes "
                    f"inside the shell's: '{key}=\"{value}\"'")
    return ""


def precheck(argv: list[str], config_name: str, validate: Callable[[DictConfig], None],
             check_run_dir: Callable[[DictConfig, Path], object] | None = None) -> None:
    """Compose and validate the config the way Hydra will, so a mistake fails before any folder is made."""
    if any(a in _NO_PRECHECK or a.startswith("--config") or a.startswith("-c") for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    run_dir = override_value(overrides, "hydra.run.dir")
    sweep_dir = override_value(overrides, "hydra.sweep.dir")
    job_overrides = [a for a in overrides if not a.startswith(("hydra.", "hydra/", "+hydra", "++hydra", "~hydra"))]
    if sweep_dir and multirun:
        check_sweep_dir(Path(sweep_dir), job_overrides)
    hydra_overrides = [a for a in overrides if a not in job_overrides]
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            variants = override_variants(job_overrides, multirun)
            configs = [compose(config_name=config_name, overrides=variant) for variant in variants]
            for cfg in configs:
                validate(cfg)
            # A misspelt hydra.* key or launcher fails here with Hydra's own message, as an `error:` line. With
            # the job's overrides: `sweep=rank` is what creates hydra.sweeper.params to override.
            for variant in override_variants(hydra_overrides, multirun):
                hydra_cfg = compose(config_name=config_name, overrides=variants[0] + variant,
                                    return_hydra_config=True).hydra
            output, key = (hydra_cfg.sweep.dir, "hydra.sweep.dir") if multirun else (hydra_cfg.run.dir, "hydra.run.dir")
            if multirun:  # hydra/sweeper=optuna: its settings and search space, before any job starts
                from lora_cls.search import check_sweeper

                check_sweeper(hydra_cfg.sweeper, job_overrides)
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(f"invalid config: {_one_line(exc)}{_quoting_hint(overrides)}") from None
    check_writable(output, key)  # before Hydra makes the folder: a read-only place is an `error:`, not a traceback
    if run_dir and not multirun and check_run_dir is not None:
        check_run_dir(configs[0], Path(run_dir))


def check_fresh_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """check_run_dir for the commands that only ever write a new folder (lora-eval, lora-predict, lora-data)."""
    runfolder.check_fresh_run_dir(run_dir)


def check_sweep_dir(sweep_dir: Path, job_overrides: list[str]) -> None:
    """A sweep folder is new, or holds this same sweep interrupted (it then resumes: finished jobs are kept,
    the interrupted one continues from its last.pt, the rest run). Another sweep's results are refused, so a
    summary never mixes two sweeps."""
    if (sweep_dir / "summary.csv").exists() and not (sweep_dir / "optuna.db").exists():  # a study may go on
        raise UserError(f"sweep folder {sweep_dir} already holds a finished sweep (summary.csv); "
                        "choose another hydra.sweep.dir")
    found = sorted(sweep_dir.glob("*/metrics.json")) + sorted(sweep_dir.glob("*/checkpoints/last.pt"))
    if not found:
        return
    previous = sweep_overrides(sweep_dir)
    if previous is None:
        raise UserError(f"sweep folder {sweep_dir} already holds results ({found[0].relative_to(sweep_dir)}) but no "
                        "readable multirun.yaml saying which sweep made them; choose another hydra.sweep.dir")
    if previous != job_overrides:
        raise UserError(f"sweep folder {sweep_dir} already holds results of another sweep "
                        f"({found[0].relative_to(sweep_dir)}; its overrides were {' '.join(previous)}); choose another "
                        "hydra.sweep.dir, or repeat those overrides in the same order to resume it")
    runfolder.remove_stale_temp_files(sweep_dir, recursive=False)  # a summary a kill left half-written
    # Logging is not set up yet (Hydra does that per job), so this goes straight to the terminal.
    print(f"resuming the interrupted sweep in {sweep_dir}: jobs that ended are kept", file=sys.stderr)


def sweep_overrides(sweep_dir: Path) -> list[str] | None:
    """The command-line overrides (hydra.* excluded) of the sweep that Hydra started in `sweep_dir`."""
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.select(OmegaConf.load(sweep_dir / "multirun.yaml"), "hydra.overrides.task")
        return [str(o) for o in task] if task is not None else None
    except (OSError, OmegaConfBaseException, ValueError):
        return None


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


def main_with_errors(hydra_main: Callable[[], None], config_name: str, validate: Callable[[DictConfig], None],
                     check_run_dir: Callable[[DictConfig, Path], object] | None = None) -> None:
    register_configs()
    signal.signal(signal.SIGTERM, terminate)
    argv = sys.argv[1:]
    try:
        precheck(argv, config_name, validate, check_run_dir)
    except UserError as exc:
        fail(str(exc))
    from lora_cls import sweep

    sweep.last_summary.clear()
    try:
        hydra_main()
    except KeyboardInterrupt:  # outside any job (run_job handles those): a launcher waiting on its workers
        interrupted_outside_jobs(argv, config_name)
    failed = [r for r in sweep.last_summary if r.get("status") != "ok"]
    if failed:
        print(f"error: {len(failed)} of {len(sweep.last_summary)} sweep jobs failed; see summary.md at the sweep "
              "root", file=sys.stderr)
        sys.exit(1)
