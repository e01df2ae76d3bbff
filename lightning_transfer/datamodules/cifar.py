"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from torchvision's files, held in memory as uint8 arrays.

The python-version archives are pickled batches. They are read by torchvision's own loader
(``torchvision.datasets.CIFAR10``/``CIFAR100``), which unpickles only files whose md5 matches the published one,
never by this package. Samples are identified as ``"train/<index>"`` / ``"test/<index>"``, so K-shot sampling, the
validation hold-out (``val_fraction`` of every training class, seed 0) and the logged split hash work as for the
file-list datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lightning_transfer.datamodules.coop_splits import clean_class_name
from lightning_transfer.datamodules.corruption import CIFAR10_CLASSES
from lightning_transfer.datamodules.files import FileListDataModule, Sample
from lightning_transfer.datamodules.transforms import build_transform
from lightning_transfer.registry import register_datamodule

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]


class ArrayImages(Dataset):
    """(N, H, W, 3) uint8 images and labels, each passed through ``transform`` as a PIL image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()  # read by wrappers (ClassSubset) without decoding images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


class CIFARDataModule(FileListDataModule):
    """Base of CIFAR-10/100: torchvision's train (minus a validation hold-out) and test sets.

    The 32x32 images are resized to the backbone's input size; the images are in memory already, so there is no
    ``cache_images`` option. With ``num_shots`` validation has ``min(K, 4)`` images per class.

    Args:
        download: download the archive with torchvision (md5-checked) when it is missing.
        data_dir: folder holding ``cifar-10-batches-py`` / ``cifar-100-python``; default ``$LT_DATA_DIR``.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (augment, val_fraction,
            batch_size, num_shots, seed, ...).
    """

    tv_class: ClassVar[str] = ""
    names: ClassVar[list[str]] = []
    variant = "torchvision"
    files_on_disk = False  # samples are "<split>/<index>" ids into the arrays

    def __init__(
        self,
        download: bool = False,
        data_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(cache_images=False, data_dir=data_dir, **kwargs)
        self.download = download
        self.root = None  # sample ids are hashed as they are
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def class_names(self) -> list[str]:
        return [clean_class_name(n) for n in self.names]  # fixed: known without the data

    def prepare_data(self) -> None:
        self._load_arrays()

    def load_samples(self) -> dict[str, list[Sample]]:
        return {split: [(f"{split}/{i}", int(y)) for i, y in enumerate(labels)]
                for split, (_, labels) in self._load_arrays().items()}

    def _dataset(self, samples: list[Sample], training: bool) -> Dataset:
        arrays = self._load_arrays()
        split = samples[0][0].split("/")[0] if samples else "test"
        index = np.array([int(s.split("/")[1]) for s, _ in samples], dtype=np.int64)
        transform = build_transform(self.data_config(), training, self.augment)
        return ArrayImages(arrays[split][0][index], arrays[split][1][index], transform)

    def _load_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if not self._arrays:
            import torchvision.datasets

            cls = getattr(torchvision.datasets, self.tv_class)
            folder = self.data_dir / cls.base_folder
            if not folder.is_dir() and not self.download:
                raise FileNotFoundError(
                    f"{type(self).__name__}: no data at {folder}; pass data.download=true or download {cls.url} and "
                    f"extract it into {self.data_dir} (data_dir)")
            for split, train in (("train", True), ("test", False)):
                try:
                    dataset = cls(str(self.data_dir), train=train, download=self.download)
                except RuntimeError as e:  # torchvision: "not found or corrupted"
                    raise RuntimeError(f"{type(self).__name__}: {_first_bad_file(cls, folder) or folder}: {e}; "
                                       f"delete {folder} and download again (data.download=true)") from e
                self._check_classes(dataset.classes, folder)
                self._arrays[split] = (np.asarray(dataset.data, dtype=np.uint8), np.asarray(dataset.targets))
        return self._arrays

    def _check_classes(self, classes: list[str], folder: Path) -> None:
        if list(classes) != self.names:
            raise ValueError(f"{type(self).__name__}: the class list in {folder} ({len(classes)} classes) is not "
                             f"{self.tv_class}'s ({len(self.names)}); is data_dir pointing at another dataset?")


def _first_bad_file(cls: Any, folder: Path) -> str:
    """The first file of a CIFAR folder that is missing or fails its md5 check ('' if none)."""
    from torchvision.datasets.utils import check_integrity

    for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        if not check_integrity(str(folder / name), md5):
            return str(folder / name)
    return ""


@register_datamodule("cifar10")
class CIFAR10(CIFARDataModule):
    """CIFAR-10: 10 classes, 50,000 training and 10,000 test images of 32x32."""

    tv_class, names = "CIFAR10", CIFAR10_CLASSES


@register_datamodule("cifar100")
class CIFAR100(CIFARDataModule):
    """CIFAR-100: 100 fine classes, 50,000 training and 10,000 test images of 32x32 (names as prompts)."""

    tv_class, names = "CIFAR100", CIFAR100_CLASSES
