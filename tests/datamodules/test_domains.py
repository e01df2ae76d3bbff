"""Domain folders: source/target choice by name, the real release layouts, DomainNet's official lists, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lightning_transfer.datamodules.domains import PACS, DomainNet, Office31, OfficeHome

CFG = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}


def write_domains(root, domains, classes, per_class=2, inner="", empty_classes=()):
    """``root/<domain>/<inner>/<class>/<i>.png`` tiny images; ``empty_classes`` get a folder but no image."""
    rng = np.random.default_rng(0)
    for domain in domains:
        for name in [*classes, *empty_classes]:
            folder = root / domain / inner / name
            folder.mkdir(parents=True)
            for i in range(per_class if name in classes else 0):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{domain}_{i}.png")
    return root


def _domain_of(path):
    return path.rsplit("/", 1)[1].split("_")[0]


def test_office31_source_to_target_in_the_release_layout(tmp_path):
    classes = [f"class{i:02d}" for i in range(31)]
    root = write_domains(tmp_path / "office31", ["amazon", "dslr", "webcam"], classes, per_class=10, inner="images")
    dm = Office31(source="amazon", target="WebCam", data_dir=str(tmp_path), data_config=CFG)
    dm.setup()
    assert dm.root == root and dm.num_classes == 31 and dm.class_names[:2] == ["class00", "class01"]
    assert {_domain_of(p) for p, _ in dm.samples["train"] + dm.samples["val"]} == {"amazon"}
    assert {_domain_of(p) for p, _ in dm.samples["test"]} == {"webcam"} and len(dm.samples["test"]) == 310
    assert Counter(y for _, y in dm.samples["val"]) == {c: 1 for c in range(31)}  # 10% of every source class
    assert not set(dm.samples["train"]) & set(dm.samples["val"])
    assert dm.split_info()["data/variant"] == "amazon->webcam"
    x, y = dm.datasets["test"][0]
    assert x.shape == (3, 8, 8) and y == 0


def test_pacs_leave_one_domain_out_and_office_home_real_world(tmp_path):
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    write_domains(tmp_path / "pacs" / "kfold", ["art_painting", "cartoon", "photo", "sketch"], classes, per_class=10)
    dm = PACS(source=["photo", "Cartoon", "sketch"], target="art-painting", data_dir=str(tmp_path), data_config=CFG)
    dm.setup()
    assert {_domain_of(p) for p, _ in dm.samples["train"]} == {"photo", "cartoon", "sketch"}
    assert {_domain_of(p) for p, _ in dm.samples["test"]} == {"art"}
    assert dm.split_info()["data/variant"] == "photo+cartoon+sketch->art_painting"

    home = [f"c{i}" for i in range(65)]
    write_domains(tmp_path / "office_home", ["Art", "Real World"], home, per_class=2)
    oh = OfficeHome(source="real_world", data_dir=str(tmp_path), data_config=CFG, val_fraction=0.5)
    oh.setup()  # no target: the held-out source images are the test set
    assert oh.datasets["test"] is oh.datasets["val"]
    assert {_domain_of(p) for p, _ in oh.samples["test"]} == {"Real World"}


def test_domainnet_official_lists_and_their_label_check(tmp_path):
    root = tmp_path / "domainnet"
    classes = ["aircraft_carrier", "airplane"]
    write_domains(root, ["clipart", "sketch"], classes, per_class=4, empty_classes=[f"z{i:03d}" for i in range(343)])
    for domain in ("clipart", "sketch"):
        rows = [f"{domain}/{c}/{domain}_{i}.png {k}" for k, c in enumerate(classes) for i in range(4)]
        (root / f"{domain}_train.txt").write_text("\n".join(r for r in rows if not r.split()[0].endswith("3.png")))
        (root / f"{domain}_test.txt").write_text("\n".join(r for r in rows if r.split()[0].endswith("3.png")))
    dm = DomainNet(source="clipart", target="sketch", root=str(root), data_config=CFG)
    dm.setup()
    assert dm.num_classes == 345 and dm.split_info()["data/variant"] == "clipart->sketch/official"
    assert sorted(p.rsplit("/", 1)[1] for p, _ in dm.samples["test"]) == ["sketch_3.png", "sketch_3.png"]
    assert len(dm.samples["train"]) + len(dm.samples["val"]) == 6
    (root / "sketch_test.txt").write_text("sketch/airplane/sketch_3.png 0\n")
    with pytest.raises(ValueError, match="sketch_3.png.*label 0 .*class folder 'airplane'"):
        DomainNet(source="clipart", target="sketch", root=str(root), data_config=CFG).setup()
    (root / "sketch_test.txt").unlink()  # without the lists: every image of the domain
    folders = DomainNet(source="clipart", target="sketch", root=str(root), data_config=CFG)
    folders.setup()
    assert len(folders.samples["test"]) == 8 and folders.split_info()["data/variant"] == "clipart->sketch"


def test_names_and_missing_data_fail_early_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no domain 'product'; its domains are: amazon, dslr, webcam"):
        Office31(source="product")
    with pytest.raises(ValueError, match="also a source domain"):
        Office31(source="amazon", target="amazon")
    dm = Office31(source="amazon", target="dslr", data_dir=str(tmp_path))  # the constructor reads nothing
    with pytest.raises(FileNotFoundError, match=r"'amazon' not found under .*office31.*domain_adaptation_images"):
        _ = dm.class_names
    write_domains(tmp_path / "office31", ["amazon", "dslr"], [f"c{i}" for i in range(30)], per_class=1)
    with pytest.raises(ValueError, match="30 class folders, expected 31"):
        Office31(source="amazon", target="dslr", data_dir=str(tmp_path), data_config=CFG).setup()
    write_domains(tmp_path / "pacs", ["photo"], [f"c{i}" for i in range(7)], per_class=1)
    write_domains(tmp_path / "pacs", ["sketch"], [f"d{i}" for i in range(7)], per_class=1)
    with pytest.raises(ValueError, match="class folders of 'sketch' differ"):
        PACS(source="photo", target="sketch", data_dir=str(tmp_path), data_config=CFG).setup()
