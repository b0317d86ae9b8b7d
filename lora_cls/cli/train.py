"""lora-train: a thin Hydra entry point around lora_cls.tasks.train.train."""

import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from lora_cls.cli.common import command, fail, sweep_exit_status
from lora_cls.conf.checks import validate


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    # imported when a job runs, so --help and config errors answer fast
    if cfg.cv.folds:
        from lora_cls.tasks.crossval import cross_validate

        return cross_validate(cfg, run_dir)
    from lora_cls.tasks.train import train

    return train(cfg, run_dir)


def _validate(cfg: DictConfig) -> None:
    from lora_cls.tasks.peft import with_init_from  # lora.init_from decides lora.* (as train() sees it)

    validate(with_init_from(cfg) if cfg.lora.get("init_from") else cfg)


def _check_run_dir(cfg: DictConfig, run_dir: Path):
    if cfg.cv.folds:
        from lora_cls.tasks.crossval import check_cv_dir

        return check_cv_dir(cfg, run_dir)
    from lora_cls.runs.resume import prepare_run_dir
    from lora_cls.tasks.peft import with_init_from

    return prepare_run_dir(with_init_from(cfg) if cfg.lora.get("init_from") else cfg, run_dir)


def _torchrun_argv(argv: list[str]) -> bool:
    """Under torchrun: one run folder for all processes (rank 0's timestamp); only rank 0 writes Hydra's files.

    Returns whether this process is the one that checks and writes the run folder.
    """
    from lora_cls.engine import distributed

    if not distributed.launched_by_torchrun():
        return True
    if any(a in ("-m", "--multirun") for a in argv):
        fail("torchrun runs one training job; sweep with `lora-train -m` without torchrun, or a Hydra launcher")
    info = distributed.init_distributed()
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        stamp = distributed.broadcast(datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f"), info)
        sys.argv.append(f"hydra.run.dir=outputs/train/{stamp}")
    if not info.is_main:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return info.is_main


def main() -> None:
    checks_run_dir = _torchrun_argv(sys.argv[1:])
    try:
        # The job's validation accuracy is what a Hydra sweeper (Optuna) optimises.
        command("train", _train, _validate, _check_run_dir if checks_run_dir else None, metric_key="accuracy",
                exit_status=sweep_exit_status)()
    finally:
        from lora_cls.engine import distributed

        distributed.shutdown()


if __name__ == "__main__":
    main()
