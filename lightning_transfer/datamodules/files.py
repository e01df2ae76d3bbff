"""Datasets given as lists of (image file, label): the shared base of the benchmark datamodules.

:class:`FileListDataModule` turns per-split sample lists into loaders with the backbone's transforms, K-shot
sampling, an optional in-memory uint8 cache and a logged hash of the split membership. A subclass only says where
the samples are (:meth:`FileListDataModule.load_samples`) and what the classes are called.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lightning_transfer.datamodules.base import TransferDataModule, fewshot_indices, split_digest, stratified_split
from lightning_transfer.datamodules.transforms import (
    build_transform,
    direct_resize_transform,
    eval_geometry,
    image_channels,
    interpolation_mode,
)

Sample = tuple[str, int]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file raises an error that names it.

    16-bit (and 32-bit integer) grayscale images are scaled to 8 bits (``value / 257``): PIL's ``convert("RGB")``
    clips them at 255, which turns nearly every pixel white. Floating-point images have no agreed range: an error.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (how some Pillow versions open 16-bit PNGs)
                pixels = np.asarray(img, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
                return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).convert("RGB")
            if mode != "F":
                return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {str(path)!r} not found (listed in the split, missing on disk)") from None
    except Exception as e:  # PIL raises several types for truncated or non-image files
        raise RuntimeError(f"cannot read image {str(path)!r}: {e}; re-download or remove it from the split") from e
    raise RuntimeError(f"cannot read image {str(path)!r}: PIL mode 'F' (floating point) has no known range; convert "
                       "it to an 8-bit (or 16-bit integer) image")


def check_labels(samples: Sequence[Sample], num_classes: int, source: str) -> None:
    """Every label must be in ``[0, num_classes)``; the error names the first bad file."""
    for path, label in samples:
        if not 0 <= int(label) < num_classes:
            raise ValueError(f"{source}: label {label} of {path!r} is outside the {num_classes} classes "
                             f"(0..{num_classes - 1}); fix the split file or the class list")


def check_files_exist(samples: dict[str, list[Sample]], listed_in: str) -> None:
    """Every listed image must exist: otherwise the run would fail mid-epoch, after training started."""
    paths = list(dict.fromkeys(p for rows in samples.values() for p, _ in rows))
    missing = missing_files(paths)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {listed_in} are missing on disk: "
                                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; restore them "
                                "(re-download or re-extract the dataset) or remove their lines from the list")


def missing_files(paths: list[str], min_per_folder: int = 8) -> list[str]:
    """The paths that are not files, in order: one listing per folder instead of one stat per file.

    A full ImageNet list is 1.28M files in 1,000 folders: 1,000 listings, where a stat each took seconds (more on a
    network filesystem). A name not in its folder's listing is stat'ed before it counts as missing (a
    case-insensitive filesystem opens ``a.JPEG`` listed as ``a.jpeg``); folders with few listed files are stat'ed.
    """
    by_folder: dict[str, list[str]] = {}
    for p in paths:
        by_folder.setdefault(os.path.dirname(p), []).append(p)
    absent: set[str] = set()
    for folder, group in by_folder.items():
        if len(group) < min_per_folder:
            absent.update(p for p in group if not os.path.isfile(p))
            continue
        try:
            with os.scandir(folder or ".") as entries:
                names = {e.name for e in entries if e.is_file()}
        except OSError:  # no such folder (or unreadable): every file in it is missing
            absent.update(group)
            continue
        absent.update(p for p in group if os.path.basename(p) not in names and not os.path.isfile(p))
    return [p for p in paths if p in absent]


def read_split_list(path: Path, root: Path) -> list[Sample]:
    """``<relative path> <label>`` lines -> (absolute path, label); a malformed line fails naming file and line."""
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)  # the path may contain spaces, the label never does
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<image path> <integer label>', got {line!r}")
        samples.append((str(root / parts[0]), int(parts[1])))
    return samples


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, so the order never depends on the file system."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageList(Dataset):
    """(path, label) pairs read with PIL and passed through ``transform``."""

    def __init__(self, samples: Sequence[Sample], transform: Any = None) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        """The labels, without reading an image (what class subsets and samplers need)."""
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform is not None else image), label


def decode_uint8(path: str, data_config: dict[str, Any], direct_resize: bool = False) -> Tensor:
    """One image resized (shorter side) and centre-cropped like the evaluation transform: (C, H, W) uint8.

    With ``direct_resize`` the image is resized straight to (H, W) instead, as ``direct_resize_transform`` does. C is
    the backbone's channels: 3, or 1 (converted to gray first, as ``with_channels`` does; both in
    :mod:`~lightning_transfer.datamodules.transforms`). timm's ``crop_mode`` is followed: ``squash`` resizes both
    sides by 1 / crop_pct (no aspect ratio kept), ``border`` fits the long side and pads with the mean, ``center``
    (the default) resizes the short side.
    """
    from torchvision.transforms import CenterCrop, Resize

    size, h, w = eval_geometry(data_config)
    mode = interpolation_mode(data_config)
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    crop_mode = data_config.get("crop_mode") or "center"
    image = read_image(path)
    if image_channels(data_config) == 1:
        image = image.convert("L")
    if direct_resize:
        image = Resize((h, w), interpolation=mode)(image)
    elif crop_mode == "squash":
        squash = Resize((math.floor(h / crop_pct), math.floor(w / crop_pct)), interpolation=mode)
        image = CenterCrop((h, w))(squash(image))
    elif crop_mode == "border":
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

        fill: Any = [round(255 * v) for v in data_config["mean"]]  # as timm's eval transform (its hints are narrower)
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        image = CenterCropOrPad([h, w], fill=fill)(ResizeKeepRatio(
            scale, interpolation=str(data_config.get("interpolation", "bilinear")), longest=1.0)(image))
    else:
        image = CenterCrop((h, w))(Resize(size, interpolation=mode)(image))
    array = np.atleast_3d(np.asarray(image, dtype=np.uint8))  # (H, W, C): "L" images come as (H, W)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class UInt8Cache(Dataset):
    """Images decoded and resized once into one (N, 3, H, W) uint8 tensor; normalised (and flipped) per item.

    The evaluation view equals timm's evaluation transform (resize, centre crop, normalise), or
    :func:`direct_resize_transform` with ``direct_resize``; the training view adds only a random horizontal flip,
    since random-resized-crop would need the full-size image. 224x224 costs 150 KB per image: fine for VTAB-1k
    (1,000 images) and K-shot sets, not for ImageNet.
    """

    def __init__(self, samples: Sequence[Sample], data_config: dict[str, Any], flip: bool = False,
                 images: Tensor | None = None, direct_resize: bool = False) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        image_channels(data_config)  # a channel count that images cannot have fails here, not in a worker
        self.images = images if images is not None else torch.stack([decode_uint8(p, data_config, direct_resize)
                                                                     for p, _ in self.samples])
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.long)
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x.float() - self.mean) / self.std, self.labels[index]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class FileListDataModule(TransferDataModule):
    """Base of the datamodules whose splits are lists of image files.

    Subclasses implement :meth:`load_samples` (``{"train": [...], "val": [...], "test": [...]}`` of
    ``(path, label)``; ``val`` and ``test`` may be missing) and :attr:`class_names`, and may set :attr:`variant`
    (the protocol's name, logged with the split hash), :attr:`listed_in` (the list files, named when a listed
    image is missing on disk: every listed image is checked in ``setup``) and :attr:`direct_resize` (evaluate, and
    cache, with a plain resize to ``input_size`` instead of timm's resize + centre crop). Without a ``val`` list,
    ``val_fraction`` of every training class (fixed seed 0) is held out; without ``test``, the whole validation set
    doubles as test. With ``num_shots`` the training set has K images per class (drawn with ``seed``; a class with
    fewer is an error) and validation ``min(K, 4)`` per class, as in CoOp (the test set is taken before this draw).

    Args:
        augment: timm's random-resized-crop + flip on the training set (flip only with ``cache_images``).
        cache_images: decode and resize every image once into an in-memory uint8 tensor (small datasets).
        val_fraction: share of each training class held out for validation when the data has no validation list.
        **kwargs: see :class:`TransferDataModule`.
    """

    variant: str = ""
    direct_resize: bool = False
    listed_in: str = ""  # the list file(s) the samples come from, named when a listed image is missing
    files_on_disk: bool = True  # False where the sample paths are ids into arrays in memory (CIFAR)

    def __init__(
        self,
        *,
        augment: bool = True,
        cache_images: bool = False,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.augment, self.cache_images, self.val_fraction = augment, cache_images, val_fraction
        self.samples: dict[str, list[Sample]] = {}

    def load_samples(self) -> dict[str, list[Sample]]:
        raise NotImplementedError

    def _resolve_splits(self, raw: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        if "train" not in raw:
            raise ValueError(f"{type(self).__name__}.load_samples() returned no 'train' list")
        train, val = list(raw["train"]), list(raw.get("val") or [])
        if not val:
            rest, held = stratified_split([y for _, y in train], self.val_fraction, seed=0)
            train, val = [train[i] for i in rest], [train[i] for i in held]
        test = list(raw.get("test") or val)  # before the K-shot draw: the test set stays whole
        if self.num_shots is not None:
            train = [train[i] for i in fewshot_indices([y for _, y in train], self.num_shots, self.seed,
                                                       class_names=self.class_names)]
            val = [val[i] for i in fewshot_indices([y for _, y in val], min(self.num_shots, 4), self.seed,
                                                   strict=False)]  # "up to 4" per class, as in CoOp
        return {"train": train, "val": val, "test": test}

    def _dataset(self, samples: list[Sample], training: bool) -> Dataset:
        cfg = self.data_config()
        if self.cache_images:
            return UInt8Cache(samples, cfg, flip=training and self.augment, direct_resize=self.direct_resize)
        if self.direct_resize and not (training and self.augment):
            return ImageList(samples, direct_resize_transform(cfg))
        return ImageList(samples, build_transform(cfg, training, self.augment))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        names = self.class_names
        self.samples = self._resolve_splits(self.load_samples())
        for split, samples in self.samples.items():
            check_labels(samples, len(names), f"{type(self).__name__} {split} split")
        if self.files_on_disk:
            check_files_exist(self.samples, self.listed_in or f"{type(self).__name__}'s split lists")
        self.splits = {k: [p for p, _ in v] for k, v in self.samples.items()}
        same_test = self.samples["test"] is self.samples["val"] or self.samples["test"] == self.samples["val"]
        self.datasets = {"train": self._dataset(self.samples["train"], True),
                         "val": self._dataset(self.samples["val"], False)}
        self.datasets["test"] = self.datasets["val"] if same_test else self._dataset(self.samples["test"], False)
        self.log_split_digest()

    def split_info(self) -> dict[str, Any]:
        """Hash of the split membership (relative paths and labels) and the protocol variant."""
        if not self.samples:
            return {}
        rel = {k: [f"{self._relative(p)}:{y}" for p, y in v] for k, v in self.samples.items()}
        return {"data/split_digest": split_digest(rel), "data/name": type(self).__name__,
                "data/variant": self.variant or "default",
                **{f"data/num_{k}": len(v) for k, v in self.samples.items()}}

    def _relative(self, path: str) -> str:
        root = getattr(self, "root", None)
        try:
            return str(Path(path).relative_to(root)) if root is not None else str(path)
        except ValueError:
            return str(path)
