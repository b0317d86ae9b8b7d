"""lora-export: a thin Hydra entry point around lora_cls.export.export_checkpoint."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import check_fresh_run_dir, main_with_errors, run_job
from lora_cls.config import register_configs, validate_export

register_configs()


def _export(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.export import export_checkpoint, print_export  # imported when a job runs: fast --help

    report = export_checkpoint(cfg.ckpt, cfg.format, run_dir, low_rank=bool(cfg.lowrank),
                               tolerance=float(cfg.tolerance), images=int(cfg.images), opset=int(cfg.opset))
    print_export(report, run_dir)
    return report


@hydra.main(config_path="pkg://lora_cls.conf", config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    return run_job(cfg, _export)


def main() -> None:
    main_with_errors(_hydra_main, "export", validate_export, check_run_dir=check_fresh_run_dir)


if __name__ == "__main__":
    main()
