"""Digits and ImageFolder: class splits, seeded K-shot sampling, cached split lists, transforms, clear failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_transfer.datamodules import Digits, ImageFolder
from lightning_transfer.datamodules.base import fewshot_indices, split_digest

VIT_CFG = {"input_size": (1, 8, 8), "mean": (0.3,), "std": (0.35,), "interpolation": "bilinear", "crop_pct": 1.0}


def _digits(**kw) -> Digits:
    dm = Digits(**kw)
    dm.set_data_config(VIT_CFG)
    dm.setup()
    return dm


def test_fewshot_indices_are_seeded_and_per_class():
    labels = np.repeat(np.arange(4), 10)
    a, b, c = (fewshot_indices(labels, 3, seed) for seed in (1, 1, 2))
    assert a == b and a != c
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3]
    assert len(fewshot_indices(labels, 50, 0, strict=False)) == 40  # "up to K": a small class gives all it has
    assert not set(fewshot_indices(labels, 3, 0, exclude=a)) & set(a)


def test_fewshot_indices_strict_names_the_short_classes():
    labels = np.repeat(np.arange(5), [10, 10, 3, 10, 2])
    with pytest.raises(ValueError, match=r"num_shots=4 but 2 class\(es\) have fewer images: 'c' \(3 images\), 'e' "
                                         r"\(2 images\).*lower data.init_args.num_shots to at most 2"):
        fewshot_indices(labels, 4, 1, class_names=["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match=r"class 4 \(2 images\)"):
        fewshot_indices(labels, 3, 1)
    assert np.bincount(labels[fewshot_indices(labels, 2, 1)]).tolist() == [2] * 5


def test_digits_more_shots_than_a_class_has_is_an_error_not_an_empty_validation_set():
    with pytest.raises(ValueError, match=r"num_shots=500 but 5 class\(es\) have fewer images: '5' \(\d+ images\)"):
        _digits(task="target", num_shots=500)


def test_digits_target_kshot_protocol():
    dm = _digits(task="target", num_shots=4, seed=3)
    assert dm.class_names == ["5", "6", "7", "8", "9"] and dm.num_classes == 5
    train_y = dm.datasets["train"].tensors[1]
    assert torch.bincount(train_y).tolist() == [4] * 5
    assert torch.bincount(dm.datasets["val"].tensors[1]).tolist() == [4] * 5  # min(K, 4) per class
    assert not set(dm.splits["train"]) & set(dm.splits["val"]) and not set(dm.splits["train"]) & set(dm.splits["test"])
    again = _digits(task="target", num_shots=4, seed=3)
    assert again.splits == dm.splits
    assert _digits(task="target", num_shots=4, seed=4).splits["train"] != dm.splits["train"]
    assert _digits(task="target", num_shots=8, seed=4).splits["test"] == dm.splits["test"]  # fixed test set


def test_digits_source_and_split_cache(tmp_path):
    dm = _digits(task="source")
    total = sum(len(dm.splits[s]) for s in ("train", "val", "test"))
    assert total == sum(1 for t in __import__("sklearn.datasets").datasets.load_digits().target if t < 5)
    cache = list((tmp_path / "data" / "splits").glob("digits_0-1-2-3-4_all_seed1.json"))
    assert len(cache) == 1 and json.loads(cache[0].read_text()) == dm.splits
    x, _ = dm.datasets["train"][0]
    assert x.shape == (1, 8, 8)


def test_digits_transform_follows_backbone_config():
    dm = Digits(task="target")
    dm.set_data_config({"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    dm.setup()
    x = dm.datasets["test"].tensors[0]
    assert x.shape[1:] == (3, 32, 32)
    assert x.min() == pytest.approx((0 - 0.5) / 0.25) and x.max() <= (1 - 0.5) / 0.25 + 1e-6


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="target_classes=\\[5, 12\\] must be distinct digits"):
        Digits(target_classes=[5, 12])
    with pytest.raises(ValueError, match="task must be 'source' or 'target', got 'middle'"):
        Digits(task="middle")
    with pytest.raises(RuntimeError, match="has no data_config"):
        Digits().setup()


def _write_folder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=4):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder_layout_and_fewshot(tmp_path):
    _write_folder(tmp_path / "pets")
    dm = ImageFolder(root=str(tmp_path / "pets"), num_shots=2, batch_size=2, augment=False)
    dm.set_data_config({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                        "crop_pct": 1.0})
    dm.setup()
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.datasets["train"]) == 4  # 2 shots x 2 classes, from the train pool without the val hold-out
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16)
    assert len(dm.datasets["test"]) == 8
    assert split_digest(dm.splits) == split_digest(dm.splits)


def test_image_folder_missing_or_inconsistent(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training folder at .*nowhere.*train/<class>/<image>"):
        ImageFolder(root=str(tmp_path / "nowhere"))
    _write_folder(tmp_path / "odd", splits=("train",))
    _write_folder(tmp_path / "odd2", splits=("test",), classes=("cat", "cow"))
    (tmp_path / "odd" / "test").symlink_to(tmp_path / "odd2" / "test")
    dm = ImageFolder(root=str(tmp_path / "odd"))
    dm.set_data_config({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(ValueError, match="classes of test/ \\['cat', 'cow'\\] differ from train/"):
        dm.setup()


def test_image_folder_unreadable_image_names_the_file_and_the_fix(tmp_path):
    _write_folder(tmp_path / "pets", splits=("train", "val", "test"))
    bad = tmp_path / "pets" / "test" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: PIL's own error does not name the file
    dm = ImageFolder(root=str(tmp_path / "pets"), augment=False, data_config={
        "input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    dm.setup()
    with pytest.raises(RuntimeError, match=r"cannot read image .*test/dog/1\.png.*re-download or remove it"):
        [dm.datasets["test"][i] for i in range(len(dm.datasets["test"]))]


@pytest.mark.parametrize("splits", [("train",), ("train", "val"), ("train", "val", "test")])
def test_image_folder_kshot_validation_takes_min_k_4_per_class_and_the_test_set_stays_whole(tmp_path, splits):
    _write_folder(tmp_path / "pets", splits=splits, per_class=50)
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    dm = ImageFolder(root=str(tmp_path / "pets"), num_shots=8, augment=False, data_config=cfg)
    dm.setup()
    val = dm.datasets["val"]
    assert np.bincount([int(val[i][1]) for i in range(len(val))]).tolist() == [4, 4]  # min(8, 4) per class
    assert len(dm.splits["val"]) == 8
    # without test/ the test set is the whole validation pool (5 of 50 per class held out of train/, or all of val/)
    assert len(dm.datasets["test"]) == {1: 10, 2: 100, 3: 100}[len(splits)]
    again = ImageFolder(root=str(tmp_path / "pets"), num_shots=8, augment=False, data_config=cfg)
    again.setup()
    assert again.splits == dm.splits
    full = ImageFolder(root=str(tmp_path / "pets"), augment=False, data_config=cfg)
    full.setup()
    assert len(full.datasets["val"]) == {1: 10, 2: 100, 3: 100}[len(splits)]  # without num_shots: all of it
