"""Every ``configs/data/**/*.yaml`` parses with the project's CLI and builds its datamodule without the data on disk."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_transfer.cli import TransferCLI
from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.vtab import VTAB_TASKS
from lightning_transfer.registry import DATAMODULES
from tests.conftest import REPO
from tests.datamodules.cases import cli_options

DATA_CONFIGS = sorted((REPO / "configs" / "data").rglob("*.yaml"))
BACKBONE = str(REPO / "configs" / "backbone" / "digits_vit.yaml")
# constructors that still look at the disk (the rest check their data in prepare_data/setup)
READS_DATA_IN_CONSTRUCTOR = {"ImageFolder"}


class _ParseOnly(TransferCLI):
    """The real CLI parser (composition, class_path resolution, type checks) without building model or trainer."""

    def instantiate_classes(self) -> None:
        pass


def _resolve(class_path: str) -> type:
    found = DATAMODULES.find(class_path.rsplit(".", 1)[-1])
    if "." not in class_path and found is not None:
        return found
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parameters(cls: type) -> dict[str, bool]:
    """The CLI's options of ``cls`` (its own and those it forwards by ``**kwargs``), each with "required"."""
    params = {name: option.required for name, option in cli_options(cls).items()}
    for name in ("batch_size", "num_shots", "seed"):
        assert cls.__name__ in ("ClassSubset", "PairedDomains") or name in params, (
            f"{cls.__name__}: the CLI lists no {name!r}: forward the base options with super().__init__(**kwargs)")
    return params


def _reached(parsed, value) -> bool:
    """``parsed`` (the CLI's) is the YAML's ``value``; a nested component (ClassSubset's ``data``) by its class and
    each init_arg the YAML gives (the parsed one also holds the defaults)."""
    if isinstance(value, dict) and "class_path" in value:
        return _resolve(parsed.class_path) is _resolve(value["class_path"]) and all(
            _reached(parsed.init_args[k], v) for k, v in (value.get("init_args") or {}).items())
    return parsed == value


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs" / "data")))
def test_data_config_parses_and_instantiates_without_data(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"data"}, f"{path.name}: a data fragment sets only `data`, got {sorted(raw)}"
    cls = _resolve(raw["data"]["class_path"])
    assert cls in dict(DATAMODULES.items()).values(), f"{cls.__name__} is not a registered datamodule"
    init_args = raw["data"].get("init_args") or {}
    params = _parameters(cls)
    unknown = sorted(set(init_args) - set(params))
    assert not unknown, f"{path.name} names {unknown}, which {cls.__name__}.__init__ does not take"
    # arguments without a default (a dataset path) are given on the command line, as a user would
    required = [n for n, is_required in params.items() if is_required and n not in init_args]
    given = [f"--data.init_args.{n}=placeholder_{n}" for n in required]
    cli = _ParseOnly(args=["--config", BACKBONE, "--config", str(path), "--trainer.logger=false", *given], run=False)
    assert _resolve(cli.config.data.class_path) is cls
    for name, value in init_args.items():
        assert _reached(cli.config.data.init_args[name], value), f"{path.name}: {name} did not reach the parsed config"

    parser = LightningArgumentParser()
    parser.add_lightning_class_args(TransferDataModule, "data", subclass_mode=True)
    config = parser.parse_object({"data": cli.config.data.as_dict()})
    if cls.__name__ in READS_DATA_IN_CONSTRUCTOR:
        with pytest.raises((FileNotFoundError, ValueError), match="no training folder at 'placeholder_root"):
            parser.instantiate(config)
        return
    datamodule = parser.instantiate(config).data
    assert type(datamodule) is cls


def test_every_vtab_task_and_every_datamodule_has_a_config():
    vtab = {yaml.safe_load(p.read_text())["data"]["init_args"]["task"] for p in DATA_CONFIGS if p.parent.name == "vtab"}
    assert vtab == set(VTAB_TASKS)
    named = " ".join(p.read_text() for p in (REPO / "configs").rglob("*.yaml"))
    missing = [f"{name} ({cls.__name__})" for name, cls in DATAMODULES.items()
               if f".{cls.__name__}\n" not in named and f": {cls.__name__}\n" not in named]
    assert not missing, f"registered datamodules without a YAML under configs/: {missing}"
