"""lora-data check: the data check of lora_cls.data.check, printed as tables and written as datacheck.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lora_cls.data.check import check_dataset
from lora_cls.data.splits import SPLIT_NAMES
from lora_cls.files import write_json
from lora_cls.runs.folder import DATACHECK, check_fresh_run_dir


def run_check(cfg: Any, run_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    """`check_dataset`, then print the report and write it to `run_dir/datacheck.json` (a new folder)."""
    check_fresh_run_dir(run_dir)
    report = check_dataset(cfg)
    path = Path(run_dir) / DATACHECK
    write_json(path, report)
    print_report(report, int(cfg.show), console or Console())
    (console or Console()).print(f"report: {path}")
    return report


def _fmt_size(stats: dict[str, Any]) -> str:
    return " / ".join("–" if stats[k] is None else f"{stats[k]:g}" for k in ("min", "median", "max"))


def print_report(report: dict[str, Any], show: int = 20, console: Console | None = None) -> None:
    console = console or Console()
    classes = report["classes"]
    console.print(f"[bold]data check[/bold]: {report['source']}, root {report['root']}")

    counts = Table(title="images per split and class", header_style="bold")
    counts.add_column("class")
    for split in (*SPLIT_NAMES, "all"):
        counts.add_column(split, justify="right")
    for c in (*classes, "total"):
        counts.add_row(c, *(f"{report['counts'][s][c]:,}" for s in (*SPLIT_NAMES, "all")),
                       end_section=c == classes[-1])
    console.print(counts)
    if report["ignored_files"]:
        console.print(f"{report['ignored_files']} non-image file(s) ignored (Thumbs.db, hidden files, ...)")
    if report["skipped_by_run"]:
        console.print(f"{len(report['skipped_by_run'])} file(s) were skipped by the run (dataset.skip_bad=true)")

    sizes = Table(title="image size in pixels, as stored", header_style="bold")
    sizes.add_column("split")
    sizes.add_column("width min / median / max", justify="right")
    sizes.add_column("height min / median / max", justify="right")
    for key in (*SPLIT_NAMES, "all"):
        stats = report["image_sizes"][key]
        sizes.add_row(key, _fmt_size(stats["width"]), _fmt_size(stats["height"]), end_section=key == "test")
    console.print(sizes)

    _print_problem_tables(report, show, console)

    for note in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {note}")
    if report["ok"]:
        console.print("[bold green]no problems found[/bold green]")
    else:
        console.print(f"[bold red]problems:[/bold red] {'; '.join(report['problems'])}")


def _print_problem_tables(report: dict[str, Any], show: int, console: Console) -> None:
    """Undecodable files, identical files across splits or labels, patients in two splits: `show` rows each."""
    if report["bad_files"]:
        table = Table(title=f"undecodable files ({len(report['bad_files'])})", header_style="bold red")
        table.add_column("path", overflow="fold")
        table.add_column("split")
        table.add_column("reason", overflow="fold")
        for row in report["bad_files"][:show]:
            table.add_row(row["path"], row["split"], row["reason"])
        console.print(table)
        _more(console, len(report["bad_files"]), show)
    if report["duplicates"]:
        table = Table(title=f"identical files across splits or labels ({len(report['duplicates'])} set(s))",
                      header_style="bold red")
        table.add_column("sha256")
        table.add_column("files (split, class)", overflow="fold")
        for group in report["duplicates"][:show]:
            table.add_row(group["sha256"][:12],
                          "\n".join(f"{f['path']} ({f['split']}, {f['class']})" for f in group["files"]))
        console.print(table)
        _more(console, len(report["duplicates"]), show)
    if report["duplicates_within_split"]:
        n = len(report["duplicates_within_split"])
        console.print(f"{n} set(s) of identical files within one split and class (not leakage; listed in the report)")

    patients = report["patients"]
    if patients["checked"]:
        per_split = ", ".join(f"{s} {n}" for s, n in patients["per_split"].items())
        if patients["overlap"]:
            table = Table(title=f"patients in more than one split ({len(patients['overlap'])})",
                          header_style="bold red")
            table.add_column("patient")
            for split in SPLIT_NAMES:
                table.add_column(split, justify="right")
            for row in patients["overlap"][:show]:
                table.add_row(row["patient"], *(str(row["files"].get(s, "")) for s in SPLIT_NAMES))
            console.print(table)
            _more(console, len(patients["overlap"]), show)
        console.print(f"patients per split: {per_split}")


def _more(console: Console, total: int, shown: int) -> None:
    if total > shown:
        console.print(f"... and {total - shown} more (all listed in {DATACHECK})")


