"""CIFAR-10/100: torchvision's archive format (pickled batches, md5-checked), downloaded from a local server."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torchvision.datasets

from lightning_transfer.datamodules import CIFAR10, CIFAR100
from lightning_transfer.datamodules.corruption import CIFAR10_CLASSES
from tests.helpers.local_server import serve_folder

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
       "crop_pct": 1.0}
PER_CLASS = 2  # images per class in every batch file


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar10_archive(folder, monkeypatch):
    """cifar-10-python.tar.gz in miniature (5 training batches, a test batch, batches.meta), and its md5s."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [c for c in range(10) for _ in range(PER_CLASS)]
        entry = {"batch_label": name, "labels": labels,
                 "data": rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)}
        (batches / name).write_bytes(pickle.dumps(entry))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES}))
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname=batches.name)
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, _md5(batches / n)] for n in names[:5]])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(batches / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(batches / "batches.meta")})
    monkeypatch.setattr(cls, "tgz_md5", _md5(archive))
    return archive


def test_download_kshot_and_digest(tmp_path, monkeypatch):
    archive = _cifar10_archive(tmp_path / "served", monkeypatch)
    data = tmp_path / "data_root"
    with serve_folder(archive.parent) as url:
        monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"{url}/{archive.name}")
        dm = CIFAR10(data_dir=str(data), download=True, num_shots=4, data_config=CFG, batch_size=5)
        dm.prepare_data()
    assert (data / "cifar-10-batches-py" / "data_batch_5").is_file()
    dm.setup()
    assert dm.class_names == CIFAR10_CLASSES
    assert Counter(y for _, y in dm.samples["train"]) == dict.fromkeys(range(10), 4)
    assert Counter(y for _, y in dm.samples["val"]) == dict.fromkeys(range(10), 1)  # 10% of 10 per class, seed 0
    assert not {s for s, _ in dm.samples["train"]} & {s for s, _ in dm.samples["val"]}
    assert len(dm.samples["test"]) == 10 * PER_CLASS
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 16, 16)  # 32x32 resized to the backbone's input
    test_x, test_y = dm.datasets["test"][3]
    assert test_y == 1 and test_x.shape == (3, 16, 16)
    infos = []
    for seed in (1, 1, 2):
        other = CIFAR10(data_dir=str(data), num_shots=4, seed=seed, data_config=CFG)
        other.setup()
        infos.append(other.split_info())
    assert infos[0] == infos[1] == dm.split_info() and infos[2]["data/split_digest"] != infos[0]["data/split_digest"]
    assert infos[0]["data/variant"] == "torchvision"


def test_missing_and_corrupt_files(tmp_path, monkeypatch):
    assert CIFAR10(data_dir=str(tmp_path)).num_classes == 10  # fixed names: known without the data
    assert CIFAR100().class_names[:2] == ["apple", "aquarium fish"] and CIFAR100().num_classes == 100
    with pytest.raises(FileNotFoundError, match=r"no data at .*cifar-10-batches-py; pass data.download=true"):
        CIFAR10(data_dir=str(tmp_path)).setup()
    archive = _cifar10_archive(tmp_path / "served", monkeypatch)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "root", filter="data")
    broken = tmp_path / "root" / "cifar-10-batches-py" / "data_batch_2"
    broken.write_bytes(broken.read_bytes()[:-10])
    with pytest.raises(RuntimeError, match=r"CIFAR10: .*data_batch_2: Dataset not found or corrupted"):
        CIFAR10(data_dir=str(tmp_path / "root")).prepare_data()
