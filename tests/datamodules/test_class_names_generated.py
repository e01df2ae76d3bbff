"""``class_names_generated``: True where a datamodule invents placeholder names ("0", "1", ...), so CLIP can refuse."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_transfer.datamodules import Digits
from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.class_subset import ClassSubset
from lightning_transfer.datamodules.corruption import NpzImages
from lightning_transfer.datamodules.csv_images import CSVImages
from lightning_transfer.datamodules.digit_domains import DigitDomains
from lightning_transfer.datamodules.imagenet_c import ImageNetC
from lightning_transfer.datamodules.vtab import VTAB1k


def test_real_names_by_default():
    assert TransferDataModule.class_names_generated is False
    assert Digits().class_names_generated is False and DigitDomains().class_names_generated is False


@pytest.mark.parametrize(("labels", "class_names", "generated"), [
    (["0", "2", "1"], None, True),  # integer labels, no names: "0", "1", "2" are placeholders
    (["0", "2", "1"], ["cat", "dog", "fox"], False),
    (["dog", "cat", "fox"], None, False),  # the labels are the names
])
def test_csv(tmp_path, labels, class_names, generated):
    csv = tmp_path / "list.csv"
    csv.write_text("".join(f"img{i}.png,{label}\n" for i, label in enumerate(labels)))
    dm = CSVImages(csv_file=str(csv), class_names=class_names)
    assert dm.class_names_generated is generated


def test_vtab_lists_carry_only_indices():
    assert VTAB1k(task="dtd").class_names_generated is True
    assert VTAB1k(task="kitti", class_names=["a", "b", "c", "d"]).class_names_generated is False


@pytest.mark.parametrize(("num_classes", "class_names", "generated"), [
    (10, None, False),  # CIFAR-10's names
    (3, None, True),
    (3, ["a", "b", "c"], False),
])
def test_npz_images(tmp_path, num_classes, class_names, generated):
    np.savez(tmp_path / "t.npz", x=np.zeros((num_classes, 4, 4, 3), np.uint8), y=np.arange(num_classes))
    dm = NpzImages(data_dir=str(tmp_path), train_file=None, test_file="t.npz", class_names=class_names)
    assert dm.class_names_generated is generated


def test_imagenet_c_names_are_wordnet_ids_not_placeholders():
    # not words, but not made up either, and ImageNetC takes no class_names to replace them: not refused
    assert ImageNetC().class_names_generated is False


def test_class_subset_follows_the_datamodule_it_restricts():
    assert ClassSubset(VTAB1k(task="dtd")).class_names_generated is True
    assert ClassSubset(Digits()).class_names_generated is False
