"""The CLI's checks before Hydra starts (precheck, sweep folders, override parsing) and its Ctrl-C handling."""

from __future__ import annotations

import pytest
from hydra import initialize_config_module

from lora_cls.cli.common import main_with_errors
from lora_cls.cli.interrupt import caused_by_interrupt, interrupted
from lora_cls.cli.precheck import check_sweep_dir, precheck
from lora_cls.conf.checks import validate, validate_eval
from lora_cls.conf.load import register_configs
from lora_cls.conf.overrides import override_value, override_variants
from lora_cls.errors import UserError

# -- the CLI's precheck --------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _schemas_registered():
    register_configs()  # main_with_errors does this before precheck; these tests call precheck directly


@pytest.mark.parametrize("argv, key", [
    (["trainer.batch_size=abc"], "trainer.batch_size"),
    (["lora.rnak=4"], "lora.rnak"),
    (["-m", "lora.rank=2,x"], "lora.rank"),
    (["dataset=imagenet"], "dataset"),
    (["-m", "sweep=rank", "hydra.sweeper.params.lora.rank=2,4"], "hydra.sweeper.params.lora.rank"),
    (["-m", "hydra.sweepr.x=1"], "hydra.sweepr"),
])
def test_precheck_turns_composition_errors_into_user_errors(argv, key):
    with pytest.raises(UserError) as info:
        precheck(argv, "train", validate)
    message = str(info.value)
    assert message.startswith("invalid config: ")
    assert key in message
    assert "\n" not in message  # one line on stderr


@pytest.mark.parametrize("argv", [["lora.rank=0"], ["-m", "lora.rank=4,0"], ["--multirun", "lora.rank=0,4"],
                                  ["-m", "trainer.epochs=3", "lora.rank=4,8", "lora.dropout=0.1,1.0"]])
def test_precheck_validates_every_value_of_a_sweep(argv):
    with pytest.raises(UserError, match=r"^lora\.(rank|dropout):"):
        precheck(argv, "train", validate)


@pytest.mark.parametrize("argv, message", [
    (["lora.targets=[layer9]"], r"target pattern 'layer9' matches no module; nearby valid names: layer4\.2\.conv2"),
    (["lora.targets=[fc]"], r"selects fc, the new classification head"),
    (["-m", "lora.targets=[layer4],[bn1]"], r"selects bn1 \(BatchNorm2d\), which holds no layer LoRA supports"),
    (["model=vgg16", "lora.targets=[layer4]"], r"'layer4' matches no module; nearby valid names: classifier"),
])
def test_precheck_resolves_lora_targets_before_any_data_or_folder(argv, message):
    with pytest.raises(UserError, match=message):
        precheck(argv, "train", validate)
    precheck(["finetune=full", "lora.targets=[layer9]"], "train", validate)  # targets unused without LoRA


def test_precheck_accepts_good_overrides_and_skips_help():
    precheck(["-m", "sweep=rank", "hydra/launcher=local", "lora.rank=1,2"], "train", validate)
    precheck(["lora.rank=4", "schedule=decay_noise", "hydra.run.dir=/nonexistent/x"], "train", validate)
    precheck(["-m", "lora.rank=2,4,8", "optimizer=adamw,sgd"], "train", validate)
    precheck(["--help", "lora.rank=0"], "train", validate)
    precheck(["--cfg", "job", "lora.rank=0"], "train", validate)


@pytest.mark.parametrize("finished", [True, False])
def test_precheck_refuses_a_run_dir_that_holds_a_run(tmp_path, finished):
    from lora_cls.runs.resume import prepare_run_dir  # what lora-train passes as check_run_dir

    (tmp_path / "metrics.json").write_text('{"status": "ok"}' if finished else "{}")
    if finished:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(UserError) as info:
        precheck([f"hydra.run.dir={tmp_path}"], "train", validate, check_run_dir=prepare_run_dir)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("argv, config_name, last", [
    (["-m", "lora.rank=2,4", "hydra.sweep.dir=/s", "hydra/launcher=local"], "train",
     "lora-train -m lora.rank=2,4 hydra/launcher=local hydra.sweep.dir=/s"),
    (["lora.rank=2"], "train", "interrupted."),
    (["ckpt=/r"], "eval", "interrupted."),
])
def test_ctrl_c_outside_any_job_exits_130_without_a_traceback(monkeypatch, capsys, argv, config_name, last):
    # With the joblib launcher the jobs run in workers: Ctrl-C reaches the waiting parent, not run_job.
    monkeypatch.setattr("sys.argv", ["lora-train", *argv])
    monkeypatch.setattr("lora_cls.cli.common.precheck", lambda *args, **kwargs: None)
    monkeypatch.setattr("lora_cls.cli.common.signal.signal", lambda *args: None)  # leave pytest's handlers alone

    def waiting_launcher() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        main_with_errors(waiting_launcher, config_name, validate)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].strip() == last


def test_a_sweep_folder_is_new_or_holds_this_same_sweep_interrupted(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    overrides = ["experiment=demo", "lora.rank=2,4"]
    check_sweep_dir(sweep, overrides)  # does not exist yet
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="no readable multirun.yaml"):
        check_sweep_dir(sweep, overrides)
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - experiment=demo\n    - lora.rank=2,4\n")
    check_sweep_dir(sweep, overrides)  # the same sweep, interrupted: resumed
    assert "resuming the interrupted sweep" in capsys.readouterr().err
    with pytest.raises(UserError, match="its overrides were experiment=demo lora.rank=2,4.*same order"):
        check_sweep_dir(sweep, list(reversed(overrides)))
    with pytest.raises(UserError, match="another sweep"):
        check_sweep_dir(sweep, ["experiment=demo", "lora.rank=8,16"])
    (sweep / "summary.csv").write_text("job\n")
    with pytest.raises(UserError, match="already holds a finished sweep"):
        check_sweep_dir(sweep, overrides)


def test_the_run_dir_hydra_uses_is_the_last_override_with_or_without_plus():
    assert override_value(["a=1", "hydra.run.dir=x", "++hydra.run.dir=y", "b=2"], "hydra.run.dir") == "y"
    assert override_value(["+hydra.run.dir=z"], "hydra.run.dir") == "z"
    assert override_value(["hydra.run.dirr=z", "hydra.run.dir"], "hydra.run.dir") is None


def test_an_interrupt_that_a_library_turned_into_its_own_error_is_still_an_interrupt():
    def save_interrupted():  # what torch.save does when Ctrl-C / SIGTERM lands inside its file write
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    with pytest.raises(RuntimeError) as info:
        save_interrupted()
    assert caused_by_interrupt(info.value)  # `from None` hides it from tracebacks, not from __context__
    assert caused_by_interrupt(KeyboardInterrupt())
    try:
        raise ValueError("outer") from RuntimeError("inner")
    except ValueError as exc:
        assert not caused_by_interrupt(exc)


@pytest.mark.parametrize("training, has_last, expected", [
    (True, True, "resume with:"),
    (True, False, "interrupted before the first checkpoint; nothing to resume"),
    (False, False, "interrupted."),
])
def test_interrupt_message_promises_only_what_is_there(tmp_path, capsys, training, has_last, expected):
    if has_last:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        interrupted(tmp_path, ["lora.rank=4", "++hydra.run.dir=elsewhere"], training=training)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert expected in err
    assert ("last.pt" in err) == has_last
    if has_last:  # the resume command names the folder once, the one that holds last.pt
        assert err.strip().splitlines()[-1].strip() == f"lora-train lora.rank=4 hydra.run.dir={tmp_path}"


def test_precheck_checks_eval_config():
    with pytest.raises(UserError, match=r"^split:"):
        precheck(["ckpt=x", "split=dev"], "eval", validate_eval)


@pytest.mark.parametrize("overrides, values", [
    (["lora.rank=2,4,8"], {"lora.rank": {"2", "4", "8"}}),
    (["lora.rank=range(2,5)"], {"lora.rank": {"2", "3", "4"}}),
    (["trainer.epochs=1", "lora.rank=2,4,8", "optimizer=adamw,sgd"],
     {"lora.rank": {"2", "4", "8"}, "optimizer": {"adamw", "sgd"}, "trainer.epochs": {"1"}}),
])
def test_override_variants_cover_every_sweep_value(overrides, values):
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        variants = override_variants(overrides, multirun=True)
    seen: dict[str, set[str]] = {}
    for variant in variants:
        assert len(variant) == len(overrides)
        for item in variant:
            key, _, value = item.partition("=")
            assert "," not in value and "(" not in value  # each variant is a single run's overrides
            seen.setdefault(key, set()).add(value)
    assert seen == values


def test_override_variants_leave_a_single_run_alone():
    assert override_variants(["lora.rank=2,4,8"], multirun=False) == [["lora.rank=2,4,8"]]


def test_glob_sweeps_are_expanded_and_checked():
    with initialize_config_module(config_module="lora_cls.conf", version_base="1.3"):
        variants = override_variants(["schedule=glob(*)"], multirun=True)
    assert sorted(v[0] for v in variants) == ["schedule=decay", "schedule=decay_noise", "schedule=none"]
    precheck(["-m", "schedule=glob(*)", "model.weights=null"], "train", validate)
    with pytest.raises(UserError, match="lora.rank"):
        precheck(["-m", "lora.rank=4,0"], "train", validate)


def test_a_non_ascii_path_error_shows_the_quoting_that_works(tmp_path):
    with pytest.raises(UserError) as info:
        precheck([f"dataset.root={tmp_path}/données"], "train", validate)
    message = str(info.value)
    assert message.startswith("invalid config: ") and "\n" not in message
    assert f"""'dataset.root="{tmp_path}/données"'""" in message
    precheck([f'dataset.root="{tmp_path}/données"', "model.weights=null"], "train", validate)  # the quoted form


def test_a_read_only_run_folder_is_an_error_before_hydra_makes_it(tmp_path, monkeypatch):
    import os

    from lora_cls.runs import folder as runfolder

    real_statvfs = os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(runfolder.os, "statvfs", lambda p: ReadOnly() if str(p).startswith(str(tmp_path))
                        else real_statvfs(p))
    target = tmp_path / "ro" / "run"
    with pytest.raises(UserError, match=rf"^cannot write the run folder {target}: read-only filesystem; choose a "
                                        r"writable hydra.run.dir"):
        precheck([f"hydra.run.dir={target}", "model.weights=null"], "train", validate)
    with pytest.raises(UserError, match=r"read-only filesystem; choose a writable hydra.sweep.dir"):
        precheck(["-m", f"hydra.sweep.dir={target}", "lora.rank=2,4"], "train", validate)
    assert not target.exists()
    precheck([f"hydra.run.dir={tmp_path.parent / 'elsewhere' / 'run'}", "model.weights=null"], "train", validate)


def test_environment_faults_become_one_line_with_what_to_do(tmp_path):
    import errno

    from lora_cls.cli.common import environment_fault
    from lora_cls.runs.folder import RunDir

    run = RunDir(tmp_path / "run")
    full = OSError(errno.ENOSPC, "No space left on device", str(run.history))
    assert environment_fault(full) == (f"the disk is full: could not write {run.history}; free space on that disk "
                                       "(or choose a run folder on another one)")
    run.last.parent.mkdir(parents=True)
    run.last.write_bytes(b"x")
    message = environment_fault(RuntimeError("wrapped").with_traceback(None), run.path, ["lora.rank=4"], True)
    assert message is None  # not an environment fault
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = full
    message = environment_fault(wrapped, run.path, ["lora.rank=4"], training=True)
    assert f"{run.last} (the last completed epoch) is intact: resume with lora-train lora.rank=4 " \
           f"hydra.run.dir={run.path}" in message
    assert "too many open files" in environment_fault(OSError(errno.EMFILE, "Too many open files"))
    assert "permission denied" in environment_fault(OSError(errno.EACCES, "Permission denied", "/x"))
    assert environment_fault(OSError(errno.ENOENT, "No such file")) is None
