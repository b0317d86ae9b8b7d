"""lora-compare: finished lora-train runs side by side (a table on the console, comparison.csv/md/png)."""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-compare", description=__doc__,
                                epilog="The config values that differ between the runs become columns.")
    p.add_argument("runs", nargs="+", help="run folders, globs of them (quoted), or sweep roots")
    p.add_argument("--out", default=None, help="output folder (default outputs/compare/<timestamp>)")
    p.add_argument("--title", default="Run comparison", help="title of the table and the plot")
    return p


def main(argv: list[str] | None = None) -> None:
    from lora_cls.cli.common import environment_fault, fail
    from lora_cls.errors import UserError

    args = _parser().parse_args(argv)
    out = args.out or time.strftime("outputs/compare/%Y-%m-%d_%H-%M-%S")
    try:
        from lora_cls.runs.console import print_sweep_summary
        from lora_cls.runs.folder import check_writable
        from lora_cls.tasks.compare import STEM, compare_runs

        check_writable(out, "--out")
        rows = compare_runs(args.runs, out, args.title)
    except (UserError, OSError) as exc:
        message = str(exc) if isinstance(exc, UserError) else environment_fault(exc)
        if message is None:
            raise
        fail(message)
    from rich.console import Console

    # A pipe or a log file gets the whole table rather than headers wrapped at 80 columns.
    print_sweep_summary(rows, Console(width=None if sys.stdout.isatty() else 200), title=args.title)
    for row in rows:
        if row.get("mcnemar_p") is not None:
            print(f"paired test, {row['job']} against {row['paired_vs']} (test split): accuracy difference "
                  f"{row['test_accuracy_diff']:+.4f} [{row['test_accuracy_diff_lo']:+.4f}, "
                  f"{row['test_accuracy_diff_hi']:+.4f}], McNemar p = {row['mcnemar_p']:.3g}")
    print(f"comparison: {out}/{STEM}.csv, {STEM}.md, {STEM}.png")


if __name__ == "__main__":
    main()
