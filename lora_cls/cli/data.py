"""lora-data check: a thin Hydra entry point around lora_cls.datacheck.run_check.

Hydra has no subcommands, so `check` is taken off the command line before Hydra parses the rest. Exit status:
0 clean, 1 problems found, 2 usage or user error.
"""

import sys

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import check_fresh_run_dir, fail, main_with_errors, run_job
from lora_cls.config import register_configs, validate_datacheck
from lora_cls.data.layouts import DATASET_NAMES
from lora_cls.datacheck import run_check

register_configs()

USAGE = (f"usage: lora-data check [dataset=<{'|'.join(DATASET_NAMES)}>] [key=value ...]  "
         "(lora-data check --help)")
COMMANDS = ("check",)
_last_report: dict = {}


def _check(cfg: DictConfig, run_dir) -> dict:
    report = run_check(cfg, run_dir)
    _last_report.clear()
    _last_report.update(report)
    return report


@hydra.main(config_path="pkg://lora_cls.conf", config_name="data", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    return run_job(cfg, _check)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\ncommands:\n  check   check a dataset (counts, sizes, undecodable files, leakage)")
        return
    if not args or args[0] not in COMMANDS:
        got = f"unknown command {args[0]!r}" if args else "no command"
        fail(f"{got}; {USAGE}")
    sys.argv = [sys.argv[0], *args[1:]]
    _last_report.clear()
    main_with_errors(_hydra_main, "data", validate_datacheck, check_run_dir=check_fresh_run_dir)
    if _last_report and not _last_report["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
