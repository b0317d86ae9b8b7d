"""`hydra/sweeper=optuna`: a Hydra Sweeper that runs an Optuna study with the installed Optuna (see
lora_cls/search.py for the search itself, and README "Tracking and search" for why not hydra-optuna-sweeper).

Hydra imports every module of hydra_plugins at start-up, so this one imports nothing heavy at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from omegaconf import OmegaConf

        self.settings = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in settings.items()}
        self.config: Any = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def _launch(self, overrides: list[list[str]], first_job: int) -> list[tuple[float | None, str | None]]:
        from hydra.core.utils import JobStatus

        results = []
        for ret in self.launcher.launch(overrides, initial_job_idx=first_job):
            value = None
            if ret.status == JobStatus.COMPLETED:
                try:
                    value = float(ret.return_value)
                except (TypeError, ValueError):  # lora-train returns None for a job that failed
                    value = None
            run_dir = ret.hydra_cfg.hydra.runtime.output_dir if ret.hydra_cfg is not None else None
            results.append((value, None if run_dir is None else str(run_dir)))
        return results

    def sweep(self, arguments: list[str]) -> Any:
        from omegaconf import OmegaConf

        from lora_cls.tasks.search import SearchSettings, run_search

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # as Hydra's own sweeper does: lora-train reads it to tell a resumed sweep from another one
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return run_search(SearchSettings(**self.settings), arguments, sweep_dir, self._launch)
