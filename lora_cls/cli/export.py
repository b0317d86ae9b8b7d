"""lora-export: a thin Hydra entry point around lora_cls.tasks.export.export_checkpoint."""

from pathlib import Path

from omegaconf import DictConfig

from lora_cls.cli.common import command
from lora_cls.conf.checks import validate_export


def _export(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.runs.console import print_export  # imported when a job runs: fast --help
    from lora_cls.tasks.export import export_checkpoint
    from lora_cls.tasks.inference import base_settings

    report = export_checkpoint(cfg.ckpt, cfg.format, run_dir, low_rank=bool(cfg.lowrank),
                               tolerance=float(cfg.tolerance), images=int(cfg.images), opset=int(cfg.opset),
                               base=base_settings(cfg))
    print_export(report, run_dir)
    return report


main = command("export", _export, validate_export)

if __name__ == "__main__":
    main()
