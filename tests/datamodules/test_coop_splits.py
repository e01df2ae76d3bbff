"""CoOp's split-file reader and the class-name rules that map torchvision's names to the ones CoOp prompts with."""

from __future__ import annotations

import json

import pytest

from lightning_transfer.datamodules import coop_splits as coop


def test_torchvision_names_become_coop_names():
    assert coop.clean_class_name("apple_pie") == "apple pie"
    assert coop.clean_class_name(" sweet__pepper ") == "sweet pepper"
    assert coop.oxford_pets_name("American Bulldog") == "american bulldog"
    assert coop.stanford_cars_name("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert coop.clean_class_name(coop.sun397_name("apartment_building/outdoor")) == "outdoor apartment building"
    assert coop.sun397_name("abbey") == "abbey"
    assert coop.eurosat_name("SeaLake") == "Sea or Lake" and len(coop.EUROSAT_NAMES) == 10
    assert [coop.caltech101_name(n) for n in ("airplanes", "Faces", "accordion")] == ["airplane", "face", "accordion"]


def test_split_file_labels_and_names(tmp_path):
    path = tmp_path / "split.json"
    items = {"train": [["b/1.jpg", 1, "sea_lake"], ["a/1.jpg", 0, "forest"]], "val": [["a/2.jpg", 0, "forest"]],
             "test": [["b/2.jpg", 1, "sea_lake"]]}
    path.write_text(json.dumps(items))
    names, splits = coop.read_coop_split(path, tmp_path / "images")
    assert names == ["forest", "sea lake"]
    assert splits["train"] == [(str(tmp_path / "images" / "b/1.jpg"), 1), (str(tmp_path / "images" / "a/1.jpg"), 0)]
    path.write_text(json.dumps({**items, "test": [["b/2.jpg", 1, "river"]]}))
    with pytest.raises(ValueError, match="label 1 is named both 'sea_lake' and 'river'"):
        coop.read_coop_split(path, tmp_path)
    path.write_text(json.dumps({**items, "val": [["a/2.jpg", 2, "river"]]}))  # labels 0, 1, 2 but no gap: fine
    assert coop.read_coop_split(path, tmp_path)[0] == ["forest", "sea lake", "river"]
    path.write_text(json.dumps({**items, "val": [["a/2.jpg", 5, "river"]]}))
    with pytest.raises(ValueError, match=r"\(val\): label 5 of .*a/2\.jpg.* outside the 3 classes"):
        coop.read_coop_split(path, tmp_path)
    path.write_text(json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train item \['a.jpg', 0\] is not \[path, label, class name\]"):
        coop.read_coop_split(path, tmp_path)
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="has no 'val' list"):
        coop.read_coop_split(path, tmp_path)
