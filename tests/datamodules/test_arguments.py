"""Every datamodule checks its counts when it is built: a bad value fails naming itself and the fix, before any fit."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.corruption import NpzImages
from lightning_transfer.datamodules.imagenet_c import ImageNetC
from lightning_transfer.registry import DATAMODULES
from tests.datamodules.cases import cli_options

CFG = {"input_size": (1, 8, 8), "mean": (0.3,), "std": (0.35,)}
# class_subset and paired_domains wrap other datamodules and take their counts from them (checked when those are built)
WRAPPERS = ("class_subset", "paired_domains")
BUILT_DIRECTLY = [name for name, _ in DATAMODULES.items() if name not in WRAPPERS]


def _build(name: str, **kwargs):
    """The datamodule ``name`` with placeholders for its required arguments: the counts are checked first."""
    cls = DATAMODULES.get(name)
    required = {name: "placeholder" for name, option in cli_options(cls).items() if option.required}
    return cls(**required, **kwargs)


def test_num_shots_zero_is_an_error_not_all_images():
    # `if self.num_shots:` read 0 as "unset" and trained on the whole training set without a word
    with pytest.raises(ValueError, match=r"num_shots must be >= 1 or null \(all images\), got 0: set "
                                         r"data.init_args.num_shots"):
        Digits(task="target", num_shots=0, data_config=CFG)
    dm = Digits(task="target", num_shots=1, data_config=CFG)
    dm.setup()
    assert len(dm.splits["train"]) == 5  # one image per class: 1 is a real K, not "all"


@pytest.mark.parametrize("name", BUILT_DIRECTLY)
@pytest.mark.parametrize(("arg", "value", "message"), [
    pytest.param(arg, value, message, id=f"{arg}={value}") for arg, value, message in [
        ("num_shots", 0, r"num_shots must be >= 1 or null \(all images\), got 0"),
        ("num_shots", -1, r"num_shots must be >= 1 or null \(all images\), got -1"),
        ("batch_size", 0, r"batch_size must be an integer >= 1, got 0: set data.init_args.batch_size"),
        ("batch_size", -8, r"batch_size must be an integer >= 1, got -8"),
        ("batch_size", 2.5, r"batch_size must be an integer >= 1, got 2.5"),
        ("batch_size", True, r"batch_size must be an integer >= 1, got True"),
        ("num_workers", -1, r"num_workers must be an integer >= 0, got -1: set data.init_args.num_workers"),
    ]
])
def test_every_datamodule_checks_its_counts_when_built(name, arg, value, message):
    with pytest.raises(ValueError, match=message):
        _build(name, **{arg: value})


def test_good_counts_are_kept_as_plain_ints():
    dm = Digits(batch_size=np.int64(16), num_workers=np.int64(0), num_shots=np.int64(2), data_config=CFG)
    assert (dm.batch_size, dm.num_workers, dm.num_shots) == (16, 0, 2)
    assert all(type(v) is int for v in (dm.batch_size, dm.num_workers, dm.num_shots))
    assert Digits(num_shots=None, data_config=CFG).num_shots is None


def test_empty_severities_and_corruptions_are_errors_not_defaults():
    # `list(severities or [5])` silently tested severity 5 when given []
    with pytest.raises(ValueError, match=r"severities is empty: list the severities 1-5"):
        NpzImages(corruptions=["fog"], severities=[])
    with pytest.raises(ValueError, match=r"severities must be in 1-5 \(a non-empty list; null for \[5\]\), got \[\]"):
        ImageNetC(severities=[])
    with pytest.raises(ValueError, match="corruptions is empty: name at least one ImageNet-C corruption"):
        ImageNetC(corruptions=[])
    assert NpzImages(corruptions=["fog"]).severities == [5] and ImageNetC().severities == [5]
