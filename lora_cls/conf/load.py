"""Composing a config and reading one back: the schemas registered with Hydra (once per process), `compose` (a
config as the commands compose it), a stored config (a checkpoint's, last.pt's) on today's schema, and the
keys that change nothing a run computes."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_cls.conf.schema import DataCheckConfig, EvalConfig, ExportConfig, PredictConfig, TrainConfig
from lora_cls.errors import UserError

log = logging.getLogger(__name__)
CONFIG_MODULE = "lora_cls.conf"  # the packaged YAML tree (config_path="pkg://lora_cls.conf")


# Training settings that never change what a run computes: how it is shown, loaded and recorded. A resume may
# change them (and dataset.root: the same data elsewhere); lora-compare shows no column for them.
NEUTRAL_KEYS = frozenset({"trainer.resume", "trainer.progress", "trainer.num_workers", "dataset.cache.enabled",
                          "dataset.cache.max_gb", "dataset.cache.dir"})
NEUTRAL_PREFIXES = ("logger.",)  # a logger records the run

# Keys added after runs were already written, with the value that reproduces what those runs did: a stored config
# (a checkpoint's metadata, last.pt) that lacks one is read with this value, not with today's default.
ADDED_LATER = {"dataset.fit": "squash", "dataset.augment.preset": "light", "model.preprocess": "imagenet"}


def is_neutral(key: str) -> bool:
    """Whether the dotted training key `key` changes nothing a run computes (NEUTRAL_KEYS, logger.*)."""
    return key in NEUTRAL_KEYS or key.startswith(NEUTRAL_PREFIXES)


@functools.cache
def register_configs() -> None:
    """The schemas in Hydra's ConfigStore, once per process (the YAML tree's `*_schema` defaults name them)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="datacheck_schema", node=DataCheckConfig)
    cs.store(name="export_schema", node=ExportConfig)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The packaged config `config_name` composed with `overrides`, as the commands compose it (no Hydra run:
    for tests, scripts and the Python API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def dataset_config(name: str, root: str | Path) -> DictConfig:
    """The dataset config `lora-train dataset=<name> dataset.root=<root>` uses (the download scripts' check)."""
    return compose("train", [f"dataset={name}", f"dataset.root={Path(root)}"]).dataset


@functools.cache
def _schema_tree() -> dict:
    return to_container(OmegaConf.structured(TrainConfig))


def unknown_keys(tree: Any, schema: dict | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (tuples of keys) in a nested mapping that the training schema does not have."""
    schema = _schema_tree() if schema is None else schema
    found: list[tuple[str, ...]] = []
    for key, value in (tree.items() if isinstance(tree, (dict, DictConfig)) else []):
        if key not in schema:
            found.append((*prefix, str(key)))
        elif isinstance(schema[key], dict):
            found += unknown_keys(value, schema[key], (*prefix, str(key)))
    return found


def stored_train_config(stored: Any, source: str) -> DictConfig:
    """A training config read back from a checkpoint, on today's schema.

    Keys added to the schema since the file was written take the value that reproduces what the run did
    (ADDED_LATER), else their schema defaults (so such a key's default must reproduce the behaviour from before it
    existed, or the key belongs in ADDED_LATER). A key the schema does not know was
    never read by lora-cls (a `+key=` override before those were refused, or a hand edit): it is dropped with a
    warning. A value of the wrong type, or anything that is not a config, is a UserError.
    """
    if not isinstance(stored, dict):
        raise UserError(f"{source} holds no lora-cls training config (got {type(stored).__name__})")
    stored = copy.deepcopy(stored)
    dropped = unknown_keys(stored)
    for *parents, leaf in dropped:
        node = stored
        for part in parents:
            node = node[part]
        del node[leaf]
    if dropped:
        log.warning("%s: ignoring config key(s) that lora-cls does not know: %s", source,
                    ", ".join(".".join(path) for path in dropped))
    try:
        present = flatten(stored)
        legacy = OmegaConf.from_dotlist([f"{k}={v}" for k, v in ADDED_LATER.items() if k not in present])
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), legacy, stored)
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise UserError(f"{source} holds a config this lora-cls cannot read (key {key}: "
                        f"{str(exc).splitlines()[0]})") from None
    return cfg  # type: ignore[return-value]


def schema_defaults() -> dict[str, Any]:
    """The training schema's defaults as flat dotted keys."""
    return flatten(copy.deepcopy(_schema_tree()))


def stored_defaults() -> dict[str, Any]:
    """What a key absent from a stored config meant: its ADDED_LATER value, else the schema's default."""
    return {**schema_defaults(), **ADDED_LATER}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (lists stay values)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts/lists (for metadata and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
