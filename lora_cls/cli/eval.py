"""lora-eval: a thin Hydra entry point around lora_cls.tasks.evaluate.evaluate_checkpoint."""

from pathlib import Path

from omegaconf import DictConfig

from lora_cls.cli.common import command
from lora_cls.conf.checks import validate_eval


def _evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.tasks.evaluate import evaluate_checkpoint  # imported when a job runs: fast --help

    return evaluate_checkpoint(cfg, run_dir)


main = command("eval", _evaluate, validate_eval)

if __name__ == "__main__":
    main()
