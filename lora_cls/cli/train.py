"""lora-train: a thin Hydra entry point around lora_cls.pipeline.train."""

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import main_with_errors, run_job
from lora_cls.config import register_configs, validate
from lora_cls.pipeline import prepare_run_dir, train

register_configs()


@hydra.main(config_path="pkg://lora_cls.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    # The returned validation accuracy is what a Hydra sweeper would optimise.
    return run_job(cfg, train, metric_key="accuracy")


def main() -> None:
    main_with_errors(_hydra_main, "train", validate, check_run_dir=prepare_run_dir)


if __name__ == "__main__":
    main()
