"""The architecture as the code must keep it (docs/DESIGN.md §2): the layers of subpackages and who may import
whom, the size limits, and no global state registered by importing a module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_cls"
# From the ground up: a module imports only from its own part or from a lower layer (docs/DESIGN.md §2).
LAYERS = [
    {"errors", "files"},
    {"metrics", "adapters"},
    {"models", "data"},
    {"engine", "conf"},
    {"runs"},
    {"tasks"},
    {"cli", "__init__"},
]


def part(module: str) -> str:
    """`lora_cls.adapters.layer` -> "adapters"; `lora_cls.errors` -> "errors"; `lora_cls` -> "__init__"."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def layer(name: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if name in parts)


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((name, path))
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lora_cls import in the file, top-level and inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("lora_cls"):
            targets = [node.module] if node.module != "lora_cls" else [f"lora_cls.{a.name}" for a in node.names]
            found += [(node.lineno, t) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lora_cls")]
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part(name) for name, _ in modules()}
    assert parts == set().union(*LAYERS), "a new subpackage needs its place in LAYERS and in docs/DESIGN.md §2"


def test_no_module_imports_from_a_layer_above_it_or_from_a_neighbour():
    wrong = []
    for name, path in modules():
        own = part(name)
        for line, target in imports(path):
            other = part(target)
            if other != own and layer(other) >= layer(own):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_package_has_few_top_level_modules_and_no_long_module_or_function():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    long_modules, long_functions = [], []
    for _, path in modules():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 450:
            long_modules.append(f"{path.name}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.name}:{node.name}: {node.end_lineno - node.lineno + 1}")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_a_module_that_imports_a_neighbour_is_caught():
    # the check above can fail: a models module importing data, or engine importing runs, is wrong
    assert layer("data") == layer("models") and layer("runs") > layer("engine")
    assert part("lora_cls.adapters.layer") == "adapters" and part("lora_cls") == "__init__"


@pytest.mark.slow  # imports every module in a fresh interpreter
def test_importing_every_module_registers_no_global_hook():
    code = """
import importlib, pkgutil, sys
import torch
import lora_cls
names = [m.name for m in pkgutil.walk_packages(lora_cls.__path__, "lora_cls.")]
for name in names:
    importlib.import_module(name)
from torch.nn.modules import module
from torch.optim import optimizer
hooks = {n: len(getattr(module, n)) for n in dir(module) if n.startswith("_global_") and n.endswith("hooks")}
hooks.update({n: len(getattr(optimizer, n)) for n in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")})
print(len(names), {n: k for n, k in hooks.items() if k})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, registered = done.stdout.split(" ", 1)
    assert int(count) > 40 and registered.strip() == "{}", done.stdout
