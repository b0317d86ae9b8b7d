"""Shared fixtures for the config and end-to-end tests (tiny settings, one finished run, console scripts), and
the helpers of the data tests (test_layouts, test_splits, test_synthetic, test_loaders): a dataset config and
small image files, imported as `from conftest import ...`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import DictConfig
from PIL import Image

from lora_cls.conf.load import compose

# ResNet34 (random init) + LoRA r8 preset on 80 synthetic 32 px images, one epoch: a few seconds on a CPU.
TINY = [
    "experiment=demo",
    "dataset.image_size=32",
    "dataset.synthetic.num_per_class=40",
    "trainer.epochs=1",
    "trainer.batch_size=16",
    "trainer.progress=false",
]


def path_value(path: str | os.PathLike) -> str:
    """A path as a Hydra override value, quoted when it holds characters the override grammar treats specially."""
    text = os.fspath(path)
    return text if re.fullmatch(r"[\w/.\-]+", text) else "'" + text.replace("'", "\\'") + "'"


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `train` or `eval` from the packaged config tree, exactly as the CLIs do (no Hydra run)."""
    return compose(config_name, overrides)


# ------------------------------------------------------------------------------------------ data tests


def make_cfg(name: str, root: Path, **overrides) -> SimpleNamespace:
    cfg = SimpleNamespace(
        name=name, root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=0,
        positive_class=None, skip_bad=False, max_image_pixels=89_478_485,
        synthetic=SimpleNamespace(num_per_class=10, source_size=32, seed=0),
        augment=SimpleNamespace(hflip=True, rotation=10.0, color_jitter=0.1),
        cache=SimpleNamespace(enabled=True, max_gb=1.0),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def distinct_colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def make_flat_tree(root: Path, sizes: dict[str, int]) -> set[tuple[str, str]]:
    files = set()
    for cls, n in sizes.items():
        for i in range(n):
            write_image(root / cls / f"img_{i:03d}.png", size=(8, 8))
            files.add((cls, f"{cls}/img_{i:03d}.png"))
    return files


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session", autouse=True)
def decoded_image_cache(tmp_path_factory) -> Iterator[Path]:
    """The decoded-image cache of the whole session (and of the CLIs it starts) in a temp folder, never in
    ~/.cache: shared by the session's tests, as runs share it (tests of the cache itself pass their own folder)."""
    from lora_cls.data.cache import ENV_DIR

    folder = tmp_path_factory.mktemp("decoded_cache")
    previous = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(ENV_DIR, None)
    else:
        os.environ[ENV_DIR] = previous


@pytest.fixture(scope="session")
def path_override() -> Callable[[str, str | os.PathLike], str]:
    """path_override("hydra.run.dir", path) -> "hydra.run.dir=<path, quoted if needed>"."""
    return lambda key, path: f"{key}={path_value(path)}"


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(*overrides, config_name="train") -> the composed config."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(config_name, list(overrides))

    return _compose


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The tiny synthetic set, generated once per session (its parameters come from the tiny config)."""
    from lora_cls.data.layouts import prepare_splits

    root = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_splits(compose_config("train", [*TINY, f"dataset.root={path_value(root)}"]).dataset)
    assert (root / ".synthetic.json").is_file()
    return root


@pytest.fixture(scope="session")
def tiny_overrides(synthetic_root) -> list[str]:
    """The tiny training settings on the session's synthetic set (append hydra.run.dir/sweep.dir yourself)."""
    return [*TINY, f"dataset.root={path_value(synthetic_root)}"]


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    cfg: DictConfig
    metrics: dict  # what `train` returned


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_overrides) -> FinishedRun:
    """One finished in-process training run (two epochs, so history has more than one row), shared read-only."""
    from lora_cls.tasks.train import train

    cfg = compose_config("train", [*tiny_overrides, "trainer.epochs=2"])
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    metrics = train(cfg, run_dir)
    return FinishedRun(run_dir, cfg, metrics)


def console_script(name: str) -> Path:
    """A console script of the environment running the tests (the venv's bin/ beside its python)."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}; install the package (make install)"
    return path


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """run_cli("lora-train", *args, cwd=folder, timeout=300): run a console script, capture stdout/stderr as text.

    `cwd` is required: tests run the CLIs from a folder outside the repository (their tmp_path).
    """

    def _run(name: str, *args: str, cwd: str | os.PathLike, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return subprocess.run([str(console_script(name)), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return _run


@pytest.fixture
def run_main(monkeypatch, capsys) -> Callable[..., subprocess.CompletedProcess]:
    """run_main("lora-train", *args, cwd=folder): a console script's main() run in this process, for a command
    that ends before Hydra starts (a precheck failure, argparse commands): no interpreter start-up, same output
    and exit status as the installed script. A command that reaches Hydra fails the test: run it with `run_cli`.
    """
    from importlib.metadata import entry_points

    def reached_hydra(*args, **kwargs):
        raise AssertionError("the command passed its precheck and started Hydra: test it with run_cli")

    def _run(name: str, *args: str, cwd: str | os.PathLike) -> subprocess.CompletedProcess:
        main = next(e for e in entry_points(group="console_scripts") if e.name == name).load()
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [name, *args])
        monkeypatch.setattr("signal.signal", lambda *a: None)  # leave pytest's handlers alone
        monkeypatch.setattr(sys.modules["hydra.main"], "_run_hydra", reached_hydra)
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([name, *args], code, out.out, out.err)

    return _run


@pytest.fixture(scope="session")
def noisy_data_root(tmp_path_factory) -> str:
    """The synthetic set (40 images per class) of the deterministic runs below, generated on first use."""
    return str(tmp_path_factory.mktemp("noisy_data") / "synthetic")


@pytest.fixture(scope="session")
def noisy_reference(tmp_path_factory, noisy_data_root):
    """One uninterrupted deterministic run (decay_noise + dropout: every RNG is in play): (cfg, run dir, metrics)."""
    from helpers import DETERMINISTIC_TINY, NOISY, train_cfg

    from lora_cls.tasks.train import train

    cfg = train_cfg(*DETERMINISTIC_TINY, f"dataset.root={noisy_data_root}", *NOISY)
    run = tmp_path_factory.mktemp("runs") / "reference"
    return cfg, run, train(cfg, run)
