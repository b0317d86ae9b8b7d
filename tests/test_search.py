"""The Optuna search (`lora-train -m sweep=search`): the search space from Hydra's sweep syntax, failed trials
counted as failed, a study that continues where it stopped, and the best trial chosen on validation."""

from __future__ import annotations

import csv
import json
import sys

import optuna
import pytest
import yaml
from conftest import path_value

from lora_cls.errors import UserError
from lora_cls.runs.summary import write_sweep_summary
from lora_cls.tasks.search import RESULTS, TRIALS, SearchSettings, parse_space, run_search

PRESET = {"optimizer.lr": "tag(log, interval(1e-4, 3e-2))", "lora.rank": "choice(2, 4, 8, 16, 32)",
          "lora.alpha": "choice(0.5, 1, 2, 4)", "lora.dropout": "interval(0.0, 0.3)"}


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


class FakeLaunch:
    """Stands in for Hydra's launcher: a value per job from its overrides (None: the job failed), a job folder
    with metrics.json as lora-train writes it."""

    def __init__(self, sweep_dir, value):
        self.sweep_dir, self.value, self.jobs = sweep_dir, value, []

    def __call__(self, overrides: list[list[str]], first_job: int):
        results = []
        for number, job in enumerate(overrides, first_job):
            self.jobs.append((number, overrides_dict(job)))
            value = self.value(overrides_dict(job))
            folder = self.sweep_dir / str(number)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".hydra").mkdir(exist_ok=True)
            (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job))
            val, test = (None, None) if value is None else value
            (folder / "metrics.json").write_text(json.dumps(
                {"status": "ok" if value is not None else "failed", "val": {"accuracy": val},
                 "test": {"accuracy": test}}))
            results.append((val, str(folder)))
        return results


def study(sweep_dir):
    return optuna.load_study(study_name="lora-cls", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def test_the_preset_space_samples_alpha_as_a_multiple_of_the_rank():
    space = parse_space(PRESET, ["trainer.epochs=3"], {"lora.alpha": "lora.rank"})
    d = space.distributions
    assert set(d) == {"optimizer.lr", "lora.rank", "lora.alpha/lora.rank", "lora.dropout"}
    assert (d["optimizer.lr"].low, d["optimizer.lr"].high, d["optimizer.lr"].log) == (1e-4, 3e-2, True)
    assert d["lora.rank"].choices == (2, 4, 8, 16, 32)
    assert (d["lora.dropout"].low, d["lora.dropout"].high, d["lora.dropout"].log) == (0.0, 0.3, False)
    job = space.overrides({"optimizer.lr": 0.001, "lora.rank": 16, "lora.alpha/lora.rank": 0.5,
                           "lora.dropout": 0.1})
    assert job == ["trainer.epochs=3", "optimizer.lr=0.001", "lora.rank=16", "lora.alpha=8.0", "lora.dropout=0.1"]


def test_the_command_line_replaces_a_range_or_fixes_a_key():
    space = parse_space(PRESET, ["lora.rank=choice(4,8)", "lora.dropout=0.0", "trainer.epochs=tag(int,interval(1,3))"],
                        {"lora.alpha": "lora.rank"})
    assert space.distributions["lora.rank"].choices == (4, 8)
    assert "lora.dropout" not in space.distributions and "lora.dropout=0.0" in space.fixed
    assert (space.distributions["trainer.epochs"].low, space.distributions["trainer.epochs"].high) == (1, 3)
    # a fixed rank is the base of a sampled ratio too
    fixed = parse_space({"lora.alpha": "choice(2)"}, ["lora.rank=4"], {"lora.alpha": "lora.rank"})
    assert fixed.overrides({"lora.alpha/lora.rank": 2}) == ["lora.rank=4", "lora.alpha=8.0"]
    # a fixed alpha is no longer a ratio
    assert parse_space(PRESET, ["lora.alpha=16"], {"lora.alpha": "lora.rank"}).overrides(
        {"lora.rank": 2})[:2] == ["lora.alpha=16", "lora.rank=2"]


def test_a_ratio_without_its_base_is_a_user_error():
    with pytest.raises(UserError, match="lora.alpha is sampled as a multiple of lora.rank"):
        parse_space({"lora.alpha": "choice(1,2)"}, [], {"lora.alpha": "lora.rank"})


@pytest.mark.parametrize("args, message", [
    (["hydra.sweeper.sampler=cmaes"], "hydra.sweeper.sampler: must be one of tpe, random"),
    (["+hydra.sweeper.n_trial=3"], "hydra.sweeper.n_trial: not a setting"),
    (["hydra/sweeper=optuna"], "nothing to search"),
    (["hydra.sweeper.params={lora.rank: 'choice(2,4)', optimizer.lr: 'interval(1e-3)'}"], "hydra.sweeper.params"),
])
def test_search_settings_are_checked_before_the_sweep_starts(args, message, tmp_path):
    from lora_cls.cli.precheck import precheck
    from lora_cls.conf.checks import validate

    command = ["-m", "sweep=search" if args[0] != "hydra/sweeper=optuna" else "lora.rank=8", *args,
               f"hydra.sweep.dir={path_value(tmp_path / 'sweep')}"]
    with pytest.raises(UserError, match=message):
        precheck(command, "train", validate)
    assert not (tmp_path / "sweep").exists()


def test_a_search_without_optuna_installed_is_a_user_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails, as when it is not installed
    with pytest.raises(UserError, match=r"needs the optuna package.*pip install 'lora-cls\[search\]'"):
        run_search(SearchSettings(params=PRESET, ratios={"lora.alpha": "lora.rank"}), [], tmp_path, None)


def test_failed_trials_are_counted_as_failed_and_the_study_goes_on(tmp_path):
    launch = FakeLaunch(tmp_path, lambda job: None if job["lora.rank"] == "4" else (int(job["lora.rank"]) / 100, 0.5))
    settings = SearchSettings(n_trials=8, sampler="random", params={"lora.rank": "choice(4,8)"})
    results = run_search(settings, [], tmp_path, launch)
    states = {t.number: t.state.name for t in study(tmp_path).trials}
    assert len(states) == 8
    assert {n for n, s in states.items() if s == "FAIL"} == {n for n, job in launch.jobs if job["lora.rank"] == "4"}
    assert 0 < results["trials"]["fail"] < 8 and results["trials"]["complete"] == 8 - results["trials"]["fail"]
    assert results["best_params"] == {"lora.rank": 8} and results["best_value"] == 0.08


def test_a_study_continues_to_n_trials_and_reruns_the_trial_an_interruption_left(tmp_path):
    settings = SearchSettings(n_trials=2, params={"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"})
    launch = FakeLaunch(tmp_path, lambda job: (float(job["optimizer.lr"]), 0.0))
    run_search(settings, ["trainer.epochs=1"], tmp_path, launch)
    # A process killed in trial 2 leaves it RUNNING in the storage, with its parameters.
    left = study(tmp_path).ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    launch.jobs.clear()
    settings.n_trials = 4
    run_search(settings, ["trainer.epochs=1"], tmp_path, launch)
    assert [n for n, _ in launch.jobs] == [2, 3]  # the interrupted trial first, in its own job folder
    assert float(launch.jobs[0][1]["optimizer.lr"]) == left.params["optimizer.lr"]
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.params["optimizer.lr"] for t in trials}) == 4  # the continued sampler does not repeat draws
    with open(tmp_path / TRIALS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["state"], r["run_dir"]) for r in rows] == [
        (str(n), "complete", str(tmp_path / str(n))) for n in range(4)]


def test_the_best_trial_is_chosen_on_validation_and_reports_its_test_accuracy_beside(tmp_path):
    # validation and test disagree on purpose: the higher the validation accuracy, the lower the test accuracy
    launch = FakeLaunch(tmp_path, lambda job: (float(job["lora.dropout"]), 1 - float(job["lora.dropout"])))
    settings = SearchSettings(n_trials=5, sampler="random", params={"lora.dropout": "interval(0.0, 0.9)"})
    results = run_search(settings, [], tmp_path, launch)
    dropouts = {n: float(job["lora.dropout"]) for n, job in launch.jobs}
    best = max(dropouts, key=dropouts.get)
    assert (results["best_trial"], results["best_value"]) == (best, dropouts[best])
    assert results["best_test_accuracy"] == 1 - dropouts[best] == min(1 - v for v in dropouts.values())
    assert yaml.safe_load((tmp_path / RESULTS).read_text())["best_params"] == {"lora.dropout": dropouts[best]}


def test_an_unknown_sampler_or_an_empty_space_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="hydra.sweeper.sampler"):
        run_search(SearchSettings(sampler="cmaes", params={"lora.rank": "choice(2,4)"}), [], tmp_path, None)
    with pytest.raises(UserError, match="nothing to search"):
        run_search(SearchSettings(), ["lora.rank=4"], tmp_path, None)


@pytest.mark.slow
def test_lora_train_search_runs_continues_and_picks_on_validation(run_cli, tiny_overrides, tmp_path):
    sweep_dir = tmp_path / "search"
    command = ["-m", "sweep=search", *tiny_overrides, "trainer.max_steps_per_epoch=2", "lora.rank=choice(2,4)",
               "lora.bn=frozen", "lora.targets=[layer4.2.conv2]",  # a cheaper trial: the study is what is tested
               f"hydra.sweep.dir={path_value(sweep_dir)}"]
    first = run_cli("lora-train", *command, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [t.state.name for t in study(sweep_dir).trials] == ["COMPLETE", "COMPLETE"]
    assert (sweep_dir / "summary.csv").is_file()
    # an interruption in trial 2 leaves it running in the storage; the same command (three trials) finishes it
    searched = study(sweep_dir).trials[0].distributions
    left = study(sweep_dir).ask(searched)
    assert set(searched) == {"optimizer.lr", "lora.rank", "lora.alpha/lora.rank", "lora.dropout"}
    second = run_cli("lora-train", *command, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = study(sweep_dir).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    job2 = yaml.safe_load((sweep_dir / "2" / ".hydra" / "overrides.yaml").read_text())
    assert f"lora.rank={left.params['lora.rank']}" in job2
    alpha = float(left.params["lora.alpha/lora.rank"]) * left.params["lora.rank"]
    assert f"lora.alpha={alpha!r}" in job2
    for t in trials:  # each trial's value is its job's validation accuracy
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        assert t.value == metrics["val"]["accuracy"]
    results = yaml.safe_load((sweep_dir / RESULTS).read_text())
    assert results["best_value"] == max(t.value for t in trials)
    assert results["trials"] == {"complete": 3, "fail": 0, "running": 0}
    assert "optuna: best trial" in second.stderr + second.stdout
    rows = write_sweep_summary(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1", "2"] and all(r["status"] == "ok" for r in rows)


def test_the_report_gives_each_trial_its_intervals_and_says_whether_the_top_two_overlap(tmp_path):
    class WithIntervals(FakeLaunch):
        def __call__(self, overrides, first_job):
            results = super().__call__(overrides, first_job)
            for val, folder in results:
                metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
                metrics["val"]["ci"] = {"accuracy": [val - 0.05, val + 0.05]}
                metrics["test"]["ci"] = {"accuracy": [0.7, 0.9]}
                (tmp_path / folder / "metrics.json").write_text(json.dumps(metrics))
            return results

    values = iter([0.9, 0.5, 0.88])  # trials 0 and 2 are the top two, 0.02 apart: their intervals overlap
    launch = WithIntervals(tmp_path, lambda job: (next(values), 0.8))
    settings = SearchSettings(n_trials=3, sampler="random", params={"lora.dropout": "interval(0.0, 0.3)"})
    results = run_search(settings, [], tmp_path, launch)
    top = results["top_two"]
    assert (top["trials"], top["val_accuracy"], top["intervals_overlap"]) == ([0, 2], [0.9, 0.88], True)
    assert top["val_accuracy_ci"] == [pytest.approx([0.85, 0.95]), pytest.approx([0.83, 0.93])]
    with open(tmp_path / TRIALS, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_accuracy_lo"]) for r in rows] == pytest.approx([0.85, 0.45, 0.83])
    assert [float(r["test_accuracy_hi"]) for r in rows] == [0.9, 0.9, 0.9]
