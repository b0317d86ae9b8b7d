"""lora-eval: a thin Hydra entry point around lora_cls.pipeline.evaluate_checkpoint."""

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import main_with_errors, run_job
from lora_cls.config import register_configs, validate_eval
from lora_cls.pipeline import check_fresh_run_dir, evaluate_checkpoint

register_configs()


@hydra.main(config_path="pkg://lora_cls.conf", config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    return run_job(cfg, evaluate_checkpoint)


def main() -> None:
    main_with_errors(_hydra_main, "eval", validate_eval,
                     check_run_dir=lambda cfg, run_dir: check_fresh_run_dir(run_dir))


if __name__ == "__main__":
    main()
