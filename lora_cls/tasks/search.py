"""Optuna search over lora-train's settings (`lora-train -m sweep=search`, or `hydra/sweeper=optuna` with your own
`hydra.sweeper.params`): the study, its search space, the trial loop and the report at the end.

The Hydra plugin class (hydra_plugins/lora_cls_search) only hands over to `run_search`. Each trial is one
lora-train job in `<sweep folder>/<trial number>`; the value it reports is its validation accuracy (what
lora-train returns, chosen on validation like the best epoch; test accuracy is never looked at). A job that
fails is told to Optuna as a failed trial and the study goes on. The study lives in a sqlite file in the sweep
folder, so the same command with the same `hydra.sweep.dir` continues it: `n_trials` is the study's total, and
a trial an interrupted run left unfinished runs again in its own folder (resuming from its last.pt).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_cls.conf.load import flatten
from lora_cls.errors import UserError
from lora_cls.files import atomic_open, write_text
from lora_cls.runs.folder import RunDir, read_metrics

log = logging.getLogger(__name__)

STUDY_DB = "optuna.db"  # in the sweep folder, unless hydra.sweeper.storage says otherwise
RESULTS = "optimization_results.yaml"
TRIALS = "trials.csv"
SAMPLERS = ("tpe", "random")


@dataclass
class SearchSettings:
    """hydra.sweeper.* of lora_cls/conf/hydra/sweeper/optuna.yaml."""

    direction: str = "maximize"
    n_trials: int = 20
    n_jobs: int = 1
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    study_name: str = "lora-cls"
    params: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction: must be maximize or minimize, got {self.direction!r}")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise UserError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs: must be >= 1")
        if self.sampler not in SAMPLERS:
            raise UserError(f"hydra.sweeper.sampler: must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")


@dataclass
class SearchSpace:
    """Optuna distributions by parameter name, the overrides every trial shares, and the keys sampled as a
    multiple of another (`ratios`: {lora.alpha: lora.rank} samples lora.alpha/lora.rank)."""

    distributions: dict[str, Any]
    fixed: list[str]
    ratios: dict[str, str]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's command-line overrides: the shared ones, then one `key=value` per sampled parameter."""
        fixed_values = dict(_fixed_value(o) for o in self.fixed)
        out = list(self.fixed)
        for name, value in params.items():
            key, _, base = name.partition("/")
            if base:
                base_value = params.get(base, fixed_values.get(base))
                value = float(value) * float(base_value)
            out.append(f"{key}={_format(value)}")
        return out


def _fixed_value(override: str) -> tuple[str, Any]:
    key, _, value = override.lstrip("+~").partition("=")
    try:
        return key, float(value)
    except ValueError:
        return key, value


def _format(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def distribution(sweep: Any) -> Any:
    """Hydra's sweep syntax as an Optuna distribution: choice(...) categorical; interval(a, b) float (int with
    tag(int, ...)); range(a, b[, step]) int or float steps; tag(log, ...) a log scale."""
    import optuna.distributions as od
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    log_scale = "log" in (sweep.tags or set())
    if isinstance(sweep, ChoiceSweep):
        return od.CategoricalDistribution(list(sweep.list))
    if isinstance(sweep, IntervalSweep):
        if "int" in (sweep.tags or set()):
            return od.IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
        return od.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise UserError(f"hydra.sweeper.params: range({sweep.start}, {sweep.stop}, {sweep.step}) is empty")
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            return od.IntDistribution(values[0], values[-1], step=1 if log_scale else sweep.step, log=log_scale)
        return od.FloatDistribution(values[0], values[-1], step=sweep.step)
    raise UserError(f"hydra.sweeper.params: {sweep} is not a choice, interval or range")


def parse_space(params: Any, arguments: Sequence[str], ratios: Any = None) -> SearchSpace:
    """The search space from hydra.sweeper.params and the command line (a key on both: the command line wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # hydra.sweeper.params.optimizer.lr=... on the command line nests; the YAML writes `optimizer.lr:` flat
    lines = [f"{key}={value}" for key, value in flatten(dict(params or {})).items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as exc:  # Hydra's parser errors carry the override and what is wrong with it
        raise UserError(f"hydra.sweeper.params: {str(exc).splitlines()[0]}") from None
    by_key = {o.get_key_element(): o for o in parsed}
    ratios = {str(k): str(v) for k, v in (ratios or {}).items()
              if str(k) in by_key and by_key[str(k)].is_sweep_override()}
    distributions, fixed = {}, []
    for key, override in by_key.items():
        if override.is_sweep_override():
            name = f"{key}/{ratios[key]}" if key in ratios else key
            distributions[name] = distribution(override.value())
        else:
            fixed.append(override.input_line)
    fixed_keys = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
    for key, base in ratios.items():  # a key fixed on the command line is no longer a ratio
        if f"{key}/{base}" in distributions and base not in distributions and base not in fixed_keys:
            raise UserError(f"hydra.sweeper.ratios: {key} is sampled as a multiple of {base}, so the search needs "
                            f"both in hydra.sweeper.params (or {base} set on the command line)")
    return SearchSpace(distributions, fixed, ratios)


def open_study(settings: SearchSettings, sweep_dir: Path):
    """The study in its storage (created, or loaded to continue), with a sampler seeded past earlier trials so
    a continued study does not draw its first trials again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from run_study instead
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = settings.storage or f"sqlite:///{(sweep_dir / STUDY_DB).resolve()}"
    study = optuna.create_study(study_name=settings.study_name, storage=storage, direction=settings.direction,
                                load_if_exists=True)
    sampler_class = optuna.samplers.TPESampler if settings.sampler == "tpe" else optuna.samplers.RandomSampler
    study.sampler = sampler_class(seed=settings.seed + len(study.trials))
    return study, storage


# launch(list of override lists, number of the first job) -> one (value or None when failed, run folder) per job
Launch = Callable[[list[list[str]], int], list[tuple[float | None, str | None]]]


def run_study(study: Any, space: SearchSpace, n_trials: int, n_jobs: int, launch: Launch) -> None:
    """Run trials until the study holds `n_trials` finished ones (complete or failed), `n_jobs` at a time.

    Trials left running by an interrupted run go first, in their own job folders. Trial number = job number,
    so trial N is the sweep folder's job N.
    """
    from optuna.trial import TrialState

    pending = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if pending:
        log.info("optuna: continuing %d trial(s) an interrupted run left: %s", len(pending),
                 ", ".join(str(t.number) for t in pending))
    while True:
        finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        if pending:
            batch, pending = pending[:n_jobs], pending[n_jobs:]
        elif finished < n_trials:
            batch = [study.ask(space.distributions) for _ in range(min(n_jobs, n_trials - finished))]
        else:
            return
        numbers = [t.number for t in batch]
        overrides = [space.overrides(t.params) for t in batch]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            results = launch(overrides, numbers[0])
        else:
            results = [r for number, job in zip(numbers, overrides) for r in launch([job], number)]
        for trial, (value, run_dir) in zip(batch, results):
            _tell(study, trial, value, run_dir)


def _tell(study: Any, trial: Any, value: float | None, run_dir: str | None) -> None:
    from optuna.trial import TrialState

    if run_dir:
        # (a trial an interrupted run left is a FrozenTrial, which has no public setter: the storage call works
        # for both kinds)
        study._storage.set_trial_user_attr(trial._trial_id, "run_dir", run_dir)
    shown = ", ".join(f"{k}={_format(v)}" for k, v in trial.params.items())
    if value is None or not math.isfinite(value):
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("optuna: trial %d failed (%s); the study goes on", trial.number, shown)
    else:
        study.tell(trial.number, value)
        log.info("optuna: trial %d: val accuracy %.4f (%s)", trial.number, value, shown)


def report(study: Any, storage: str, sweep_dir: Path) -> dict:
    """trials.csv and optimization_results.yaml in the sweep folder, and the best trial in the log."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}
    names = list(dict.fromkeys(name for t in trials for name in t.params))
    figures = {t.number: _trial_figures(t.user_attrs.get("run_dir")) for t in trials}
    with atomic_open(sweep_dir / TRIALS, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "val_accuracy", *INTERVAL_COLUMNS, *names, "run_dir"])
        for t in trials:
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                             *["" if figures[t.number].get(c) is None else figures[t.number][c]
                               for c in INTERVAL_COLUMNS],
                             *[_format(t.params[n]) if n in t.params else "" for n in names],
                             t.user_attrs.get("run_dir", "")])
    results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "storage": storage,
                               "direction": study.direction.name.lower(), "objective": "val accuracy",
                               "trials": counts}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    log.info("optuna: study %s, %d trials (%d complete, %d failed) in %s", study.study_name, len(trials),
             counts["complete"], counts["fail"], storage)
    if complete:
        best = study.best_trial
        run_dir = best.user_attrs.get("run_dir")
        metrics = read_metrics(RunDir(run_dir).metrics) if run_dir else None
        test = ((metrics or {}).get("test") or {}).get("accuracy")
        results.update({"best_trial": best.number, "best_value": best.value,
                        "best_params": {k: _plain(v) for k, v in best.params.items()},
                        "best_run_dir": run_dir, "best_test_accuracy": test})
        log.info("optuna: best trial %d, val accuracy %.4f: %s; its run folder %s (test accuracy %s, reported "
                 "beside, not used to choose)", best.number, best.value,
                 ", ".join(f"{k}={_format(v)}" for k, v in best.params.items()), run_dir,
                 "–" if test is None else f"{test:.4f}")
        results.update(_top_two(complete, figures, study.direction.name.lower() == "maximize"))
    write_text(sweep_dir / RESULTS, yaml.safe_dump(results, sort_keys=False))
    return results


INTERVAL_COLUMNS = ("val_accuracy_lo", "val_accuracy_hi", "test_accuracy", "test_accuracy_lo", "test_accuracy_hi")


def _trial_figures(run_dir: str | None) -> dict[str, float | None]:
    """A trial's 95% interval of val accuracy and its test accuracy with interval, from its metrics.json
    (empty for a failed trial or a run without intervals)."""
    metrics = read_metrics(RunDir(run_dir).metrics) if run_dir else None
    out: dict[str, float | None] = {}
    for split in ("val", "test"):
        part = (metrics or {}).get(split) or {}
        interval = (part.get("ci") or {}).get("accuracy")
        if split == "test":
            out["test_accuracy"] = part.get("accuracy")
        out[f"{split}_accuracy_lo"], out[f"{split}_accuracy_hi"] = interval if interval else (None, None)
    return out


def _top_two(complete: list, figures: dict, maximize: bool) -> dict:
    """optimization_results.yaml's `top_two`: the two best trials on val accuracy with their 95% intervals, and
    whether those overlap (then the search cannot tell them apart on this validation split)."""
    from lora_cls.metrics.intervals import intervals_overlap

    ranked = sorted(complete, key=lambda t: -t.value if maximize else t.value)[:2]
    if len(ranked) < 2:
        return {}
    intervals = [[figures[t.number][f"val_accuracy_{e}"] for e in ("lo", "hi")] for t in ranked]
    overlap = intervals_overlap(*[None if None in i else i for i in intervals])
    if overlap is not None:
        log.info("optuna: the top two trials, %d (%.4f [%.4f, %.4f]) and %d (%.4f [%.4f, %.4f]), have %s 95%% "
                 "intervals of val accuracy%s", ranked[0].number, ranked[0].value, *intervals[0], ranked[1].number,
                 ranked[1].value, *intervals[1], "overlapping" if overlap else "separate",
                 ": the validation split cannot tell them apart" if overlap else "")
    return {"top_two": {"trials": [t.number for t in ranked], "val_accuracy": [float(t.value) for t in ranked],
                        "val_accuracy_ci": intervals, "intervals_overlap": overlap}}


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def checked_space(settings: SearchSettings, arguments: Sequence[str]) -> SearchSpace:
    """The search space, once the settings are checked and optuna is known to be installed (UserErrors)."""
    settings.check()
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("hydra/sweeper=optuna (sweep=search) needs the optuna package, which is not installed; "
                        "pip install 'lora-cls[search]' (or pip install optuna)") from None
    space = parse_space(settings.params, arguments, settings.ratios)
    if not space.distributions:
        raise UserError("hydra/sweeper=optuna: nothing to search; use sweep=search, or give ranges on the command "
                        "line, e.g. 'lora.rank=choice(4,8,16)' 'optimizer.lr=tag(log,interval(1e-4,1e-2))'")
    return space


def check_sweeper(sweeper: Any, arguments: Sequence[str]) -> None:
    """lora-train's check before Hydra starts: for this sweeper, the errors `run_search` would meet later."""
    from omegaconf import OmegaConf

    if sweeper is None or not str(sweeper.get("_target_", "")).endswith("lora_cls_search.optuna_sweeper.OptunaSweeper"):
        return
    values = {k: v for k, v in OmegaConf.to_container(sweeper, resolve=True).items() if k != "_target_"}
    unknown = sorted(set(values) - set(SearchSettings.__dataclass_fields__))
    if unknown:
        raise UserError(f"hydra.sweeper.{unknown[0]}: not a setting of hydra/sweeper=optuna; its settings are "
                        f"{', '.join(SearchSettings.__dataclass_fields__)}")
    checked_space(SearchSettings(**values), arguments)


def run_search(settings: SearchSettings, arguments: Sequence[str], sweep_dir: Path, launch: Launch) -> dict:
    """The whole search: check the settings, open (or continue) the study, run it, report."""
    space = checked_space(settings, arguments)
    study, storage = open_study(settings, sweep_dir)
    log.info("optuna: study %s in %s; %d of %d trials finished; searching %s", settings.study_name, storage,
             sum(t.state.is_finished() for t in study.trials), settings.n_trials, ", ".join(space.distributions))
    run_study(study, space, settings.n_trials, settings.n_jobs, launch)
    return report(study, storage, sweep_dir)
