"""Benchmark datasets on tiny fixtures in their exact on-disk formats: CoOp split files and torchvision layouts.

Each fixture is written by its test: a CoOp-layout Oxford Pets folder with ``split_zhou_OxfordPets.json``,
FGVC-Aircraft's variant lists, an ImageNet folder with ``classnames.txt``, UCF101 middle frames, torchvision's DTD,
Pets, EuroSAT and Caltech-101 layouts. The download path runs torchvision's real downloader against a local server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from types import SimpleNamespace

import pytest
import torchvision.datasets
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger

from lightning_transfer.datamodules import DTD, UCF101, Caltech101, EuroSAT, FGVCAircraft, ImageNet, OxfordPets
from lightning_transfer.module import TransferModule
from lightning_transfer.strategies import LinearProbe
from tests.helpers.coop_data import PETS, coop_pets, write_image
from tests.helpers.local_server import serve_folder
from tests.helpers.models import tiny_cnn

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
       "crop_pct": 1.0}
def _digest(dm):
    return dm.split_info()["data/split_digest"]


def test_coop_split_names_kshot_and_digest(tmp_path):
    coop_pets(tmp_path)
    dm = OxfordPets(data_dir=str(tmp_path), num_shots=2, seed=1, data_config=CFG, batch_size=4)
    dm.setup()
    assert dm.class_names == ["abyssinian", "american bulldog", "beagle"]
    assert Counter(y for _, y in dm.samples["train"]) == {0: 2, 1: 2, 2: 2}
    assert Counter(y for _, y in dm.samples["val"]) == {0: 2, 1: 2, 2: 2}  # min(K, 4) of the 3 per class
    assert len(dm.samples["test"]) == 9 and dm.samples["test"][0][0].endswith("oxford_pets/images/Abyssinian_28.jpg")
    assert dm.split_info()["data/variant"] == "coop:split_zhou_OxfordPets.json"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    again = OxfordPets(data_dir=str(tmp_path), num_shots=2, seed=1, data_config=CFG)
    again.setup()
    other = OxfordPets(data_dir=str(tmp_path), num_shots=2, seed=2, data_config=CFG)
    other.setup()
    assert _digest(again) == _digest(dm) and _digest(other) != _digest(dm)
    # the same images in torchvision's folder: same samples relative to the image folder, same digest
    shutil.move(tmp_path / "oxford_pets" / "images", tmp_path / "oxford-iiit-pet" / "images")
    moved = OxfordPets(data_dir=str(tmp_path), num_shots=2, seed=1, data_config=CFG)
    moved.setup()
    assert "oxford-iiit-pet" in moved.samples["train"][0][0] and _digest(moved) == _digest(dm)


def test_missing_data_says_where_and_how(tmp_path):
    dm = OxfordPets(data_dir=str(tmp_path / "empty"))  # configs instantiate without the data
    with pytest.raises(FileNotFoundError, match=r"no images at .*empty/oxford_pets/images or .*oxford-iiit-pet/images;"
                       r" pass data.download=true .*split_zhou_OxfordPets.json"):
        dm.prepare_data()
    (tmp_path / "pets" / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"split file not found \(looked at .*split_zhou_OxfordPets.json.*"
                       r"data.split_file"):
        _ = OxfordPets(data_dir=str(tmp_path / "pets")).class_names
    with pytest.raises(FileNotFoundError, match=r"no images at .*ucf101/UCF-101-midframes; download it from"):
        UCF101(data_dir=str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="UCF101 cannot be downloaded"):
        UCF101(download=True)
    with pytest.raises(ValueError, match="ImageNet has no torchvision dataset"):
        ImageNet(protocol="torchvision")


def test_bad_label_corrupt_json_and_corrupt_image_name_the_file(tmp_path):
    split = coop_pets(tmp_path, counts=(2, 1, 1))
    path = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    path.write_text(json.dumps({**split, "test": [*split["test"], ["beagle_99.jpg", 7, "beagle"]]}))
    with pytest.raises(ValueError, match=r"split_zhou_OxfordPets.json.*\(test\): label 7 of .*beagle_99\.jpg.* "
                                         r"outside the 4 classes"):
        OxfordPets(data_dir=str(tmp_path), data_config=CFG).setup()
    path.write_text('{"train": [')
    with pytest.raises(ValueError, match="cannot read CoOp split file .*split_zhou_OxfordPets.json"):
        OxfordPets(data_dir=str(tmp_path)).prepare_data()
    path.write_text(json.dumps(split))
    (tmp_path / "oxford_pets" / "images" / "beagle_6.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dm = OxfordPets(data_dir=str(tmp_path), data_config=CFG, batch_size=8)
    dm.setup()
    with pytest.raises(RuntimeError, match=r"cannot read image .*beagle_6\.jpg"):
        list(dm.train_dataloader())


def _fgvc(folder):
    variants = ["707-320", "Cessna 172", "F-16A/B"]
    (folder).mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 1000000
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for variant in variants:
            for _ in range(count):
                n += 1
                write_image(folder / "images" / f"{n}.jpg", n)
                lines.append(f"{n} {variant}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def test_fgvc_aircraft_variant_lists_in_both_protocols(tmp_path):
    _fgvc(tmp_path / "fgvc-aircraft-2013b" / "data")  # torchvision's layout; CoOp's is this folder renamed
    coop = FGVCAircraft(data_dir=str(tmp_path), data_config=CFG)
    coop.setup()
    assert coop.class_names == ["707-320", "Cessna 172", "F-16A/B"]
    assert [len(coop.samples[s]) for s in ("train", "val", "test")] == [9, 6, 6]
    tv = FGVCAircraft(data_dir=str(tmp_path), protocol="torchvision", data_config=CFG)
    tv.setup()
    assert tv.samples == coop.samples and tv.class_names == coop.class_names and _digest(tv) == _digest(coop)
    assert tv.split_info()["data/variant"] == "torchvision:train/val/test"
    lists = tmp_path / "fgvc-aircraft-2013b" / "data" / "images_variant_val.txt"
    lists.write_text(lists.read_text() + "1000099 Boeing 999\n")
    with pytest.raises(ValueError, match=r"images_variant_val.txt' line 7: variant 'Boeing 999' of image 1000099"):
        FGVCAircraft(data_dir=str(tmp_path)).prepare_data()


def test_imagenet_folders_and_classnames(tmp_path):
    root = tmp_path / "imagenet"
    for split, count in (("train", 5), ("val", 2)):
        for k, wnid in enumerate(("n01440764", "n01443537")):
            for i in range(count):
                write_image(root / "images" / split / wnid / f"{wnid}_{i}.JPEG", 10 * k + i)
    (root / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    dm = ImageNet(data_dir=str(tmp_path), num_shots=3, data_config=CFG)
    dm.setup()
    assert dm.class_names == ["tench", "goldfish"]
    assert Counter(y for _, y in dm.samples["train"]) == {0: 3, 1: 3}
    assert len(dm.samples["test"]) == 4 and all("/val/" in p for p, _ in dm.samples["test"])
    (root / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match=r"classnames.txt' has no name for the class folders \['n01443537'\]"):
        ImageNet(data_dir=str(tmp_path)).prepare_data()


def test_ucf101_middle_frames(tmp_path):
    folder = tmp_path / "ucf101" / "UCF-101-midframes"
    split = {s: [] for s in ("train", "val", "test")}
    for label, action in enumerate(("Apply_Eye_Makeup", "Basketball")):
        for i, s in enumerate(("train", "train", "val", "test")):
            write_image(folder / action / f"v_{action}_g0{i}_c01.jpg", i)
            split[s].append([f"{action}/v_{action}_g0{i}_c01.jpg", label, action])
    (tmp_path / "ucf101" / "split_zhou_UCF101.json").write_text(json.dumps(split))
    dm = UCF101(data_dir=str(tmp_path), data_config=CFG)
    dm.setup()
    assert dm.class_names == ["Apply Eye Makeup", "Basketball"]
    assert [len(dm.samples[s]) for s in ("train", "val", "test")] == [4, 2, 2]


def test_torchvision_pets_names_match_coop(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, count in (("trainval", 4), ("test", 2)):
        lines = []
        for label, breed in enumerate(PETS):
            for i in range(count):
                image_id = f"{breed}_{split}{i}"
                write_image(base / "images" / f"{image_id}.jpg", i)
                lines.append(f"{image_id} {label + 1} {1 if breed[0].isupper() else 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    dm = OxfordPets(data_dir=str(tmp_path), protocol="torchvision", data_config=CFG)
    dm.setup()
    assert dm.class_names == ["abyssinian", "american bulldog", "beagle"]  # CoOp's names, not "American Bulldog"
    assert len(dm.samples["train"]) + len(dm.samples["val"]) == 12 and len(dm.samples["test"]) == 6


def test_torchvision_sets_without_official_split(tmp_path):
    for cls in ("AnnualCrop", "Forest", "SeaLake"):
        for i in range(10):
            write_image(tmp_path / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", i)
    dm = EuroSAT(data_dir=str(tmp_path), protocol="torchvision", data_config=CFG)
    dm.setup()
    assert dm.class_names == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert Counter(y for _, y in dm.samples["test"]) == {0: 3, 1: 3, 2: 3}  # 30% per class, seed 0
    assert dm.split_info()["data/variant"] == "torchvision:test30%-seed0"
    folder = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls in ("BACKGROUND_Google", "Faces", "Faces_easy", "dollar_bill"):
        for i in range(1, 5):
            write_image(folder / cls / f"image_{i:04d}.jpg", i)
    caltech = Caltech101(data_dir=str(tmp_path), protocol="torchvision", data_config=CFG)
    caltech.setup()
    assert caltech.class_names == ["face", "Faces easy", "dollar bill"]
    every = sorted(p for s in caltech.samples.values() for p, _ in s)
    assert len(every) == 12 and all(p.endswith(".jpg") and "BACKGROUND" not in p for p in every)


def _dtd_archive(folder):
    """dtd-r1.0.1.tar.gz in miniature: dtd/images/<class>/<class>_<n>.jpg and dtd/labels/{train,val,test}1.txt."""
    lines = {"train": [], "val": [], "test": []}
    for cls in ("banded", "zigzagged"):
        for i, split in enumerate(("train", "train", "train", "val", "test", "test")):
            write_image(folder / "dtd" / "images" / cls / f"{cls}_{i:04d}.jpg", i)
            lines[split].append(f"{cls}/{cls}_{i:04d}.jpg")
    (folder / "dtd" / "labels").mkdir()
    for split, rows in lines.items():
        (folder / "dtd" / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
    archive = folder / "dtd-r1.0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "dtd", arcname="dtd")
    return archive, lines


def test_download_with_torchvision_from_a_local_server(tmp_path, monkeypatch):
    archive, lines = _dtd_archive(tmp_path / "served")
    data = tmp_path / "data_root"
    with serve_folder(archive.parent) as url:
        monkeypatch.setattr(torchvision.datasets.DTD, "_URL", f"{url}/{archive.name}")
        monkeypatch.setattr(torchvision.datasets.DTD, "_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
        dm = DTD(data_dir=str(data), protocol="torchvision", download=True, data_config=CFG)
        dm.prepare_data()
    assert (data / "dtd" / "dtd" / "images" / "banded" / "banded_0000.jpg").is_file()
    dm.setup()
    assert dm.class_names == ["banded", "zigzagged"]
    assert [len(dm.samples[s]) for s in ("train", "val", "test")] == [6, 2, 4]
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 16, 16)
    # CoOp's protocol on the downloaded images: the split file goes into CoOp's dtd/ folder
    coop = DTD(data_dir=str(data), data_config=CFG)
    with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json"):
        coop.prepare_data()
    split = {s: [[row, int(row.startswith("z")), row.split("/")[0]] for row in rows] for s, rows in lines.items()}
    (data / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    coop = DTD(data_dir=str(data), data_config=CFG)
    coop.setup()
    assert [(p.split("images/")[1], y) for p, y in coop.samples["test"]] == [
        (p.split("images/")[1], y) for p, y in dm.samples["test"]]


class _Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.params = {}

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        pass


def test_trainer_runs_and_the_split_is_logged(tmp_path):
    coop_pets(tmp_path, counts=(3, 2, 2))
    dm = OxfordPets(data_dir=str(tmp_path), num_shots=2, batch_size=3)  # data_config from the backbone
    module = TransferModule(tiny_cnn(), LinearProbe(), num_classes=dm.num_classes, class_names=dm.class_names)
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished and dm.datasets["train"][0][0].shape == (3, 32, 32)
    recorder = _Recorder()
    logged = OxfordPets(data_dir=str(tmp_path), num_shots=2, data_config=CFG)
    logged.trainer = SimpleNamespace(loggers=[recorder])
    logged.setup()
    assert recorder.params["data/split_digest"] == _digest(dm) and recorder.params["data/num_train"] == 6
    assert recorder.params["data/variant"] == "coop:split_zhou_OxfordPets.json"
