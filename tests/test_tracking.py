"""The `logger=` group: what TensorBoard and MLflow hold after a run, read back with their own readers; resume
continues the same MLflow run without a repeated epoch; a missing package is a one-line user error."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from helpers import killed_in_second_epoch

from lora_cls.conf.checks import validate
from lora_cls.errors import UserError
from lora_cls.runs.resume import prepare_run_dir
from lora_cls.runs.tracking import TRACKING_JSON, history_scalars
from lora_cls.tasks.train import train

EPOCH_TAGS = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/balanced_accuracy", "val/macro_f1",
              "lr", "d", "images_per_second", "seconds"}
# the run is not what is tested here: a cheap one (two steps an epoch, one adapted layer, no BN recalibration)
CHEAP = ["trainer.epochs=2", "trainer.max_steps_per_epoch=2", "lora.bn=frozen", "lora.targets=[layer4.2.conv2]",
         "logger=[tensorboard,mlflow]"]
FINAL_TAGS = {f"final/{split}_{key}" for split in ("val", "test")
              for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc")} | {"final/best_epoch"}


def history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_events(run_dir, folder="tensorboard"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora-cls")
    return client, client.search_runs([experiment.experiment_id])


def test_history_row_becomes_train_val_and_plain_tags():
    row = {"epoch": 3, "step": 30, "lr": 1e-3, "d": 1.0, "train_loss": 0.5, "train_accuracy": 0.75,
           "val_loss": 0.4, "val_accuracy": 0.8, "val_roc_auc": None, "images_per_second": 100.0, "seconds": 2.5}
    assert history_scalars(row) == {"lr": 1e-3, "d": 1.0, "train/loss": 0.5, "train/accuracy": 0.75,
                                    "val/loss": 0.4, "val/accuracy": 0.8, "images_per_second": 100.0,
                                    "seconds": 2.5}


def test_only_the_process_that_writes_the_run_folder_logs(tmp_path):
    from omegaconf import OmegaConf

    from lora_cls.runs.tracking import Loggers

    settings = OmegaConf.create({"csv": {}, "tensorboard": {"dir": "tb"}, "mlflow": None})
    row = {"epoch": 1, "step": 5, "lr": 1e-3, "d": 1.0, "train_loss": 0.5, "val_accuracy": 0.75}
    metrics = {"epochs_run": 1, "best_epoch": 1, "val": {"accuracy": 0.75}, "test": {"accuracy": 0.5}}
    for rank, writes in ((1, False), (0, True)):
        loggers = Loggers(settings, tmp_path / f"rank{rank}", {"lora": {"rank": 8}}, writes)
        loggers.epoch(row)
        loggers.finish(metrics)
    assert not (tmp_path / "rank1").exists()
    events = tensorboard_events(tmp_path / "rank0", "tb")
    assert set(events.Tags()["scalars"]) == {"lr", "d", "train/loss", "val/accuracy", "final/val_accuracy",
                                             "final/test_accuracy", "final/best_epoch"}
    assert [(p.step, p.value) for p in events.Scalars("val/accuracy")] == [(1, 0.75)]


@pytest.mark.parametrize("logger, package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"),
                                             ("[tensorboard,mlflow]", "mlflow")])
def test_a_logger_whose_package_is_missing_is_a_user_error_naming_the_extra(compose_cfg, monkeypatch, logger,
                                                                            package):
    monkeypatch.setitem(sys.modules, package, None)  # import of it now fails, as when it is not installed
    with pytest.raises(UserError, match=rf"logger={package} needs the {package} package.*lora-cls\[tracking\]"):
        validate(compose_cfg(f"logger={logger}"))
    validate(compose_cfg("logger=csv"))  # the default needs nothing


@pytest.mark.slow
def test_tensorboard_and_mlflow_record_config_epochs_final_metrics_and_figures(tiny_overrides, compose_cfg,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default MLflow store is ./mlruns
    run_dir = tmp_path / "run"
    metrics = train(compose_cfg(*tiny_overrides, *CHEAP), run_dir)
    rows = history(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    events = tensorboard_events(run_dir)
    assert set(events.Tags()["scalars"]) == EPOCH_TAGS | FINAL_TAGS
    for tag, column in (("val/accuracy", "val_accuracy"), ("train/loss", "train_loss"), ("lr", "lr")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)
    assert events.Scalars("final/test_accuracy")[0].value == pytest.approx(metrics["test"]["accuracy"])
    assert events.Scalars("final/val_accuracy")[0].value == pytest.approx(metrics["val"]["accuracy"])
    assert set(events.Tags()["images"]) == {"val/confusion_matrix", "test/confusion_matrix", "curves"}
    assert events.Images("curves")[0].height > 100
    assert "config/text_summary" in events.Tags()["tensors"]
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                         "_hparams_/session_end_info"}
    assert "rank: 8" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora.rank"] == "8" and run.data.params["trainer.epochs"] == "2"
    assert run.data.params["dataset.image_size"] == "32"
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    val = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [(m.step, m.value) for m in val] == [(int(r["epoch"]), pytest.approx(float(r["val_accuracy"])))
                                                for r in rows]
    artifacts = {a.path for folder in ("", "reports/val", "reports/test", "plots")
                 for a in client.list_artifacts(run.info.run_id, folder or None) if not a.is_dir}
    assert {"metrics.json", "history.csv", "plots/curves.png", "reports/val/confusion_matrix.png",
            "reports/test/confusion_matrix.png", "reports/test/classification_report.txt"} <= artifacts
    local = tmp_path / "mlruns" / "artifacts" / run.info.run_id / "artifacts" / "metrics.json"
    assert json.loads(local.read_text()) == json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / TRACKING_JSON).read_text())["mlflow"]["run_id"] == run.info.run_id


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_without_a_repeated_epoch(
        tiny_overrides, compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(*tiny_overrides, *CHEAP)
    killed_in_second_epoch(monkeypatch, lambda: train(cfg, tmp_path / "run"))
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    # the loggers may change on resumption (they change nothing computed)
    assert prepare_run_dir(compose_cfg(*tiny_overrides, *CHEAP[:-1], "logger=csv"), tmp_path / "run") is not None

    train(cfg, tmp_path / "run")  # trainer.resume=auto: continues from last.pt
    client, resumed = mlflow_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in resumed] == [(runs[0].info.run_id, "FINISHED")]
    rows = history(tmp_path / "run")
    val = client.get_metric_history(runs[0].info.run_id, "val/accuracy")
    assert [(m.step, m.value) for m in val] == [(int(r["epoch"]), pytest.approx(float(r["val_accuracy"])))
                                                for r in rows]
    events = tensorboard_events(tmp_path / "run")
    assert [(p.step, p.value) for p in events.Scalars("val/accuracy")] == [
        (int(r["epoch"]), pytest.approx(float(r["val_accuracy"]), rel=1e-6)) for r in rows]
    assert len(events.Tensors("config/text_summary")) == 1
