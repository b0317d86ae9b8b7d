"""lora-data check: a thin Hydra entry point around lora_cls.datacheck.run_check; lora-data cache [clear]: list
or empty the decoded-image cache (lora_cls.data.cache).

Hydra has no subcommands, so `check` is taken off the command line before Hydra parses the rest. Exit status:
0 clean, 1 problems found, 2 usage or user error.
"""

import sys
import time

import hydra
from omegaconf import DictConfig

from lora_cls.cli.common import check_fresh_run_dir, fail, main_with_errors, run_job
from lora_cls.config import register_configs
from lora_cls.data.layouts import DATASET_NAMES
from lora_cls.datacheck import run_check, validate_datacheck

register_configs()

USAGE = (f"usage: lora-data check [dataset=<{'|'.join(DATASET_NAMES)}>] [key=value ...]  "
         "(lora-data check --help)")
CACHE_USAGE = "usage: lora-data cache [clear] [root=<dataset root>] [dir=<cache folder>]"
COMMANDS = ("check", "cache")
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
        print(f"{USAGE}\n{CACHE_USAGE}\n\ncommands:\n  check   check a dataset (counts, sizes, undecodable files, "
              "leakage)\n  cache   list the decoded-image cache; `cache clear` empties it (root=: only that "
              "dataset's entries)")
        return
    if not args or args[0] not in COMMANDS:
        got = f"unknown command {args[0]!r}" if args else "no command"
        fail(f"{got}; {USAGE}")
    if args[0] == "cache":
        _cache(args[1:])
        return
    sys.argv = [sys.argv[0], *args[1:]]
    _last_report.clear()
    main_with_errors(_hydra_main, "data", validate_datacheck, check_run_dir=check_fresh_run_dir)
    if _last_report and not _last_report["ok"]:
        sys.exit(1)


def _cache(args: list[str]) -> None:
    from lora_cls.data import cache

    if any(arg in ("-h", "--help") for arg in args):
        print(CACHE_USAGE)
        return
    clear = args[:1] == ["clear"]
    options: dict[str, str] = {}
    for arg in args[1:] if clear else args:
        key, sep, value = arg.partition("=")
        if not sep or not value or key not in (("root", "dir") if clear else ("dir",)):
            fail(f"unexpected argument {arg!r}; {CACHE_USAGE}")
        options[key] = value
    folder = cache.cache_dir(options.get("dir"))
    if clear:
        removed = cache.clear(folder, options.get("root"))
        what = f" of {options['root']}" if "root" in options else ""
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}{what} "
              f"({_size(sum(e.nbytes for e in removed))}) from {folder}")
        return
    listed = cache.entries(folder)
    print(f"decoded-image cache: {folder}")
    if listed:
        print(f"{'last used':<16}  {'size':>10}  {'images':>7}  {'px':>4}  dataset root")
    for e in reversed(listed):
        bad = f" ({e.bad} undecodable)" if e.bad else ""
        print(f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used)):<16}  {_size(e.nbytes):>10}  "
              f"{e.images:>7}  {e.image_size:>4}  {e.root}{bad}")
    print(f"{len(listed)} entr{'y' if len(listed) == 1 else 'ies'}, {_size(sum(e.nbytes for e in listed))}; runs "
          "evict the least recently used above dataset.cache.max_gb (10 GiB unless set)")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
