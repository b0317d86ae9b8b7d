"""lora-train: a thin Hydra entry point around lora_cls.pipeline.train."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import main_with_errors, run_job
from lora_cls.config import register_configs, validate

register_configs()


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.pipeline import train  # imported when a job runs, so --help and config errors answer fast

    return train(cfg, run_dir)


def _check_run_dir(cfg: DictConfig, run_dir: Path):
    from lora_cls.pipeline import prepare_run_dir

    return prepare_run_dir(cfg, run_dir)


@hydra.main(config_path="pkg://lora_cls.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    # The returned validation accuracy is what a Hydra sweeper would optimise.
    return run_job(cfg, _train, metric_key="accuracy")


def main() -> None:
    main_with_errors(_hydra_main, "train", validate, check_run_dir=_check_run_dir)


if __name__ == "__main__":
    main()
