"""MNIST / USPS / SVHN: the offline file formats, torchvision's download path from a local server, errors, real data."""

from __future__ import annotations

import bz2
import gzip
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST, SVHN, USPS

from lightning_transfer.datamodules.digit_domains import DigitDomains, read_idx
from tests.helpers.local_server import serve_folder

GRAY28 = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.25,)}
RGB32 = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def _digits(n, size, channels=0, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels else (n, size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n) % 10


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(folder, n_train=40, n_test=20):
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = _digits(n, 28, seed=n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)


def write_usps_esl(folder, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        x, y = _digits(n, 16)
        values = x.reshape(n, -1) / 255.0 * 2 - 1  # [-1, 1] as in the ESL files
        np.savetxt(folder / f"zip.{split}.gz", np.column_stack([y, values]), fmt="%.4f")


def write_usps_libsvm(folder, n=30):
    for name in ("usps.bz2", "usps.t.bz2"):
        x, y = _digits(n, 16)
        rows = [f"{label + 1} " + " ".join(f"{j + 1}:{v / 255 * 2 - 1:.6f}" for j, v in enumerate(img.ravel()))
                for img, label in zip(x, y)]  # libsvm's USPS labels are 1..10
        (folder / name).write_bytes(bz2.compress(("\n".join(rows) + "\n").encode()))


def write_svhn(folder, n=30):
    from scipy.io import savemat

    for split in ("train", "test"):
        x, y = _digits(n, 32, channels=3)
        savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": np.where(y == 0, 10, y)[:, None]})


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_offline_formats_source_to_target(tmp_path):
    write_mnist(tmp_path / "mnist")
    write_usps_esl(tmp_path / "usps")
    dm = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28, val_fraction=0.25)
    recorder = SimpleNamespace(params={})
    dm.trainer = SimpleNamespace(loggers=[SimpleNamespace(log_hyperparams=recorder.params.update)])
    dm.setup()
    assert [len(dm.datasets[k]) for k in ("train", "val", "test")] == [30, 10, 30]
    assert recorder.params["data/variant"] == "mnist[idx]->usps[esl]" and recorder.params["data/num_val"] == 10
    mnist_x, _ = _digits(40, 28, seed=40)
    x, y = dm.datasets["train"][0]
    i = dm.splits["train"][0]
    assert x.shape == (1, 28, 28) and int(y) == i % 10
    assert torch.allclose(x[0], (torch.from_numpy(mnist_x[i]).float() / 255 - 0.5) / 0.25, atol=1e-5)
    usps_x, _ = _digits(30, 16)
    rgb = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=RGB32, val_fraction=0.5)
    rgb.setup()
    x, _ = rgb.datasets["test"][3]
    assert x.shape == (3, 32, 32)  # gray repeated over the backbone's three channels, resized 16 -> 32
    assert torch.allclose(x[0] * 0.2 + 0.5, x[1] * 0.25 + 0.4, atol=1e-5)
    assert (x[0] * 0.2 + 0.5).mean().item() == pytest.approx(usps_x[3].mean() / 255, abs=0.02)
    again = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=RGB32, val_fraction=0.25)
    again.setup()
    assert again.split_info()["data/split_digest"] == recorder.params["data/split_digest"]
    assert rgb.split_info()["data/split_digest"] != recorder.params["data/split_digest"]  # other validation share


def test_download_path_through_torchvision_from_a_local_server(tmp_path, monkeypatch):
    files = tmp_path / "served"
    write_mnist(files)
    write_usps_libsvm(files)
    write_svhn(files)
    with serve_folder(files) as base:
        url = base + "/"
        monkeypatch.setattr(MNIST, "mirrors", [url])
        monkeypatch.setattr(MNIST, "resources", [(p.name, _md5(p)) for p in sorted(files.glob("*-ubyte.gz"))])
        monkeypatch.setattr(USPS, "split_list", {s: [url + f, f, _md5(files / f)] for s, f in
                                                 (("train", "usps.bz2"), ("test", "usps.t.bz2"))})
        monkeypatch.setattr(SVHN, "split_list", {s: [url + f"{s}_32x32.mat", f"{s}_32x32.mat",
                                                     _md5(files / f"{s}_32x32.mat")] for s in ("train", "test")})
        data = tmp_path / "data"
        svhn_to_mnist = DigitDomains(source="svhn", target="mnist", download=True, data_dir=str(data),
                                     data_config=GRAY28)
        svhn_to_mnist.prepare_data()
        usps = DigitDomains(source="usps", target=None, download=True, data_dir=str(data), data_config=GRAY28)
        usps.prepare_data()
    assert (data / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file()
    assert (data / "svhn" / "train_32x32.mat").is_file() and (data / "usps" / "usps.t.bz2").is_file()
    offline = DigitDomains(source="svhn", target="mnist", data_dir=str(data), data_config=GRAY28)  # no download now
    offline.setup()
    assert offline.variant == "svhn[mat]->mnist[idx]" and len(offline.datasets["test"]) == 20
    svhn_x, _ = _digits(30, 32, channels=3)
    labels = [int(offline.datasets[k][j][1]) for k in ("train", "val") for j in range(len(offline.datasets[k]))]
    assert sorted(labels) == sorted(np.arange(30) % 10)  # SVHN's label 10 is the digit 0
    i = offline.splits["train"][0]
    luma = svhn_x[i].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    expected = (torch.nn.functional.interpolate(torch.from_numpy(luma / 255)[None, None], size=(28, 28),
                                                mode="bilinear", align_corners=False)[0] - 0.5) / 0.25
    assert torch.allclose(offline.datasets["train"][0][0], expected, atol=1e-5)  # colour -> gray for 1 channel
    usps.setup()
    assert usps.variant == "usps[libsvm]->usps[libsvm]" and len(usps.datasets["test"]) == 30


def test_missing_and_corrupt_files_are_named(tmp_path):
    dm = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28)  # reads nothing yet
    with pytest.raises(FileNotFoundError, match=r"MNIST train split not found in .*mnist.*download=true"):
        dm.setup()
    write_mnist(tmp_path / "mnist")
    with pytest.raises(FileNotFoundError, match=r"USPS test split not found .*zip\.test\.gz, usps\.t\.bz2"):
        DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28).setup()
    bad = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-3]))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a uint8 idx file"):
        read_idx(bad)
    write_usps_esl(tmp_path / "usps")
    table = np.loadtxt(tmp_path / "usps" / "zip.test.gz")
    table[4, 0] = 11
    np.savetxt(tmp_path / "usps" / "zip.test.gz", table, fmt="%.4f")
    with pytest.raises(ValueError, match=r"zip\.test\.gz: .*label 11 at index 4 is not a digit"):
        DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28).setup()
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"test_32x32\.mat failed torchvision's checksum"):
        DigitDomains(source="mnist", target="svhn", root=str(tmp_path), data_config=GRAY28).setup()
    (tmp_path / "usps" / "zip.test.gz").unlink()
    (tmp_path / "usps" / "usps.t.bz2").write_bytes(b"not bz2")
    with pytest.raises(ValueError, match=r"cannot read .*usps\.t\.bz2"):
        DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28).setup()
    with pytest.raises(ValueError, match="unknown digit set 'emnist'"):
        DigitDomains(source="emnist")  # type: ignore[arg-type]


def test_real_usps_to_mnist(shared_data):
    dm = DigitDomains(source="usps", target="mnist", root=str(shared_data), data_config=RGB32)
    dm.setup()
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 7291 and dm.variant == "usps[esl]->mnist[idx]"
    assert np.bincount(dm.datasets["test"].labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                                       974, 1009]
    x, _ = dm.datasets["train"][0]
    assert x.shape == (3, 32, 32)
    mnist = dm.datasets["test"].images
    assert mnist.shape == (10000, 28, 28) and 30 < mnist.mean() < 37  # MNIST's mean intensity is ~0.13 * 255
    usps = dm.datasets["train"].images
    assert usps.shape[1:] == (16, 16) and usps.min() == 0 and usps.max() == 255


def test_testing_reads_only_the_target_and_loads_the_source_on_demand(tmp_path):
    # a checkpoint tested on USPS needs no MNIST training files; CAFA's train_dataloader() still gets them then
    write_usps_esl(tmp_path / "usps")
    dm = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28, val_fraction=0.25)
    dm.setup("test")
    assert len(dm.datasets["test"]) == 30 and "train" not in dm.datasets
    assert dm.variant == "mnist[unread]->usps[esl]" and dm.split_info()["data/num_test"] == 30
    with pytest.raises(FileNotFoundError, match="MNIST train split not found"):
        dm.train_dataloader()  # asked for: read now, and a missing file is still named
    write_mnist(tmp_path / "mnist")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 10
    full = DigitDomains(source="mnist", target="usps", root=str(tmp_path), data_config=GRAY28, val_fraction=0.25)
    full.setup("fit")
    assert full.splits == dm.splits and full.split_info() == dm.split_info()  # same data whichever way it was read
    assert len(full.val_dataloader().dataset) == 10
