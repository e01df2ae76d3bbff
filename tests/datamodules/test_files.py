"""The file-list base: K-shot and validation splits, the uint8 cache, split hashes, and errors naming the file."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_transfer.datamodules.files import FileListDataModule, ImageList, UInt8Cache, missing_files
from lightning_transfer.datamodules.transforms import build_transform, direct_resize_transform

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.875,
       "interpolation": "bicubic"}


def _images(root, classes=3, per_class=10):
    rng = np.random.default_rng(0)
    samples = []
    for c in range(classes):
        for i in range(per_class):
            path = root / f"c{c}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
            samples.append((str(path), c))
    return samples


class _List(FileListDataModule):
    def __init__(self, samples, names=("a", "b", "c"), **kwargs):
        super().__init__(data_config=CFG, **kwargs)
        self._samples, self._names, self.root = samples, list(names), None

    @property
    def class_names(self):
        return self._names

    def load_samples(self):
        return self._samples


def test_cache_equals_the_evaluation_transform(tmp_path):
    samples = _images(tmp_path, classes=1, per_class=3)
    cached = UInt8Cache(samples, CFG)
    plain = ImageList(samples, build_transform(CFG, training=False, augment=True))
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (3, 3, 32, 32)
    assert cached.targets == plain.targets == [y for _, y in samples]  # labels without decoding an image
    for i in range(3):
        assert torch.allclose(cached[i][0], plain[i][0], atol=1e-5)
        assert int(cached[i][1]) == plain[i][1]


def test_kshot_train_and_val_and_digest(tmp_path):
    samples = _images(tmp_path)
    dm = _List({"train": samples}, num_shots=2, seed=3, data_dir=str(tmp_path / "d"))
    dm.setup()
    counts = np.bincount([y for _, y in dm.samples["train"]])
    assert counts.tolist() == [2, 2, 2]
    assert not set(dm.samples["train"]) & set(dm.samples["val"])  # validation is held out before the K-shot draw
    assert dm.datasets["test"] is dm.datasets["val"]
    again = _List({"train": samples}, num_shots=2, seed=3, data_dir=str(tmp_path / "d"))
    again.setup()
    other = _List({"train": samples}, num_shots=2, seed=4, data_dir=str(tmp_path / "d"))
    other.setup()
    assert again.split_info()["data/split_digest"] == dm.split_info()["data/split_digest"]
    assert other.split_info()["data/split_digest"] != dm.split_info()["data/split_digest"]


def test_label_outside_the_classes_names_the_file(tmp_path):
    samples = _images(tmp_path, classes=2, per_class=3)
    bad = [*samples, (samples[0][0].replace("c0_0", "c9_9"), 7)]
    with pytest.raises(ValueError, match=r"label 7 of .*c9_9\.png.* outside the 3 classes"):
        _List({"train": samples, "test": bad}).setup()


def test_corrupt_image_names_the_file(tmp_path):
    samples = _images(tmp_path, classes=1, per_class=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(RuntimeError, match="broken.png"):
        ImageList([(str(broken), 0)])[0]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        UInt8Cache([*samples, (str(tmp_path / "gone.png"), 0)], CFG)


def test_kshot_without_test_list_keeps_the_whole_validation_set_as_test(tmp_path):
    samples = _images(tmp_path, per_class=20)
    full = _List({"train": samples}, val_fraction=0.5)
    full.setup()
    dm = _List({"train": samples}, val_fraction=0.5, num_shots=2)
    dm.setup()
    assert np.bincount([y for _, y in dm.samples["val"]]).tolist() == [2, 2, 2]
    assert dm.samples["test"] == full.samples["test"] and len(dm.samples["test"]) == 30  # not the 2-shot val


def test_kshot_larger_than_a_class_is_an_error_naming_it(tmp_path):
    samples = _images(tmp_path, per_class=5)
    with pytest.raises(ValueError, match=r"num_shots=5 but 3 class\(es\) have fewer images: 'a' \(4 images\), "
                                         r"'b' \(4 images\), 'c' \(4 images\); lower data.init_args.num_shots to "
                                         r"at most 4"):
        _List({"train": samples}, val_fraction=0.2, num_shots=5).setup()


def test_16_bit_images_are_rescaled_not_saturated_to_white(tmp_path):
    from lightning_transfer.datamodules.files import read_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0..64512 across the 16-bit range
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grayscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(read_image(tmp_path / "deep.png"))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 0].astype(float), ramp / 257.0, atol=1)  # not 255 everywhere
    Image.fromarray(np.ones((4, 4), dtype=np.float32) * 3.5).save(tmp_path / "float.tif")
    with pytest.raises(RuntimeError, match=r"cannot read image .*float\.tif.*mode 'F'.*8-bit"):
        read_image(tmp_path / "float.tif")


GRAY_CFG = {**CFG, "input_size": (1, 32, 32), "mean": (0.45,), "std": (0.25,)}


def test_one_channel_backbones_get_gray_images_cached_or_not(tmp_path):
    samples = _images(tmp_path, classes=1, per_class=3)
    plain = ImageList(samples, build_transform(GRAY_CFG, training=False, augment=True))
    cached = UInt8Cache(samples, GRAY_CFG)
    assert cached.images.shape == (3, 1, 32, 32)
    for i in range(3):
        x = plain[i][0]
        assert x.shape == (1, 32, 32)
        gray = build_transform({**GRAY_CFG, "input_size": (3, 32, 32), "mean": (0.45,) * 3, "std": (0.25,) * 3},
                               False, True)(Image.open(samples[i][0]).convert("L").convert("RGB"))[0]
        assert torch.allclose(x[0], gray, atol=1e-5)  # PIL's "L" (luma), then the same geometry
        assert torch.allclose(cached[i][0], x, atol=1e-5)
    train = ImageList(samples, build_transform(GRAY_CFG, training=True, augment=True))
    assert train[0][0].shape == (1, 32, 32)
    assert direct_resize_transform(GRAY_CFG)(Image.open(samples[0][0])).shape == (1, 32, 32)
    assert UInt8Cache(samples, GRAY_CFG, direct_resize=True).images.shape == (3, 1, 32, 32)


def test_a_channel_count_other_than_1_or_3_fails_in_setup(tmp_path):
    samples = _images(tmp_path)
    dm = _List({"train": samples}, data_dir=str(tmp_path / "d"))
    dm.set_data_config({**CFG, "input_size": (4, 32, 32), "mean": (0.5,) * 4, "std": (0.2,) * 4})
    with pytest.raises(ValueError, match=r"input_size \(4, 32, 32\).*4 channels.*1 \(gray\) or 3 \(RGB\)"):
        dm.setup()


@pytest.mark.parametrize("crop_mode", ["squash", "border", "center"])
def test_timm_crop_mode_is_honoured_cached_or_not(tmp_path, crop_mode):
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize, ToTensor

    samples = _images(tmp_path, classes=1, per_class=2)  # 50x40 images: the modes differ on non-square ones
    cfg = {**CFG, "crop_mode": crop_mode}
    plain = ImageList(samples, build_transform(cfg, training=False, augment=True))
    cached = UInt8Cache(samples, cfg)
    for i in range(2):
        assert torch.allclose(cached[i][0], plain[i][0], atol=1e-5)
    if crop_mode == "squash":  # timm's squash: both sides to floor(32 / 0.875) = 36, then the centre 32x32
        image = Image.open(samples[0][0]).convert("RGB")
        resized = CenterCrop(32)(Resize((36, 36), interpolation=InterpolationMode.BICUBIC)(image))
        expected = Normalize(CFG["mean"], CFG["std"])(ToTensor()(resized))
        assert torch.allclose(plain[0][0], expected, atol=1e-5)
        center = ImageList(samples, build_transform(CFG, training=False, augment=True))
        assert not torch.allclose(center[0][0], expected, atol=1e-2)  # the default mode crops the long side


def test_missing_files_lists_folders_once_and_keeps_the_order(tmp_path):
    many, few = tmp_path / "many", tmp_path / "few"
    many.mkdir()
    few.mkdir()
    for i in range(12):
        (many / f"{i}.png").write_bytes(b"x")
    (few / "a.png").write_bytes(b"x")
    (many / "sub.png").mkdir()  # a folder named like an image is not an image
    paths = [str(many / f"{i}.png") for i in range(14)] + [str(many / "sub.png"), str(few / "a.png"),
                                                          str(few / "b.png"), str(tmp_path / "gone" / "c.png")]
    assert missing_files(paths) == [str(many / "12.png"), str(many / "13.png"), str(many / "sub.png"),
                                    str(few / "b.png"), str(tmp_path / "gone" / "c.png")]
    assert missing_files(paths, min_per_folder=1) == missing_files(paths, min_per_folder=10**6)  # listing == stat
