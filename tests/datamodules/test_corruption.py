"""CIFAR-10-C corruptions: every type and severity, determinism, published formulas, the .npy loader, datamodule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_transfer.datamodules import corruption as C
from lightning_transfer.datamodules.corruption import (
    CORRUPTIONS,
    Corrupt,
    CorruptedDataset,
    NpzImages,
    corrupt,
    load_corrupted_npy,
)


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a smooth image with texture: gradients plus noise, so blurs and noise both visibly act on it
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.integers(0, 55, (size, size, 3))
    return base.astype(np.uint8)


def test_the_fifteen_benchmark_corruptions():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_is_deterministic_and_grows_with_severity(name):
    image = _image()
    outs = [corrupt(image, name, s, seed=0) for s in range(1, 6)]
    for out in outs:
        assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(corrupt(image, name, 5, seed=0), outs[4])  # same seed, same image -> same result
    change = [np.abs(o.astype(float) - image).mean() for o in outs]
    assert change[4] > 1.0, f"{name} at severity 5 barely changes the image"
    if name == "elastic_transform":  # the published CIFAR severity 1 is a pure (large) affine warp: not monotone
        return
    assert change[4] > change[0], f"{name}: severity 5 ({change[4]:.2f}) not stronger than 1 ({change[0]:.2f})"


@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "snow", "fog", "frost", "elastic_transform"])
def test_random_corruptions_depend_on_seed_and_image(name):
    image = _image()
    a, b = corrupt(image, name, 5, seed=0), corrupt(image, name, 5, seed=1)
    assert not np.array_equal(a, b)


def test_published_formulas_for_the_deterministic_ones():
    image = _image()
    x = image / 255.0
    expected = np.uint8(np.clip((x - x.mean((0, 1))) * 0.15 + x.mean((0, 1)), 0, 1) * 255)
    assert np.array_equal(corrupt(image, "contrast", 5), expected)
    box = Image.Resampling.BOX
    small = np.asarray(Image.fromarray(image).resize((20, 20), box).resize((32, 32), box))
    assert np.array_equal(corrupt(image, "pixelate", 5), small)  # int(32 * 0.65) = 20, box filter both ways
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    assert np.array_equal(corrupt(image, "brightness", 5), np.uint8(np.clip(hsv_to_rgb(hsv), 0, 1) * 255))


def test_noise_statistics_match_the_published_parameters():
    flat = np.full((64, 64, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    noise = C.gaussian_noise(flat / 255.0, 5, rng) - flat / 255.0
    assert noise.std() == pytest.approx(0.10, rel=0.05)  # sigma 0.10 at severity 5
    salt = C.impulse_noise(flat / 255.0, 5, rng)
    assert ((salt == 0) | (salt == 1)).mean() == pytest.approx(0.07, abs=0.01)  # 7% of values flipped
    shot = C.shot_noise(flat / 255.0, 5, rng)
    assert shot.mean() == pytest.approx(128 / 255, abs=0.01) and shot.std() == pytest.approx(
        np.sqrt(128 / 255 / 50), rel=0.1)  # Poisson with 50 photons per unit intensity


def test_defocus_kernel_is_a_normalised_disk():
    kernel = C._disk(1.5, 0.1)
    assert kernel.shape == (17, 17) and kernel.sum() == pytest.approx(1.0)
    assert kernel[8, 8] == kernel.max() and kernel[8, 10] == 0  # radius 1.5: (0, 2) is outside


def test_bad_names_and_inputs_say_what_is_allowed():
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(_image(), "rain", 3)
    with pytest.raises(ValueError, match="severity must be 1-5"):
        Corrupt("fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(_image().astype(np.float32), "fog", 1)


def test_corrupted_dataset_wraps_any_image_dataset():
    images = [Image.fromarray(_image(i)) for i in range(3)]
    base = list(zip(images, [0, 1, 2]))
    wrapped = CorruptedDataset(base, "jpeg_compression", 5, seed=2, transform=np.asarray)
    out, label = wrapped[1]
    assert label == 1 and np.array_equal(out, corrupt(_image(1), "jpeg_compression", 5, seed=2))


def _write_cifar_c(root, n=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(root / "fog.npy", images)
    np.save(root / "labels.npy", labels)
    return images, labels


def test_official_npy_loader_reads_one_severity_block(tmp_path):
    images, labels = _write_cifar_c(tmp_path)
    x, y = load_corrupted_npy(tmp_path, "fog", 3, num_images=4)
    assert np.array_equal(x, images[8:12]) and np.array_equal(y, labels[8:12]) and y.dtype == np.int64
    with pytest.raises(FileNotFoundError, match="zenodo"):
        load_corrupted_npy(tmp_path, "snow", 1, num_images=4)
    with pytest.raises(ValueError, match="expected"):
        load_corrupted_npy(tmp_path, "fog", 1, num_images=5)


def _write_npz(root, n=20):
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        (root / name).mkdir()
        np.savez(root / name / "d.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=(np.arange(n) % 10).astype(np.uint8))


def test_datamodule_one_test_loader_per_corruption(tmp_path):
    _write_npz(tmp_path)
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    dm = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz",
                   corruptions=["fog", "contrast"], severities=[1, 5], batch_size=8, data_config=cfg)
    dm.setup("test")
    assert dm.test_names == ["fog-1", "fog-5", "contrast-1", "contrast-5"] and len(dm.test_dataloader()) == 4
    assert dm.class_names[0] == "airplane" and dm.num_classes == 10
    raw = np.load(tmp_path / "test" / "d.npz")["x"]
    expected = (torch.from_numpy(corrupt(raw[3], "contrast", 5)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(dm.test_sets[3][3][0], expected)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 20
    clean = NpzImages(data_dir=str(tmp_path), train_file=None, test_file="test/d.npz", data_config=cfg)
    clean.setup()
    assert clean.test_names == ["clean"] and isinstance(clean.test_dataloader(), torch.utils.data.DataLoader)


def test_datamodule_reads_official_files_and_names_missing_ones(tmp_path):
    _write_npz(tmp_path, n=4)
    images, _ = _write_cifar_c(tmp_path, n=4)
    cfg = {"input_size": (3, 32, 32), "mean": (0, 0, 0), "std": (1, 1, 1)}
    dm = NpzImages(data_dir=str(tmp_path), train_file=None, test_file="test/d.npz", corruptions=["fog"],
                   severities=[2], corrupted_dir=str(tmp_path), data_config=cfg)
    dm.setup()
    torch.testing.assert_close(_stack(dm.test_sets[0]), torch.from_numpy(images[4:8]).permute(0, 3, 1, 2) / 255.0)
    missing = NpzImages(data_dir=str(tmp_path / "nowhere"), data_config=cfg)
    with pytest.raises(FileNotFoundError, match="set data_dir"):
        missing.setup()
    with pytest.raises(ValueError, match="unknown corruption"):
        NpzImages(corruptions=["rain"])


def test_shared_cifar_subsets_load(shared_data):
    dm = NpzImages(data_dir=str(shared_data), corruptions=["gaussian_noise"], severities=[5],
                   data_config={"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
    dm.setup()
    assert len(dm.test_sets[0]) == 1000 and len(dm.datasets["train"]) + len(dm.datasets["val"]) == 1000
    assert 90 <= len(dm.datasets["val"]) <= 110  # 10% of each class, rounded per class
    assert np.bincount(dm.test_sets[0].targets).tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


def test_relative_corrupted_dir_is_read_from_data_dir_and_errors_name_the_option(tmp_path, monkeypatch):
    (tmp_path / "data" / "CIFAR-100-C").mkdir(parents=True)
    images, _ = _write_cifar_c(tmp_path / "data" / "CIFAR-100-C", n=4)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter, as for train_file/test_file
    cfg = {"input_size": (3, 32, 32), "mean": (0, 0, 0), "std": (1, 1, 1)}
    dm = NpzImages(data_dir=str(tmp_path / "data"), train_file=None, test_file=None, corrupted_dir="CIFAR-100-C",
                   corruptions=["fog"], severities=[2], data_config=cfg)
    dm.setup("test")
    torch.testing.assert_close(_stack(dm.test_sets[0]), torch.from_numpy(images[4:8]).permute(0, 3, 1, 2) / 255.0)
    with pytest.raises(FileNotFoundError, match=r"snow\.npy not found: .*pass its folder as corrupted_dir"):
        load_corrupted_npy(tmp_path / "data" / "CIFAR-100-C", "snow", 1, num_images=4)
    with pytest.raises(ValueError, match=r"expected 25 of each.*test_file: null"):
        load_corrupted_npy(tmp_path / "data" / "CIFAR-100-C", "fog", 1, num_images=5)


def _stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_test_sets_stay_uint8_at_stored_size_and_equal_the_eager_tensors(tmp_path):
    # 15 corruptions of 10k images as float32 at 224x224 would take ~90 GB: keep uint8, resize per item
    import pickle

    _write_npz(tmp_path, n=20)
    cfg = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    dm = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz",
                   corruptions=["fog", "contrast"], severities=[3], val_fraction=0.5, data_config=cfg)
    dm.setup("test")
    raw = np.load(tmp_path / "test" / "d.npz")["x"]
    for dataset, name in zip(dm.test_sets, ["fog", "contrast"]):
        assert dataset.images.dtype == np.uint8 and dataset.images.shape == (20, 32, 32, 3)
        assert len(pickle.dumps(dataset)) < 20 * 32 * 32 * 3 + 10_000  # workers get the uint8 bytes, not floats
        eager = C.uint8_images_to_tensor(np.stack([corrupt(img, name, 3) for img in raw]), cfg)  # the old path
        torch.testing.assert_close(_stack(dataset), eager, atol=1e-6, rtol=0)
    train = np.load(tmp_path / "train" / "d.npz")["x"]
    for split in ("train", "val"):
        dataset = dm.datasets[split]
        assert dataset.images.dtype == np.uint8 and dataset.images.shape[1:] == (32, 32, 3)
        indices = dm.splits[split]
        torch.testing.assert_close(_stack(dataset), C.uint8_images_to_tensor(train[indices], cfg), atol=1e-6, rtol=0)
        assert len(indices) > 0 and dataset.targets == (np.arange(20) % 10)[indices].tolist()


def test_one_channel_backbones_get_luma_and_other_channel_counts_fail_in_setup(tmp_path):
    _write_npz(tmp_path)
    gray = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)}
    dm = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz", data_config=gray)
    dm.setup()
    raw = np.load(tmp_path / "test" / "d.npz")["x"]
    luma = raw[2].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255  # ITU-R 601
    x = dm.test_sets[0][2][0]
    assert x.shape == (1, 32, 32) and dm.datasets["train"][0][0].shape == (1, 32, 32)
    torch.testing.assert_close(x[0], (torch.from_numpy(luma) - 0.5) / 0.25, atol=1e-5, rtol=0)
    bad = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz",
                    data_config={"input_size": (2, 32, 32), "mean": (0.5,), "std": (0.25,)})
    with pytest.raises(ValueError, match=r"input_size \(2, 32, 32\).*2 channels"):
        bad.setup()


def test_kshot_validation_takes_min_k_4_per_class(tmp_path):
    _write_npz(tmp_path, n=200)  # 20 images per class, 10 of them held out with val_fraction=0.5
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    dm = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz", num_shots=2,
                   val_fraction=0.5, data_config=cfg)
    dm.setup()
    assert np.bincount(dm.datasets["train"].targets).tolist() == [2] * 10
    assert np.bincount(dm.datasets["val"].targets).tolist() == [2] * 10  # min(K, 4), not the 10 held out
    assert len(dm.test_sets[0]) == 200 and not set(dm.splits["train"]) & set(dm.splits["val"])
    six = NpzImages(data_dir=str(tmp_path), train_file="train/d.npz", test_file="test/d.npz", num_shots=6,
                    val_fraction=0.5, data_config=cfg)
    six.setup()
    assert np.bincount(six.datasets["val"].targets).tolist() == [4] * 10


def _square_clipped_zoom(img, zoom):  # the square-only implementation the fix must reproduce on squares
    from scipy import ndimage

    h = img.shape[0]
    ch = int(np.ceil(h / zoom))
    top = (h - ch) // 2
    out = ndimage.zoom(img[top:top + ch, top:top + ch], (zoom, zoom) + (1,) * (img.ndim - 2), order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim:trim + h, trim:trim + h]


@pytest.mark.parametrize("zoom", [1.01, 1.13, 1.26, 1.75, 2.25])
def test_clipped_zoom_handles_rectangles_and_keeps_squares_unchanged(zoom):
    square = _image(3).astype(np.float64) / 255
    assert np.array_equal(C._clipped_zoom(square, zoom), _square_clipped_zoom(square, zoom))
    wide = np.concatenate([square, square[:, :13]], axis=1)  # (32, 45, 3)
    out = C._clipped_zoom(wide, zoom)
    assert out.shape == wide.shape
    centre = C._clipped_zoom(wide[:, 6:38], zoom)  # zooming about the centre: the central columns match a square zoom
    assert np.abs(out[:, 6:38] - centre).mean() < 0.08


@pytest.mark.parametrize("name", ["zoom_blur", "snow"])
def test_zoom_corruptions_on_non_square_images(name):
    image = _image(size=40)[:24]  # (24, 40, 3)
    for severity in (1, 5):
        assert corrupt(image, name, severity).shape == (24, 40, 3)
    assert corrupt(image.transpose(1, 0, 2).copy(), name, 5).shape == (40, 24, 3)
