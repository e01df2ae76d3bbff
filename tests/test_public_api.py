"""The package uses Lightning's and torch's public API only: no underscore names imported from them, no underscore
attribute of theirs read or written (DESIGN.md, "Core v2"). A speed trick through private API is not worth a
framework users must upgrade; the next Lightning release may rename any of it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy, Strategy

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_transfer"
FRAMEWORKS = ("lightning", "pytorch_lightning", "torch", "torchmetrics")


def _is_framework(module: str) -> bool:
    return any(module == f or module.startswith(f"{f}.") for f in FRAMEWORKS)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _framework_private_attributes() -> set[str]:
    """Underscore attribute names Lightning's and torch's classes define or set on themselves."""
    classes = [pl.LightningModule, pl.LightningDataModule, pl.Trainer, pl.Callback, LightningCLI,
               LightningArgumentParser, Strategy, DDPStrategy, ModelCheckpoint, TQDMProgressBar, torch.nn.Module,
               torch.optim.Optimizer]
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            if not _is_framework(klass.__module__):
                continue
            names |= {n for n in vars(klass) if _private(n)}
            try:
                names |= set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(klass)))
            except (OSError, TypeError):
                pass
    return {n for n in names if _private(n)}


def _framework_names(tree: ast.Module) -> set[str]:
    """Local names bound to Lightning or torch modules and objects (``torch``, ``nn``, ``F``, ``Trainer`` ...)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names if _is_framework(a.name)}
        elif isinstance(node, ast.ImportFrom) and _is_framework(node.module or ""):
            bound |= {a.asname or a.name for a in node.names}
    return bound


def test_nothing_private_is_imported_from_lightning_or_torch():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.ImportFrom) and _is_framework(node.module or ""):
                modules = [node.module or ""]
                found += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if _is_framework(a.name)]
            found += [f"{path.name}:{node.lineno} {m}" for m in modules if any(map(_private, m.split(".")))]
    assert not found, f"private Lightning/torch imports: {found}"


def test_no_underscore_attribute_of_lightning_or_torch_is_read_or_written():
    framework_private = _framework_private_attributes()
    assert {"_trainer", "_current_fx_name", "_metric_attributes", "_ddp_kwargs", "_modules"} <= framework_private
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        framework = _framework_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value in framework_private:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.id} {name.value!r}")
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            on_framework_module = isinstance(root, ast.Name) and root.id in framework
            if on_framework_module or node.attr in framework_private:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    assert not found, f"underscore attributes of Lightning/torch objects: {found}"


def test_the_checker_catches_what_it_must(tmp_path):
    # the same walk over a file that does what the first version did
    sample = ("from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters\n"
              "import torch.nn as nn\n"
              "def f(module, trainer):\n"
              "    module._current_fx_name = 'x'\n"
              "    return trainer._logger_connector, nn.modules.batchnorm._BatchNorm\n")
    tree = ast.parse(sample)
    private_imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
                       if _private(a.name)]
    assert private_imports == ["_given_hyperparameters"]
    framework_private, framework = _framework_private_attributes(), _framework_names(tree)
    attrs = sorted(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)
                   and (n.attr in framework_private or (isinstance(n.value, ast.Attribute))))
    assert "_current_fx_name" in attrs and "_logger_connector" in framework_private | set(attrs)
    assert "nn" in framework


def test_declared_dependency_ranges_have_upper_bounds():
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!\[ ]", requirement, maxsplit=1)[0]
        if name in ("torch", "torchvision", "lightning", "torchmetrics", "timm", "peft", "transformers",
                    "jsonargparse"):
            assert "<" in requirement, f"{requirement}: give the upper bound the suite was run against"
