"""Before Hydra starts (and creates a run folder): the command line composed and validated as Hydra will
compose it, so a bad value fails at once naming its key, and the output folder checked (docs/DESIGN.md §8)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lora_cls.conf.load import CONFIG_MODULE, register_configs
from lora_cls.conf.overrides import override_value, override_variants
from lora_cls.errors import UserError
from lora_cls.runs import folder as runfolder
from lora_cls.runs.folder import check_writable

_NO_PRECHECK = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}


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
             check_run_dir: Callable[[DictConfig, Path], object] | None = None) -> Path | None:
    """Compose and validate the config the way Hydra will, so a mistake fails before any folder is made; return
    the folder the command will write (hydra.run.dir, or hydra.sweep.dir with -m), resolved now. None when Hydra
    only prints (--help, --cfg, ...)."""
    if any(a in _NO_PRECHECK or a.startswith("--config") or a.startswith("-c") for a in argv):
        return None
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
                from lora_cls.tasks.search import check_sweeper

                check_sweeper(hydra_cfg.sweeper, job_overrides)
    except UserError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(f"invalid config: {_one_line(exc)}{_quoting_hint(overrides)}") from None
    check_writable(output, key)  # before Hydra makes the folder: a read-only place is an `error:`, not a traceback
    if run_dir and not multirun and check_run_dir is not None:
        check_run_dir(configs[0], Path(run_dir))
    return Path(output)


def check_sweep_dir(sweep_dir: Path, job_overrides: list[str]) -> None:
    """A sweep folder is new, or holds this same sweep interrupted (it then resumes: finished jobs are kept,
    the interrupted one continues from its last.pt, the rest run). Another sweep's results are refused, so a
    summary never mixes two sweeps."""
    if (sweep_dir / "summary.csv").exists() and not (sweep_dir / "optuna.db").exists():  # a study may go on
        raise UserError(f"sweep folder {sweep_dir} already holds a finished sweep (summary.csv); "
                        "choose another hydra.sweep.dir")
    found = sorted(sweep_dir.glob("*/metrics.json")) + sorted(sweep_dir.glob("*/checkpoints/last.pt")) + \
        sorted(sweep_dir.glob("*/cv.json"))  # a cross-validation job writes its plan before any fold
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
