"""ClassSubset: base/new classes of any datamodule, relabelled; every test set of a multi-test-set datamodule."""

from __future__ import annotations

import numpy as np
import torch

from lightning_transfer.datamodules.class_subset import ClassSubset
from lightning_transfer.datamodules.corruption import NpzImages

CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}


def _npz(root, n=30):
    rng = np.random.default_rng(0)
    np.savez(root / "test.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)


def test_every_test_set_is_restricted_and_keeps_its_name(tmp_path):
    _npz(tmp_path)
    inner = NpzImages(data_dir=str(tmp_path), train_file=None, test_file="test.npz",
                      corruptions=["fog", "contrast", "pixelate"], severities=[2], data_config=CFG)
    dm = ClassSubset(inner, subset="new")
    dm.setup("test")
    assert dm.test_names == ["fog-2", "contrast-2", "pixelate-2"] and dm.class_names == inner.class_names[5:]
    loaders = dm.test_dataloader()
    assert len(dm.test_sets) == 3 and len(loaders) == 3
    for subset, full in zip(dm.test_sets, inner.test_sets):
        assert len(subset) == 15
        keep = [i for i in range(30) if i % 10 >= 5]
        for j in (0, 7, 14):
            x, y = subset[j]
            assert int(y) == keep[j] % 10 - 5 and torch.equal(x, full[keep[j]][0])
    assert dm.datasets["test"] is dm.test_sets[0]


def test_a_single_test_set_has_no_list(tmp_path):
    _npz(tmp_path)
    dm = ClassSubset(NpzImages(data_dir=str(tmp_path), train_file=None, test_file="test.npz", data_config=CFG))
    dm.setup("test")
    assert len(dm.datasets["test"]) == 15 and isinstance(dm.test_dataloader(), torch.utils.data.DataLoader)
    assert dm.test_names == ["clean"]
