"""``class_names_generated``: True where a datamodule invents placeholder names ("0", "1", ...), so CLIP can refuse."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

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


def test_imagenet_c_names_are_wordnet_ids_unless_a_classnames_file_names_them(tmp_path):
    for severity in ("1", "2"):
        for wnid in ("n02", "n01"):
            folder = tmp_path / "ImageNet-C" / "fog" / severity / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / "a.JPEG")
    plain = ImageNetC(corruptions=["fog"], severities=[1, 2], data_dir=str(tmp_path))
    assert plain.class_names == ["n01", "n02"] and plain.class_names_generated is True  # no prompt from a wnid
    assert "classnames" in plain.class_names_fix
    (tmp_path / "classnames.txt").write_text("n01 tench\nn02 great_white shark\nn03 other\n")
    named = ImageNetC(corruptions=["fog"], severities=[1, 2], data_dir=str(tmp_path), classnames="classnames.txt",
                      data_config={"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3})
    assert named.class_names == ["tench", "great white shark"] and named.class_names_generated is False
    named.setup("test")  # labels still follow the sorted wnids
    assert [y for _, y in named.samples["test/fog-2"]] == [0, 1]
    with pytest.raises(FileNotFoundError, match="classnames file .*missing.txt not found"):
        _ = ImageNetC(corruptions=["fog"], data_dir=str(tmp_path), classnames="missing.txt").class_names
    (tmp_path / "short.txt").write_text("n01 tench\n")
    with pytest.raises(ValueError, match=r"has no name for the class folders \['n02'\]"):
        _ = ImageNetC(corruptions=["fog"], severities=[1], data_dir=str(tmp_path), classnames="short.txt").class_names


def test_class_subset_follows_the_datamodule_it_restricts():
    assert ClassSubset(VTAB1k(task="dtd")).class_names_generated is True
    assert ClassSubset(Digits()).class_names_generated is False
