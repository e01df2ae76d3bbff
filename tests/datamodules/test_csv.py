"""CSVImages: rows with and without a split column, class names or indices, and errors that name line or file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lightning_transfer.datamodules.csv_images import CSVImages

CFG = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}


def write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [f"{folder.name}/{i}.png" for i in range(count)]


def test_names_split_column_and_header(tmp_path):
    paths = write_images(tmp_path / "img", 8)
    splits = ["train", "train", "train", "train", "val", "val", "test", "TEST"]
    labels = ["dog", "cat", "dog", "cat", "dog", "cat", "dog", "cat"]
    rows = ["path,label,split", *(f"{p},{y},{s}" for p, y, s in zip(paths, labels, splits))]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    dm = CSVImages(csv_file=str(tmp_path / "set.csv"), data_config=CFG, augment=False)
    dm.setup()
    assert dm.class_names == ["cat", "dog"]
    assert [y for _, y in dm.samples["train"]] == [1, 0, 1, 0] and [y for _, y in dm.samples["test"]] == [1, 0]
    assert dm.samples["val"][0][0] == str(tmp_path / "img" / "4.png")
    assert dm.split_info()["data/num_val"] == 2 and dm.split_info()["data/variant"] == "csv:set.csv"
    x, y = dm.datasets["test"][1]
    assert x.shape == (3, 8, 8) and y == 0


def test_indices_without_split_column_and_given_class_names(tmp_path):
    paths = write_images(tmp_path / "img", 20)
    (tmp_path / "all.csv").write_text("".join(f"{p},{i % 4}\n" for i, p in enumerate(paths)))
    dm = CSVImages(csv_file=str(tmp_path / "all.csv"), val_fraction=0.25, data_config=CFG)
    dm.setup()
    assert dm.class_names == ["0", "1", "2", "3"] and len(dm.samples["train"]) == 16 and len(dm.samples["val"]) == 4
    assert dm.datasets["test"] is dm.datasets["val"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "named.csv").write_text("".join(f"{p},{'abcd'[i % 4]}\n" for i, p in enumerate(paths)))
    named = CSVImages(csv_file=str(other / "named.csv"), image_root=str(tmp_path), class_names=["d", "c", "b", "a"],
                      val_fraction=0.25, data_config=CFG)
    named.setup()
    assert [y for _, y in named.samples["train"]][:4] == [3, 2, 1, 0]
    assert named.split_info()["data/split_digest"] != dm.split_info()["data/split_digest"]


def test_errors_name_the_line_or_the_file(tmp_path):
    missing = CSVImages(csv_file=str(tmp_path / "none.csv"), data_config=CFG)  # the constructor reads nothing
    with pytest.raises(FileNotFoundError, match=r"none\.csv not found.*path,label\[,split\]"):
        missing.setup()
    paths = write_images(tmp_path / "img", 4)
    cases = {"a.png,0,train,extra": r"bad\.csv:2: expected 'path,label\[,split\]'",
             "a.png,0,holdout": r"bad\.csv:2: split 'holdout' is not one of",
             "a.png,zebra": r"bad\.csv:2: label 'zebra' is not a class name \(2 classes: cat, dog\)"}
    for row, message in cases.items():
        (tmp_path / "bad.csv").write_text(f"{paths[0]},cat\n{row}\n{paths[1]},dog\n")
        with pytest.raises(ValueError, match=message):
            CSVImages(csv_file=str(tmp_path / "bad.csv"), class_names=["cat", "dog"], data_config=CFG).setup()
    (tmp_path / "range.csv").write_text(f"{paths[0]},0\n{paths[1]},1\n{paths[2]},5,test\n")
    with pytest.raises(ValueError, match=r"range\.csv:3: label 5 is outside the 2 classes \(0\.\.1\)"):
        CSVImages(csv_file=str(tmp_path / "range.csv"), class_names=["cat", "dog"], data_config=CFG).setup()
    (tmp_path / "img" / "3.png").write_bytes(b"not a png")
    (tmp_path / "broken.csv").write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(paths)))
    with pytest.raises(RuntimeError, match=r"cannot read image .*img/3\.png"):
        CSVImages(csv_file=str(tmp_path / "broken.csv"), data_config=CFG, cache_images=True).setup()


def test_one_stray_index_does_not_silently_add_classes(tmp_path):
    paths = write_images(tmp_path / "img", 7)
    labels = ["0", "1", "2", "0", "7", "1", "2"]  # a 3-class file with one typo
    (tmp_path / "stray.csv").write_text("".join(f"{p},{y}\n" for p, y in zip(paths, labels)))
    with pytest.raises(ValueError, match=r"stray\.csv:5: label 7 makes 8 classes, but class\(es\) 3, 4, 5, 6 have no "
                                         r"image.*num_classes=8"):
        CSVImages(csv_file=str(tmp_path / "stray.csv"), data_config=CFG).setup()
    with pytest.raises(ValueError, match=r"stray\.csv:5: label 7 is outside the 3 classes"):
        CSVImages(csv_file=str(tmp_path / "stray.csv"), num_classes=3, data_config=CFG).setup()
    wide = CSVImages(csv_file=str(tmp_path / "stray.csv"), num_classes=8, data_config=CFG)  # said on purpose
    wide.setup()
    assert wide.num_classes == 8
    with pytest.raises(ValueError, match="num_classes=2 must be >= 1 and agree with the 3 class_names"):
        CSVImages(csv_file="x.csv", num_classes=2, class_names=["a", "b", "c"])


def test_negative_index_typo_is_rejected_not_read_as_a_name(tmp_path):
    paths = write_images(tmp_path / "img", 6)
    labels = ["0", "1", "2", "0", "-1", "2"]
    (tmp_path / "neg.csv").write_text("".join(f"{p},{y}\n" for p, y in zip(paths, labels)))
    dm = CSVImages(csv_file=str(tmp_path / "neg.csv"), data_config=CFG)
    with pytest.raises(ValueError, match=r"label -1 of .*img/4\.png.* outside the 3 classes"):
        dm.setup()


def test_mixed_index_and_name_labels_show_an_example_line_of_each(tmp_path):
    paths = write_images(tmp_path / "img", 4)
    (tmp_path / "mixed.csv").write_text(f"{paths[0]},0\n{paths[1]},cat\n{paths[2]},1\n{paths[3]},dog\n")
    dm = CSVImages(csv_file=str(tmp_path / "mixed.csv"), data_config=CFG)
    with pytest.raises(ValueError, match=r"mixed\.csv mixes integer labels \(line 1: '0'\) and class names "
                                         r"\(line 2: 'cat'\).*class_names"):
        dm.setup()


@pytest.mark.parametrize("header", ["\ufeffpath,label,split", "\ufeffpath,label", "filepath,label", "Image,Category",
                                    "img,y", "x,class"])
def test_header_rows_and_excel_bom_are_not_read_as_images(tmp_path, header):
    paths = write_images(tmp_path / "img", 4)
    rows = [f"{p},{'cat' if i % 2 else 'dog'}{',train' if header.count(',') == 2 else ''}" for i, p in enumerate(paths)]
    (tmp_path / "set.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    dm = CSVImages(csv_file=str(tmp_path / "set.csv"), data_config=CFG)
    assert dm.class_names == ["cat", "dog"] and [n for n, *_ in dm.rows()] == [2, 3, 4, 5]


def test_a_first_row_naming_an_image_is_data_even_when_its_label_looks_like_a_header(tmp_path):
    paths = write_images(tmp_path / "img", 4)
    (tmp_path / "set.csv").write_text("".join(f"{p},{'y' if i % 2 else 'n'}\n" for i, p in enumerate(paths)))
    assert len(CSVImages(csv_file=str(tmp_path / "set.csv"), data_config=CFG).rows()) == 4


def test_images_missing_on_disk_fail_in_setup_with_the_count_and_the_csv(tmp_path):
    paths = write_images(tmp_path / "img", 8)
    rows = [*paths, "img/gone1.png", "img/gone2.png"]
    (tmp_path / "set.csv").write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate(rows)))
    dm = CSVImages(csv_file=str(tmp_path / "set.csv"), val_fraction=0.5, data_config=CFG)
    with pytest.raises(FileNotFoundError, match=r"2 of 10 images listed in .*set\.csv are missing on disk: "
                                                r".*img/gone1\.png, .*img/gone2\.png"):
        dm.setup()
