"""lora-data check: a thin Hydra entry point around lora_cls.tasks.datacheck.run_check; lora-data cache [clear]: list
or empty the decoded-image cache (lora_cls.data.cache).

Hydra has no subcommands, so `check` is taken off the command line before Hydra parses the rest. Exit status:
0 clean, 1 problems found, 2 usage or user error.
"""

import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from lora_cls.cli.common import command, fail
from lora_cls.data.check import validate_datacheck
from lora_cls.data.layouts import DATASET_NAMES

USAGE = (f"usage: lora-data check [dataset=<{'|'.join(DATASET_NAMES)}>] [key=value ...]  "
         "(lora-data check --help)")
CACHE_USAGE = "usage: lora-data cache [clear] [root=<dataset root>] [dir=<cache folder>]"
COMMANDS = ("check", "cache")


def _check(cfg: DictConfig, run_dir: Path) -> dict:
    from lora_cls.tasks.datacheck import run_check  # imported when a job runs: fast --help

    return run_check(cfg, run_dir)


def _problems_found(run_dir: Path, multirun: bool) -> int:
    """Exit status 1 when the check found problems (its datacheck.json says so)."""
    from lora_cls.runs.folder import RunDir, read_metrics

    report = read_metrics(RunDir(run_dir).datacheck)  # any JSON object
    return 1 if report is not None and report.get("ok") is False else 0


_check_command = command("data", _check, validate_datacheck, exit_status=_problems_found)


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
    _check_command()


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
