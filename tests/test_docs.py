"""The documentation that is generated or executed: the config reference is the schema's, and the guide's
Python example runs (tests/test_api.py runs the API example)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_config_reference_is_the_schemas():
    """docs/config.md is generated from lora_cls/conf/schema.py and the YAML options; a changed default, help text
    or option without regenerating it fails here."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_schema_key_has_help():
    import dataclasses

    from lora_cls.conf import schema

    def missing(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if not f.metadata.get("help"):
                out.append(prefix + f.name)
            factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if factory is not None and dataclasses.is_dataclass(factory):
                out += missing(factory, f"{prefix}{f.name}.")
        return out

    for name in ("TrainConfig", "EvalConfig", "PredictConfig", "ExportConfig", "DataCheckConfig"):
        assert missing(getattr(schema, name)) == [], name
