"""lora-predict: a thin Hydra entry point around lora_cls.tasks.predict.run_predict."""

from pathlib import Path

from omegaconf import DictConfig

from lora_cls.cli.common import command
from lora_cls.conf.checks import validate_predict


def _predict(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.tasks.predict import run_predict  # imported when a job runs: fast --help

    return run_predict(cfg, run_dir)


main = command("predict", _predict, validate_predict)

if __name__ == "__main__":
    main()
