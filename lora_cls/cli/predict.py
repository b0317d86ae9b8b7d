"""lora-predict: a thin Hydra entry point around lora_cls.predict.run_predict."""

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import check_fresh_run_dir, main_with_errors, run_job
from lora_cls.config import register_configs, validate_predict
from lora_cls.predict import run_predict

register_configs()


@hydra.main(config_path="pkg://lora_cls.conf", config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    return run_job(cfg, run_predict)


def main() -> None:
    main_with_errors(_hydra_main, "predict", validate_predict, check_run_dir=check_fresh_run_dir)


if __name__ == "__main__":
    main()
