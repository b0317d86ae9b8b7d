"""Write docs/config.md, the config reference, from the schema (lora_cls/conf/schema.py) and the YAML group options.

    python scripts/config_reference.py            # rewrite docs/config.md
    python scripts/config_reference.py --check    # exit 1 when docs/config.md is not what the schema says

Every key's default and help come from the schema's dataclasses (`setting(default, help)`), where they are written
once; each group option's lines come from its YAML file, which holds only what differs from the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config.md"
CONF = ROOT / "lora_cls" / "conf"
COMMANDS = [  # (title, schema class name, how to set a key)
    ("lora-train", "TrainConfig", "lora-train key=value"),
    ("lora-eval", "EvalConfig", "lora-eval key=value"),
    ("lora-predict", "PredictConfig", "lora-predict key=value"),
    ("lora-export", "ExportConfig", "lora-export key=value"),
    ("lora-data check", "DataCheckConfig", "lora-data check key=value"),
]
GROUPS = ["dataset", "model", "lora", "schedule", "optimizer", "trainer", "logger", "experiment", "sweep"]


def shown(value: Any) -> str:
    if value is MISSING or value == "???":
        return "*required*"
    if isinstance(value, str) and value.startswith("${"):
        return f"= `{value[2:-1].replace('.', 'lora.', 1) if value.startswith('${.') else value[2:-1]}`"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`" if value is not None else "`null`"


def rows(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) of every leaf of a schema dataclass, in field order."""
    out = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        help_text = f.metadata.get("help", "")
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested) and dataclasses.fields(nested):
            out.append((key, "", help_text))
            out += rows(nested, f"{key}.")
            continue
        if nested is not None:
            default = nested() if not dataclasses.is_dataclass(nested) else "{}"
        else:
            default = f.default
        out.append((key, shown(default) if default != "{}" else "`{}`", help_text))
    return out


def group_options() -> list[str]:
    lines = ["## Group options", "",
             "Each option of a group sets only what differs from the defaults above (`lora-train dataset=smoking`).",
             ""]
    for group in GROUPS:
        files = sorted((CONF / group).glob("*.yaml"))
        if not files:
            continue
        lines += [f"### `{group}`", "", "| option | what it is | sets |", "|---|---|---|"]
        for path in files:
            text = path.read_text(encoding="utf-8")
            comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")
                        and not line.startswith("# @package")]
            about = comments[0] if comments else ""
            values = yaml.safe_load(text) or {}
            values.pop("defaults", None)
            package = "" if "# @package _global_" in text else f"{group}."
            flat = _flatten(values, package if group not in ("logger",) else "logger.")
            sets = ", ".join(f"`{k}={v if isinstance(v, str) else json.dumps(v)}`"
                             for k, v in flat.items()) or "–"
            lines.append(f"| `{path.stem}` | {about.replace('|', '/')} | {sets.replace('|', '/')} |")
        lines.append("")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def reference() -> str:
    sys.path.insert(0, str(ROOT))
    from lora_cls.conf import schema

    lines = ["# Config reference", "",
             "Generated from the schema by `python scripts/config_reference.py` (a test fails when this page is "
             "stale). Set any key on the command line (`lora-train lora.rank=4 trainer.epochs=20`); "
             "`lora-train --cfg job` prints the composed config.", ""]
    for title, name, how in COMMANDS:
        about = " ".join(getattr(schema, name).__doc__.split()).split(". ")[0].rstrip(".")
        about = about.removeprefix(f"{title}: ")
        lines += [f"## `{title}`", "", f"{about[0].upper()}{about[1:]}: `{how}`.", "",
                  "| key | default | what it does |", "|---|---|---|"]
        for key, default, help_text in rows(getattr(schema, name)):
            lines.append(f"| `{key}` | {default} | {help_text.replace('|', '/')} |")
        lines.append("")
    lines += group_options()
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config.md is stale")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
