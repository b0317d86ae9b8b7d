"""Hydra callback that writes the sweep summary (summary.csv/md/png) at the sweep root when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Rows of the last summary written in this process; the CLI reads it to set the exit status of a sweep.
last_summary: list[dict] = []


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lora_cls.reports import print_sweep_summary, write_sweep_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_summary(sweep_dir)
        last_summary[:] = rows
        print_sweep_summary(rows)
        log.info("sweep summary: %s", sweep_dir / "summary.md")
