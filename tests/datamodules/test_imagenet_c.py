"""Corruption sets: ImageNet-C's folder layout (one test loader per set) and CIFAR-100-C's .npy files in NpzImages."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lightning_transfer.datamodules.corruption import NpzImages
from lightning_transfer.datamodules.imagenet_c import ImageNetC

CFG = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet_c(root, sets, per_class=4, wnids=WNIDS):
    """``root/<corruption>/<severity>/<wnid>/<i>.JPEG``, the same file names in every set."""
    rng = np.random.default_rng(0)
    for corruption, severity in sets:
        for wnid in wnids:
            folder = root / corruption / str(severity) / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(
                    folder / f"ILSVRC2012_val_{wnid[-2:]}{i:03d}.JPEG")
    return root


def test_one_loader_per_set_and_a_subset_shared_by_all_sets(tmp_path):
    root = write_imagenet_c(tmp_path / "ImageNet-C", [("fog", 1), ("fog", 5), ("gaussian_noise", 1),
                                                      ("gaussian_noise", 5)])
    dm = ImageNetC(corruptions=["gaussian_noise", "fog"], severities=[1, 5], images_per_class=2,
                   data_dir=str(tmp_path), data_config=CFG, batch_size=4)
    recorder = SimpleNamespace(params={})
    dm.trainer = SimpleNamespace(loggers=[SimpleNamespace(log_hyperparams=recorder.params.update)])
    dm.setup("test")
    assert dm.root == root and dm.class_names == WNIDS
    assert dm.test_names == ["gaussian_noise-1", "gaussian_noise-5", "fog-1", "fog-5"]
    loaders = dm.test_dataloader()
    assert len(loaders) == 4 and [len(loader.dataset) for loader in loaders] == [6, 6, 6, 6]
    files = [[p.split("/")[-1] for p, _ in dm.samples[f"test/{n}"]] for n in dm.test_names]
    assert all(f == files[0] for f in files) and len(set(files[0])) == 6  # the same images under every corruption
    assert dm.samples["test/fog-5"][0][0].endswith("fog/5/n01440764/" + files[0][0])
    x, y = loaders[1].dataset[5]
    assert x.shape == (3, 8, 8) and y == 2
    assert recorder.params["data/num_test/fog-1"] == 6 and recorder.params["data/variant"].startswith("imagenet-c/2")
    full = ImageNetC(corruptions=["gaussian_noise", "fog"], severities=[1, 5], data_dir=str(tmp_path), data_config=CFG)
    full.setup("test")
    assert full.split_info()["data/split_digest"] != dm.split_info()["data/split_digest"]
    assert len(full.test_sets[0]) == 12 and "train" not in full.datasets  # no clean_dir: nothing to fit on
    with pytest.raises(ValueError, match="only test sets: pass clean_dir"):
        full.setup("fit")


def test_clean_training_images_and_digest_independent_of_the_folder(tmp_path):
    digests = []
    for name in ("a", "b"):
        root = write_imagenet_c(tmp_path / name / "c", [("contrast", 3)])
        clean = write_imagenet_c(tmp_path / name / "clean", [("x", 0)], per_class=10) / "x" / "0"
        dm = ImageNetC(root=str(root), corruptions=["contrast"], severities=[3], clean_dir=str(clean),
                       data_config=CFG, cache_images=True)
        dm.setup()
        assert len(dm.datasets["train"]) == 27 and len(dm.datasets["val"]) == 3 and len(dm.test_sets) == 1
        assert dm.datasets["train"].images.shape[1:] == (3, 8, 8)
        digests.append(dm.split_info()["data/split_digest"])
    assert digests[0] == digests[1]  # paths are hashed relative to the dataset folders


def test_missing_sets_and_mismatched_classes_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown ImageNet-C corruption 'rain'"):
        ImageNetC(corruptions=["rain"])
    with pytest.raises(ValueError, match="severities must be in 1-5"):
        ImageNetC(severities=[0])
    dm = ImageNetC(corruptions=["all"], data_dir=str(tmp_path), data_config=CFG)  # the constructor reads nothing
    assert len(dm.test_names) == 15
    with pytest.raises(FileNotFoundError, match=r"gaussian_noise-5 not found: no folder .*ImageNet-C/gaussian_noise/5"
                                                r".*zenodo\.org/record/2235448"):
        dm.setup("test")
    root = write_imagenet_c(tmp_path / "c", [("snow", 2)])
    write_imagenet_c(tmp_path / "c", [("frost", 2)], wnids=WNIDS[:2])
    with pytest.raises(ValueError, match=r"class folders of .*frost/2 differ"):
        ImageNetC(root=str(root), corruptions=["snow", "frost"], severities=[2], data_config=CFG).setup("test")
    broken = next((root / "snow" / "2" / WNIDS[0]).iterdir())
    broken.write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=f"cannot read image .*{broken.name}"):
        ImageNetC(root=str(root), corruptions=["snow"], severities=[2], data_config=CFG, cache_images=True).setup()


def test_cifar100_c_npy_release_in_npz_images(tmp_path):
    """CIFAR-100-C ships ``<corruption>.npy`` (5 severities x 10,000) and ``labels.npy`` but no clean images."""
    rng = np.random.default_rng(0)
    n = 300  # per severity; the real files hold 10,000
    labels = np.tile(np.arange(100, dtype=np.uint8), 3)
    images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", np.tile(labels, 5))
    dm = NpzImages(train_file=None, test_file=None, corruptions=["fog"], severities=[2, 5],
                   corrupted_dir=str(tmp_path), data_config={**CFG, "input_size": (3, 32, 32)})
    assert dm.num_classes == 100 and dm.class_names[99] == "99"
    dm.setup("test")
    assert [len(s) for s in dm.test_sets] == [n, n]
    x, y = dm.test_sets[1][7]  # severity 5 is the last block
    assert int(y) == 7 and np.allclose(x.numpy(), (images[4 * n + 7].transpose(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="test_file=None needs corrupted_dir"):
        NpzImages(train_file=None, test_file=None, corruptions=["fog"])
