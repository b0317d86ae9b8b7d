"""lora-eval: a thin Hydra entry point around lora_cls.evaluate.evaluate_checkpoint."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import check_fresh_run_dir, main_with_errors, run_job
from lora_cls.config import register_configs, validate_eval

register_configs()


def _evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.evaluate import evaluate_checkpoint  # imported when a job runs: fast --help

    return evaluate_checkpoint(cfg, run_dir)


@hydra.main(config_path="pkg://lora_cls.conf", config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    return run_job(cfg, _evaluate)


def main() -> None:
    main_with_errors(_hydra_main, "eval", validate_eval, check_run_dir=check_fresh_run_dir)


if __name__ == "__main__":
    main()
