"""The datamodule contract suite: every registered datamodule passes the same checks, offline.

Cases (a tiny dataset in the datamodule's own format and the kwargs that read it) come from
``tests/datamodules/cases.py``; a registered datamodule without a case there or without a YAML under
``configs/data/`` fails the meta-test. Nothing is downloaded (the conftest refuses network connections).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from lightning_transfer.datamodules.base import TASKS, TransferDataModule
from lightning_transfer.datamodules.class_subset import dataset_labels
from lightning_transfer.registry import DATAMODULES
from tests.conftest import REPO
from tests.datamodules.cases import CASES, cli_options

NAMES = DATAMODULES.names()
BATCH = 4
BASE_OPTIONS = {"data_dir", "batch_size", "num_workers", "num_shots", "seed", "data_config"}
# what a "missing data" error must say besides the folder: how to get the data there, or which option points at it
HOW = re.compile(r"download|put |lay |extract|prepare|write |set data|pass data|fix data|data\.init_args")


def _maker(name: str, root: Path, monkeypatch: pytest.MonkeyPatch):
    """A function building ``name`` on its case's tiny dataset (written once, under ``root``) with options."""
    case, cls = CASES[name], DATAMODULES.get(name)
    root.mkdir()
    kwargs = {**case.write(root, monkeypatch), "data_config": case.data_config(), "batch_size": BATCH}
    return lambda **options: case.build(cls, {**kwargs, **options})


def _set_up(dm: TransferDataModule, stage: str = "fit") -> TransferDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


def _inner(dm: TransferDataModule) -> TransferDataModule:
    for attribute in ("data", "source"):  # a wrapper's inner datamodule caches them (ClassSubset, PairedDomains)
        inner = getattr(dm, attribute, None)
        if isinstance(inner, TransferDataModule):
            return inner
    return dm


def _drop_split_cache(dm: TransferDataModule) -> None:
    """Remove cached split lists, so a second build draws again instead of reading the first draw's JSON."""
    shutil.rmtree(_inner(dm).data_dir / "splits", ignore_errors=True)


# ---- meta ---------------------------------------------------------------------------------------------------
def _data_yaml_classes() -> set[type]:
    found = set()
    for path in (REPO / "configs" / "data").rglob("*.yaml"):
        class_path = yaml.safe_load(path.read_text())["data"]["class_path"]
        found.add(DATAMODULES.get(class_path.rsplit(".", 1)[-1]))
    return found


def test_every_registered_datamodule_has_a_case_and_a_yaml():
    assert len(DATAMODULES) >= 20
    with_yaml = _data_yaml_classes()
    for name, cls in DATAMODULES.items():
        assert name in CASES, f"datamodule {name!r} has no contract case: add one to tests/datamodules/cases.py"
        assert cls in with_yaml, f"datamodule {name!r} ({cls.__name__}) has no YAML under configs/data/"
    stale = sorted(set(CASES) - set(NAMES))
    assert not stale, f"tests/datamodules/cases.py has cases for unregistered datamodules: {stale}"


# ---- the surface --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_declares_a_known_task_and_modality_and_lists_its_options(name):
    cls = DATAMODULES.get(name)
    assert cls.modality in ("image", "text"), f"{name}: modality {cls.modality!r}"
    options = cli_options(cls)
    undocumented = sorted(n for n, option in options.items() if not option.help.strip())
    assert not undocumented, f"{name}: the CLI shows no docs for {undocumented}: document them in an Args: section"
    if name == "class_subset":  # takes its counts from the datamodule it wraps
        assert set(options) == {"data", "subset"}
    elif name == "paired_domains":  # takes them from its source and target datamodules
        assert set(options) == {"source", "target", "validate_on"}
    else:
        missing = BASE_OPTIONS - set(options)
        assert not missing, f"{name}: the CLI lists no {sorted(missing)}; forward them with super().__init__(**kwargs)"


@pytest.mark.parametrize("name", NAMES)
def test_fit_gives_batches_of_its_modality_with_labels_in_range(name, tmp_path, monkeypatch):
    dm = _set_up(_maker(name, tmp_path / "data", monkeypatch)())
    assert dm.task in TASKS and dm.task == "classification"
    names = dm.class_names
    assert dm.num_classes == len(names) >= 2, f"{name}: num_classes {dm.num_classes} for {len(names)} class names"
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names), names
    config = CASES[name].data_config()
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        batch = next(iter(loader))
        if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], dict):  # a CombinedLoader's
            batch = batch[0]
        if isinstance(batch, dict):  # two streams: a labelled source batch and the target's inputs only
            target = batch["target"]
            assert torch.is_tensor(target) and tuple(target.shape[1:]) == tuple(config["input_size"]), target.shape
            batch = batch["source"]
        x, y = batch
        n = min(BATCH, len(dm.datasets[split]))
        assert n >= 1, f"{name}: empty {split} split"
        if dm.modality == "image":
            assert x.dtype == torch.float32 and tuple(x.shape) == (n, *config["input_size"]), (split, x.shape)
        else:  # token ids and attention mask, padded to the batch's longest text
            assert x.dtype == torch.long and x.ndim == 3 and tuple(x.shape[:2]) == (n, 2), (split, x.shape)
        assert y.shape == (n,) and not y.is_floating_point(), (split, y)
    for split, dataset in dm.datasets.items():
        labels = dataset_labels(dataset)
        out = sorted({y for y in labels if not 0 <= y < dm.num_classes})
        assert not out, f"{name}: {split} labels {out} outside 0..{dm.num_classes - 1}"


@pytest.mark.parametrize("name", NAMES)
def test_kshot_draw_is_seeded(name, tmp_path, monkeypatch):
    make, k = _maker(name, tmp_path / "data", monkeypatch), CASES[name].shots
    first = _set_up(make(num_shots=k, seed=1))
    counts = Counter(dataset_labels(first.datasets["train"]))
    assert counts and set(counts.values()) == {k}, f"{name}: {k}-shot training set has {dict(counts)} per class"
    _drop_split_cache(first)
    again = _set_up(make(num_shots=k, seed=1))
    _drop_split_cache(again)
    other = _set_up(make(num_shots=k, seed=2))
    assert again.splits["train"] == first.splits["train"], f"{name}: the same seed drew another training set"
    assert other.splits["train"] != first.splits["train"], f"{name}: seeds 1 and 2 drew the same training set"


@pytest.mark.parametrize("name", NAMES)
def test_bad_counts_fail_naming_the_option(name, tmp_path, monkeypatch):
    make = _maker(name, tmp_path / "data", monkeypatch)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0: set data\.init_args\.batch_size"):
        make(batch_size=0)
    with pytest.raises(ValueError, match=r"num_shots must be >= 1 or null \(all images\), got 0: set "
                                         r"data\.init_args\.num_shots"):
        make(num_shots=0)
    with pytest.raises(ValueError, match=r"num_shots=10000 but .*have fewer images.*lower data\.init_args\.num_shots"):
        _set_up(make(num_shots=10_000))  # more than the fixture has: said before training, not a short K-shot set


@pytest.mark.parametrize("name", NAMES)
def test_missing_data_says_where_and_how(name, tmp_path):
    case = CASES[name]
    if case.missing is None:
        pytest.skip(case.nothing_missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    kwargs = {**case.missing(empty), "data_config": case.data_config(), "batch_size": BATCH}
    with pytest.raises(FileNotFoundError) as error:  # in the constructor, prepare_data or setup: before any step
        _set_up(case.build(DATAMODULES.get(name), kwargs), case.missing_stage)
    message = str(error.value)
    assert str(empty) in message, f"{name}: the error does not say where the data should be: {message}"
    assert HOW.search(message), f"{name}: the error does not say how to get the data: {message}"
