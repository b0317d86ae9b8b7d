"""lora-compare: finished runs made at different times side by side, as the sweep summary shows a sweep's jobs.

Each run's config (its `.hydra/config.yaml`, else the config in its adapter's metadata) is flattened to dotted
keys; the keys whose values differ between the runs become columns, beside the metrics.json figures of
sweep.SUMMARY_FIELDS. The table, its Markdown and its plot are the sweep summary's (`sweep.summary_table`,
`sweep.write_summary_files`): comparison.csv, comparison.md and comparison.png.

Runs evaluated on the same test images (the same paths and labels in their reports/test/predictions.csv) are
compared pairwise with the run chosen on validation accuracy (the reference): the difference of their test
accuracies with its paired bootstrap interval, and McNemar's exact test on the images only one of them gets
right (metrics/intervals.py). These go into comparison.csv (`paired_vs`, `test_accuracy_diff` and its `_lo`/`_hi`,
`mcnemar_p`) and a section of comparison.md.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_cls.conf.load import flatten, is_neutral, stored_defaults
from lora_cls.errors import UserError
from lora_cls.metrics.intervals import mcnemar_exact, paired_difference
from lora_cls.runs.folder import METRICS, RunDir
from lora_cls.runs.reports import PREDICTIONS, read_split_predictions
from lora_cls.runs.summary import (
    PAIRED_COLUMNS,
    _best_rows,
    _find_job_dirs,
    summary_table,
    write_summary_files,
)

STEM = "comparison"


def run_folders(specs: list[str]) -> list[Path]:
    """The run folders that `specs` name: folders holding metrics.json, globs of them, or a sweep root (its jobs)."""
    found: list[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.expanduser(spec))) if glob.has_magic(spec) else [spec]
        folders = [Path(m) for m in matches if Path(m).is_dir()]
        if not folders:
            raise UserError(f"{spec}: {'matches no folder' if glob.has_magic(spec) else 'is not a folder'}; "
                            "give lora-train run folders (or globs such as 'outputs/train/2026-*')")
        for folder in folders:
            jobs = [folder] if (folder / METRICS).is_file() else sorted(_find_job_dirs(folder))
            if not jobs:
                raise UserError(f"{folder} holds no metrics.json: it is not a lora-train run folder (nor a sweep)")
            found += [j for j in jobs if j.resolve() not in {f.resolve() for f in found}]
    return found


def run_config(folder: Path) -> dict[str, Any]:
    """A run's training config as dotted keys (today's defaults for keys the run's lora-cls did not have)."""
    hydra_config = folder / ".hydra" / "config.yaml"
    tree: Any = None
    if hydra_config.is_file():
        try:
            tree = yaml.safe_load(hydra_config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            tree = None
    if not isinstance(tree, dict) and RunDir(folder).adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(RunDir(folder).adapter), framework="np") as f:
            tree = json.loads((f.metadata() or {}).get("config", "null"))
    if not isinstance(tree, dict):
        return {}
    try:  # .hydra/config.yaml keeps interpolations (lora.alpha: ${.rank}); the run used their values
        tree = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException:
        pass
    return {**stored_defaults(), **flatten(tree)}


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every config (in the order of the first config's keys)."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    return [k for k in keys if not is_neutral(k) and len({json.dumps(c.get(k), sort_keys=True, default=str)
                                                              for c in configs}) > 1]


def _labels(folders: list[Path]) -> list[str]:
    """Each folder relative to the folder they share (the whole path for a single folder)."""
    paths = [f.absolute() for f in folders]
    base = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    labels = [p.relative_to(base).as_posix() if base is not None and p != base else str(p) for p in paths]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def compare_runs(specs: list[str], out: str | Path, title: str = "Run comparison") -> list[dict]:
    """Compare the runs `specs` names (folders, globs, sweep roots); write comparison.{csv,md,png} into `out`
    and return the rows (one per run: `job` = its folder, the differing config keys, the metrics)."""
    folders = run_folders(list(specs))
    if len(folders) < 2:
        raise UserError(f"lora-compare needs two or more runs; found {len(folders)} ({', '.join(map(str, folders))})")
    out = Path(out)
    if (out / f"{STEM}.csv").exists():
        raise UserError(f"{out} already holds a comparison ({STEM}.csv); choose another --out")
    configs = [run_config(f) for f in folders]
    keys = differing_keys([c for c in configs if c])
    values = [{k: _cell(c.get(k)) for k in keys} if c else {} for c in configs]
    rows, columns = summary_table(list(zip(_labels(folders), values, folders)), keys)
    section = paired_tests(rows, folders)
    columns += [c for c in PAIRED_COLUMNS if c not in columns]
    rows = [{c: row.get(c) for c in columns} for row in rows]
    out.mkdir(parents=True, exist_ok=True)
    write_summary_files(out, rows, columns, keys, title, stem=STEM, sections=[section] if section else [])
    return rows


def _correct_by_image(folder: Path) -> dict[str, tuple[str, bool]] | None:
    rows = read_split_predictions(RunDir(folder).reports("test") / PREDICTIONS)
    if not rows:
        return None
    return {r["path"]: (r["true"], r["true"] == r["predicted"]) for r in rows}


def paired_tests(rows: list[dict], folders: list[Path]) -> str:
    """Each ok run against the reference (the best on validation accuracy) on the test images both were
    evaluated on; the results go into `rows` (PAIRED_COLUMNS), and the comparison.md section is returned."""
    best = _best_rows(rows)
    if not best:
        return ""
    ref = rows.index(best[0])
    ref_images = _correct_by_image(folders[ref])
    if ref_images is None:
        return (f"Paired tests: the reference run `{rows[ref]['job']}` (best on validation) has no "
                f"reports/test/{PREDICTIONS} (a run from before per-image predictions were written).")
    paths = sorted(ref_images)
    y_true = [ref_images[p][0] for p in paths]
    ref_correct = [ref_images[p][1] for p in paths]
    lines = [f"## Paired tests on the test split ({len(paths)} images)", "",
             f"Each run against `{rows[ref]['job']}`, the best on validation accuracy: the difference of test "
             "accuracy (this run minus the reference) with its 95% paired bootstrap interval, and McNemar's exact "
             "test on the images only one of the two gets right.", ""]
    header = len(lines)
    for i, (row, folder) in enumerate(zip(rows, folders)):
        if i == ref or row["status"] != "ok":
            continue
        images = _correct_by_image(folder)
        if images is None:
            lines.append(f"- `{row['job']}`: not tested, no reports/test/{PREDICTIONS} (a run from before "
                         "per-image predictions were written)")
            continue
        if sorted(images) != paths or any(images[p][0] != t for p, t in zip(paths, y_true)):
            lines.append(f"- `{row['job']}`: not tested, evaluated on other test images than the reference")
            continue
        correct = [images[p][1] for p in paths]
        test = mcnemar_exact(np.array(correct), np.array(ref_correct))
        diff = paired_difference(np.array(correct), np.array(ref_correct), np.array(y_true))
        row.update({"paired_vs": rows[ref]["job"], "test_accuracy_diff": round(diff["difference"], 6),
                    "test_accuracy_diff_lo": round(diff["lo"], 6), "test_accuracy_diff_hi": round(diff["hi"], 6),
                    "mcnemar_p": round(test["p_value"], 6)})
        verdict = "a difference at the 5% level" if test["p_value"] < 0.05 else "no evidence of a difference at 5%"
        lines.append(f"- `{row['job']}`: {diff['difference']:+.4f} ({diff['lo']:+.4f} to {diff['hi']:+.4f}); "
                     f"McNemar p = {test['p_value']:.3g} (images only this run gets right: {test['only_a']}, "
                     f"only the reference: {test['only_b']}): {verdict}")
    return "\n".join(lines) if len(lines) > header else ""


def _cell(value: Any) -> Any:
    """A config value as a table cell: numbers and strings as they are, lists and None as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else json.dumps(value, default=str)
