"""The config tree composes to the documented values; bad values fail early, naming their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import train_cfg
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import lora_cls.conf
from lora_cls.conf.checks import validate, validate_eval
from lora_cls.conf.load import flatten, schema_defaults, stored_train_config
from lora_cls.errors import UserError

RESNET34_PRESET = ["layer3.*.conv1", "layer3.*.conv2", "layer4.*.conv1", "layer4.*.conv2"]


def select(cfg, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


# (group, option, {dotted key: value after `group=option`}); every option of every group is here.
GROUP_CASES = [
    ("dataset", "synthetic", {"dataset.name": "synthetic", "dataset.root": "data/synthetic",
                              "dataset.image_size": 64, "dataset.synthetic.num_per_class": 300,
                              "dataset.synthetic.source_size": 64, "dataset.positive_class": None,
                              "dataset.augment.preset": "microscopy", "dataset.fit": "crop"}),
    ("dataset", "folder", {"dataset.name": "folder", "dataset.image_size": 224, "dataset.val_fraction": 0.15,
                           "dataset.augment.preset": "light", "dataset.fit": "crop"}),
    ("dataset", "smoking", {"dataset.name": "smoking", "dataset.root": "data/smoking", "dataset.image_size": 224,
                            "dataset.positive_class": "smoking", "dataset.augment.preset": "natural"}),
    ("dataset", "malaria", {"dataset.name": "malaria", "dataset.root": "data/malaria", "dataset.image_size": 128,
                            "dataset.val_fraction": 0.1, "dataset.test_fraction": 0.1,
                            "dataset.positive_class": "Parasitized", "dataset.augment.preset": "microscopy"}),
    ("model", "resnet34", {"model.name": "resnet34", "model.weights": "imagenet"}),
    ("model", "vgg16", {"model.name": "vgg16", "model.weights": "imagenet"}),
    ("lora", "default", {"lora.rank": 8, "lora.alpha": 8.0, "lora.dropout": 0.0, "lora.rslora": False,
                         "lora.init": "kaiming", "lora.targets": None, "lora.bn": "train"}),
    ("schedule", "none", {"schedule.kind": "none", "schedule.start": 0.1, "schedule.end": 0.9,
                          "schedule.d_min": 0.0, "schedule.noise_cutoff": 0.3}),
    ("schedule", "decay", {"schedule.kind": "decay", "schedule.start": 0.1, "schedule.end": 0.9,
                           "schedule.d_min": 0.0}),
    ("schedule", "decay_noise", {"schedule.kind": "decay_noise", "schedule.noise_cutoff": 0.3,
                                 "schedule.noise_per_channel": False}),
    ("optimizer", "adamw", {"optimizer.name": "adamw", "optimizer.lr": None, "optimizer.weight_decay": 1e-4,
                            "optimizer.betas": [0.9, 0.999], "optimizer.warmup_fraction": 0.05}),
    ("optimizer", "sgd", {"optimizer.name": "sgd", "optimizer.lr": 1e-2, "optimizer.momentum": 0.9,
                          "optimizer.nesterov": True}),
    ("trainer", "default", {"trainer.epochs": "auto", "trainer.batch_size": 32, "trainer.eval_batch_size": None,
                            "trainer.precision": "auto", "trainer.device": "auto", "trainer.seed": 0,
                            "trainer.early_stopping.monitor": "val_accuracy", "trainer.early_stopping.patience": "auto",
                            "trainer.resume": "auto"}),
    ("experiment", "demo", {"dataset.name": "synthetic", "dataset.image_size": 32, "model.name": "resnet34",
                            "model.weights": None, "trainer.epochs": 6, "trainer.batch_size": 32,
                            "optimizer.lr": 3e-3, "lora.rank": 8, "lora.targets": None, "schedule.kind": "none"}),
    ("experiment", "smoking_resnet34", {"dataset.name": "smoking", "dataset.image_size": 224, "model.name": "resnet34",
                                        "model.weights": "imagenet", "optimizer.name": "adamw", "optimizer.lr": 1e-4,
                                        "optimizer.weight_decay": 1e-4, "trainer.epochs": 15,
                                        "trainer.batch_size": 32, "trainer.early_stopping.patience": 15,
                                        "lora.rank": 8, "lora.alpha": 8.0, "lora.targets": RESNET34_PRESET,
                                        "dataset.augment.rotation": 10.0, "dataset.augment.color_jitter": 0.2,
                                        "dataset.augment.preset": "light", "dataset.fit": "squash"}),
    ("experiment", "malaria_vgg16", {"dataset.name": "malaria", "dataset.image_size": 128, "model.name": "vgg16",
                                     "model.weights": "imagenet", "optimizer.lr": 1e-4, "trainer.epochs": 10,
                                     "lora.rank": 5, "lora.alpha": 5.0,
                                     "lora.targets": ["features.24", "features.26", "features.28"],
                                     "dataset.augment.preset": "light", "dataset.fit": "squash"}),
    # sweep=rank only sets hydra.sweeper.params (tested in test_scaleout.py); the job config is the default
    ("sweep", "rank", {"lora.rank": 8, "model.name": "resnet34"}),
    # sweep=search sets hydra.sweeper (the Optuna search, tested in test_search.py); the job config is the default
    ("sweep", "search", {"lora.rank": 8, "optimizer.lr": None, "logger.csv": {}}),
    ("logger", "csv", {"logger.csv": {}, "logger.tensorboard": None, "logger.mlflow": None}),
    ("logger", "tensorboard", {"logger.tensorboard": {"dir": "tensorboard"}, "logger.mlflow": None}),
    ("logger", "mlflow", {"logger.mlflow": {"tracking_uri": None, "experiment": "lora-cls", "run_name": None},
                          "logger.tensorboard": None}),
]


@pytest.mark.parametrize("group, option, expected", GROUP_CASES, ids=[f"{g}={o}" for g, o, _ in GROUP_CASES])
def test_every_group_option_composes_to_its_values(compose_cfg, group, option, expected):
    # dataset=folder is complete only with the user's root (tested on its own below)
    extra = ["dataset.root=/data/pets"] if (group, option) == ("dataset", "folder") else []
    cfg = compose_cfg(f"{group}={option}", *extra)
    got = {key: select(cfg, key) for key in expected}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == expected
    validate(cfg)  # every shipped option is a valid config


def test_group_cases_cover_every_option_of_every_group():
    conf = Path(lora_cls.conf.__file__).parent
    on_disk = {(d.name, f.stem) for d in conf.iterdir() if d.is_dir() and not d.name.startswith("_")
               for f in d.glob("*.yaml")}
    assert on_disk == {(g, o) for g, o, _ in GROUP_CASES}


def test_defaults_are_the_offline_synthetic_resnet34_lora_run(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.dataset.name, cfg.model.name, cfg.schedule.kind, cfg.optimizer.name) == (
        "synthetic", "resnet34", "none", "adamw")
    assert cfg.finetune == "lora"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (8, 8.0, None)
    validate(cfg)


GROUPS_OVER_THE_TRAIN_SCHEMA = ("dataset", "model", "lora", "schedule", "optimizer", "trainer")
IDENTITY_KEYS = {"name", "kind"}  # what names the option itself may equal the default (model=resnet34)


@pytest.mark.parametrize("group", GROUPS_OVER_THE_TRAIN_SCHEMA)
def test_group_options_hold_only_what_differs_from_the_schema(group):
    """Every default is written once, in the schema: a group option that repeats one would be a second copy."""
    import yaml

    defaults = schema_defaults()
    for path in sorted((Path(lora_cls.conf.__file__).parent / group).glob("*.yaml")):
        values = flatten(yaml.safe_load(path.read_text()) or {}, f"{group}.")
        repeated = [k for k, v in values.items() if k in defaults and defaults[k] == v
                    and k.rsplit(".", 1)[-1] not in IDENTITY_KEYS]
        assert not repeated, f"{path.name} repeats schema defaults: {repeated}"
        assert all(k in defaults for k in values), f"{path.name}: keys outside the schema"


def test_a_stored_config_without_a_key_reads_it_as_the_schema_default():
    # An older checkpoint or last.pt lacking a key is read with the schema's default. alpha follows rank in the
    # schema too: a rank-4 file stored without alpha keeps s = 1.
    assert stored_train_config({"lora": {"rank": 4}}, "test").lora.alpha == 4.0
    assert stored_train_config({"lora": {"rank": 4, "alpha": 16}}, "test").lora.alpha == 16.0
    assert stored_train_config({}, "test").dataset.cache.max_gb == schema_defaults()["dataset.cache.max_gb"]


def test_command_line_overrides_win_over_the_experiment(compose_cfg):
    cfg = compose_cfg("experiment=smoking_resnet34", "trainer.epochs=3", "lora.rank=4", "optimizer=sgd")
    assert cfg.trainer.epochs == 3
    assert cfg.lora.rank == 4
    assert cfg.optimizer.name == "sgd"
    assert cfg.optimizer.lr == 1e-4  # the experiment's lr still applies on top of the chosen optimizer
    assert cfg.dataset.name == "smoking"


@pytest.mark.parametrize("overrides, alpha", [
    ([], 8.0),
    (["lora.rank=4"], 4.0),
    (["lora.rank=16"], 16.0),
    (["experiment=malaria_vgg16"], 5.0),
    (["experiment=malaria_vgg16", "lora.rank=2"], 2.0),
    (["lora.rank=4", "lora.alpha=16"], 16.0),
])
def test_alpha_follows_rank_unless_set(compose_cfg, overrides, alpha):
    cfg = compose_cfg(*overrides)
    assert cfg.lora.alpha == alpha
    assert isinstance(cfg.lora.alpha, float)


def test_folder_dataset_requires_a_root(compose_cfg):
    cfg = compose_cfg("dataset=folder")
    with pytest.raises(UserError, match=r"dataset\.root: is required for dataset=folder"):
        validate(cfg)


# -- type errors: at composition, naming the key ------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("trainer.batch_size=abc", "trainer.batch_size"),
    ("trainer.min_steps=2.5", "trainer.min_steps"),
    ("lora.rank=eight", "lora.rank"),
    ("lora.rslora=maybe", "lora.rslora"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("lora.rnak=4", "lora.rnak"),
    ("trainer.early_stoping.patience=3", "trainer.early_stoping"),
])
def test_type_errors_fail_at_composition_naming_the_key(compose_cfg, override, key):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_cfg(override)
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert key in " ".join(chain)


def test_unknown_group_option_fails_at_composition(compose_cfg):
    with pytest.raises(HydraException, match="dataset/imagenet"):
        compose_cfg("dataset=imagenet")


@pytest.mark.parametrize("override, key", [("+lora.rnk=4", "lora.rnk"), ("++foo=1", "foo"),
                                           ("+dataset.synthetic.sed=1", "dataset.synthetic.sed")])
def test_a_key_added_with_plus_that_lora_cls_does_not_read_is_refused(compose_cfg, override, key):
    cfg = compose_cfg(override)  # Hydra lets `+` add any key; training would silently ignore it
    with pytest.raises(UserError, match=rf"^{key}: is not a lora-cls setting"):
        validate(cfg)
    validate(compose_cfg("++lora.rank=4"))  # `++` on a key that exists only sets it


# -- value errors: in validate, message starts with the key --------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("lora.rank=0", "lora.rank"),
    ("lora.rank=-3", "lora.rank"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("lora.dropout=-0.1", "lora.dropout"),
    ("lora.init=zeros", "lora.init"),
    ("lora.bn=eval", "lora.bn"),
    ("lora.targets=[]", "lora.targets"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.name=lion", "optimizer.name"),
    ("optimizer.weight_decay=-1e-4", "optimizer.weight_decay"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.epochs=2.5", "trainer.epochs"),
    ("trainer.epochs=forever", "trainer.epochs"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.lr_lora=0", "optimizer.lr_lora"),
    ("optimizer.lora_b_lr_ratio=0", "optimizer.lora_b_lr_ratio"),
    ("dataset.augment.preset=strong", "dataset.augment.preset"),
    ("dataset.fit=stretch", "dataset.fit"),
    ("dataset.crop_pct=1.5", "dataset.crop_pct"),
    ("model.preprocess=timm", "model.preprocess"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.early_stopping.monitor=foo", "trainer.early_stopping.monitor"),
    ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience"),
    ("dataset.val_fraction=1.5", "dataset.val_fraction"),
    ("dataset.test_fraction=-0.1", "dataset.test_fraction"),
    ("dataset.image_size=8", "dataset.image_size"),
    ("dataset.name=imagenet", "dataset.name"),
    ("finetune=partial", "finetune"),
    ("schedule.kind=linear", "schedule.kind"),
    ("schedule.d_min=1.5", "schedule.d_min"),
])
def test_bad_values_fail_validation_naming_the_key(compose_cfg, override, key):
    cfg = compose_cfg(override)  # the type is right, so composition succeeds
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{key}:")


def test_fractions_that_leave_no_training_data_are_rejected(compose_cfg):
    with pytest.raises(UserError, match=r"^dataset\.val_fraction"):
        validate(compose_cfg("dataset.val_fraction=0.5", "dataset.test_fraction=0.5"))


@pytest.mark.parametrize("override, key", [("split=train2", "split"), ("precision=fp8", "precision"),
                                           ("batch_size=0", "batch_size")])
def test_eval_config_bad_values_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg("ckpt=run", override, config_name="eval")
    with pytest.raises(UserError) as info:
        validate_eval(cfg)
    assert str(info.value).startswith(f"{key}:")


def test_unknown_model_name_fails_validation_naming_the_key():
    with pytest.raises(UserError, match="model.name: unknown torchvision model 'resnet99'"):
        validate(train_cfg("model.name=resnet99"))


# -- property tests --------------------------------------------------------------------------------------


VALUES = st.one_of(st.integers(-5, 50), st.floats(-2, 2, allow_nan=False), st.sampled_from(
    ["auto", "bf16", "32", "16", "fp8", "adamw", "sgd", "x", "none", "decay", "val_loss"]))


KEYS = ["lora.rank", "lora.alpha", "lora.dropout", "optimizer.lr", "optimizer.weight_decay", "trainer.epochs",
        "trainer.batch_size", "trainer.precision", "dataset.val_fraction", "dataset.image_size",
        "schedule.kind", "schedule.start", "schedule.d_min", "optimizer.name", "trainer.early_stopping.monitor",
        "finetune", "lora.init", "lora.bn"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=4))
def test_random_config_values_validate_or_fail_with_a_user_error(values):
    from lora_cls.cli.precheck import precheck

    overrides = [f"{k}={v}" for k, v in values.items()]
    try:
        precheck(overrides, "train", validate)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)


def test_a_batch_of_one_is_refused_where_batchnorm_sees_1x1_maps(compose_cfg):
    with pytest.raises(UserError) as info:
        validate(compose_cfg("experiment=demo", "trainer.batch_size=1"))  # resnet34 at 32 px: layer4 is 1x1
    message = str(info.value)
    assert message.startswith("trainer.batch_size: 1 is too small for resnet34 at 32 px")
    assert "trainer.batch_size=2" in message and "lora.bn=frozen" in message
    validate(compose_cfg("experiment=demo", "trainer.batch_size=1", "dataset.image_size=64"))  # 2x2 maps: fine
    validate(compose_cfg("experiment=demo", "trainer.batch_size=1", "lora.bn=frozen"))  # BN in eval mode: fine


def test_a_rank_that_reaches_a_layers_full_rank_is_refused_unless_allowed(compose_cfg):
    with pytest.raises(UserError) as info:
        validate(compose_cfg("model.weights=null", "lora.rank=1000"))
    message = str(info.value)
    assert message.startswith("lora.rank: 1000 reaches the full rank of 18 adapted layer(s)")  # all of the preset
    assert "min(out, in·k·k) = 256" in message and "lora.rank=255 or less" in message
    assert "lora.allow_high_rank=true" in message
    validate(compose_cfg("model.weights=null", "lora.rank=255"))
    validate(compose_cfg("model.weights=null", "lora.rank=1000", "lora.allow_high_rank=true"))
    validate(compose_cfg("model.weights=null", "lora.rank=1000", "finetune=full"))  # no adapters, no limit
