"""Reading Hydra command-line overrides the way Hydra will: one key's value, and every value of a sweep."""

from __future__ import annotations

from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser


def split_override(override: str) -> tuple[str, str | None]:
    """`key=value`, `+key=value` or `++key=value` -> (key, value); value None without `=`."""
    key, sep, value = override.lstrip("+").partition("=")
    return key, (value if sep else None)


def override_value(overrides: list[str], key: str) -> str | None:
    """The value Hydra will use for `key`: the last `key=`, `+key=` or `++key=` on the command line."""
    values = [value for name, value in map(split_override, overrides) if name == key and value is not None]
    return values[-1] if values else None


def override_values(overrides: list[str]) -> dict[str, Any]:
    """{key: value} of plain `key=value` overrides as Hydra types them (int, float, bool, None, str); a list or dict
    value as its text. Deletions (`~key`) and what Hydra cannot parse are left out."""
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except (HydraException, ValueError):
            continue
        if override.is_delete():
            continue
        value = override.value()
        out[override.key_or_group] = (value if value is None or isinstance(value, (bool, int, float, str))
                                      else override.get_value_element_as_str())
    return out


def override_variants(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Single-valued override lists covering every value of every sweep (one sweep varied at a time).

    Call inside an initialised Hydra context: glob sweeps (`schedule=glob(*)`) need its config loader.
    """
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(overrides)
    first = []
    sweeps: list[tuple[int, list[str]]] = []
    for i, o in enumerate(parsed):
        key = o.get_key_element()
        if o.is_sweep_override():
            values = [f"{key}={v}" for v in _sweep_values(o)]
            sweeps.append((i, values))
            first.append(values[0] if values else o.input_line)
        else:
            first.append(o.input_line)
    variants = [first]
    for i, values in sweeps:
        for v in values[1:]:
            variants.append(first[:i] + [v] + first[i + 1:])
    return variants


def _sweep_values(override) -> list:
    """The values to check of a sweep: all of a choice or range; both ends of an interval (an Optuna search)."""
    from hydra.core.override_parser.types import IntervalSweep

    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        cast = int if "int" in (sweep.tags or set()) else float
        return [cast(sweep.start), cast(sweep.end)]
    return list(override.sweep_string_iterator())
