"""Digit domain shift: MNIST, USPS and SVHN, from their released files or downloaded through torchvision.

Each set lives in ``<root>/<name>/`` (``mnist``, ``usps``, ``svhn``). Read offline from:

- MNIST: the idx files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (also in torchvision's
  ``MNIST/raw/``);
- USPS: the ESL text files ``zip.{train,test}.gz`` (label then 256 values in [-1, 1]) or torchvision's libsvm
  ``usps.bz2`` / ``usps.t.bz2``;
- SVHN: torchvision's ``{train,test}_32x32.mat``.

With ``download=True`` missing files are fetched by torchvision (with its checksums) in ``prepare_data``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_transfer.datamodules.base import TransferDataModule, fewshot_indices, split_digest, stratified_split
from lightning_transfer.datamodules.corruption import LUMA, uint8_images_to_tensor
from lightning_transfer.datamodules.digits import images_to_tensor
from lightning_transfer.registry import register_datamodule

DigitSet = Literal["mnist", "usps", "svhn"]
DIGIT_SETS = ("mnist", "usps", "svhn")
_IDX = {"train": "train", "test": "t10k"}
_HOW = {"mnist": "the idx files (yann.lecun.com/exdb/mnist or torchvision's mirror)",
        "usps": "zip.train.gz / zip.test.gz (ESL data page) or usps.bz2 / usps.t.bz2 (LIBSVM data sets)",
        "svhn": "train_32x32.mat / test_32x32.mat (ufldl.stanford.edu/housenumbers)"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or raw) as a uint8 array; a truncated or foreign file fails naming it."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}; delete it and download it again") from e
    ndim = data[3] if len(data) >= 4 else 0
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if data[:3] != b"\x00\x00\x08" or ndim == 0 or len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise ValueError(f"{path} is not a uint8 idx file of the size its header gives; delete it and download it "
                         "again")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _first(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _missing(name: str, folder: Path, split: str, looked: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name.upper()} {split} split not found in {folder} (looked for {', '.join(looked)}): put {_HOW[name]} "
        f"there, or pass data.init_args.download=true to fetch it with torchvision")


def _load_mnist(folder: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray, Path, str]:
    import torchvision.datasets as tvd

    stems = [f"{_IDX[split]}-images-idx3-ubyte", f"{_IDX[split]}-labels-idx1-ubyte"]
    candidates = {s: [f"{d}{s}{gz}" for d in ("", "MNIST/raw/") for gz in (".gz", "")] for s in stems}
    found = [_first(folder, candidates[s]) for s in stems]
    if None in found and download:
        tvd.MNIST(str(folder), train=split == "train", download=True)  # into MNIST/raw/
        found = [_first(folder, candidates[s]) for s in stems]
    if found[0] is None or found[1] is None:
        raise _missing("mnist", folder, split, [n for s in stems for n in candidates[s]])
    return read_idx(found[0]), read_idx(found[1]), found[1], "idx"


def _load_usps(folder: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray, Path, str]:
    import torchvision.datasets as tvd

    esl, libsvm = folder / f"zip.{split}.gz", folder / ("usps.bz2" if split == "train" else "usps.t.bz2")
    if esl.is_file():
        try:
            table = np.loadtxt(esl, ndmin=2)  # (N, 257): label, then 16x16 values in [-1, 1]
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"cannot read {esl}: {e}; delete it and download it again") from e
        if table.shape[1] != 257:
            raise ValueError(f"{esl} has {table.shape[1]} columns, expected 257 (label + 16x16 values)")
        # [-1, 1] -> uint8 as torchvision converts its libsvm copy of USPS
        images = ((table[:, 1:].reshape(-1, 16, 16) + 1) / 2 * 255).clip(0, 255).astype(np.uint8)
        return images, table[:, 0], esl, "esl"
    if not (libsvm.is_file() or download):
        raise _missing("usps", folder, split, [esl.name, libsvm.name])
    try:
        usps = tvd.USPS(str(folder), train=split == "train", download=download)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read {libsvm}: {e}; delete it and download it again") from e
    return np.asarray(usps.data), np.asarray(usps.targets), libsvm, "libsvm"


def _load_svhn(folder: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray, Path, str]:
    import torchvision.datasets as tvd

    mat = folder / f"{split}_32x32.mat"
    if not (mat.is_file() or download):
        raise _missing("svhn", folder, split, [mat.name])
    try:
        svhn = tvd.SVHN(str(folder), split=split, download=download)  # maps label 10 to digit 0
    except RuntimeError as e:  # torchvision's md5 check does not name the file
        raise ValueError(f"{mat} failed torchvision's checksum ({e}); delete it and download it again") from e
    return np.asarray(svhn.data).transpose(0, 2, 3, 1), svhn.labels, mat, "mat"  # (N, 32, 32, 3)


_LOADERS = {"mnist": _load_mnist, "usps": _load_usps, "svhn": _load_svhn}


def load_digits_set(name: str, folder: Path, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,), file format) of one split of one set."""
    if name not in _LOADERS:
        raise ValueError(f"unknown digit set {name!r}; choose one of {', '.join(DIGIT_SETS)}")
    images, labels, source, fmt = _LOADERS[name](Path(folder), split, download)
    labels = np.asarray(labels).astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if len(labels) != len(images) or len(bad):
        raise ValueError(f"{source}: {len(images)} images and {len(labels)} labels"
                         + (f", label {labels[bad[0]]} at index {bad[0]} is not a digit" if len(bad) else ""))
    return images, labels, fmt


class DigitImages(Dataset):
    """uint8 digits kept at their own size; each item is resized, normalised and given the backbone's channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, data_config: dict[str, Any]) -> None:
        self.images, self.labels, self.data_config = images, torch.as_tensor(labels), data_config

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        channels = self.data_config["input_size"][0]
        if image.ndim == 3 and channels == 3:  # colour (SVHN) for a colour backbone
            return uint8_images_to_tensor(image[None], self.data_config)[0], self.labels[index]
        if image.ndim == 3:  # colour for a gray backbone: ITU-R 601 luma
            image = image.astype(np.float32) @ np.array(LUMA, dtype=np.float32)
        gray = image.astype(np.float32)[None] / 255.0  # (1, H, W)
        return images_to_tensor(gray, self.data_config)[0], self.labels[index]  # gray repeated to the channels


@register_datamodule("digit_domains")
class DigitDomains(TransferDataModule):
    """Digits across domains: train on ``source`` (MNIST, USPS or SVHN), test on ``target``'s test split.

    ``val_fraction`` of every class of the source training split (fixed seed 0) is held out for validation; with
    ``num_shots`` the training set has K images per class and validation ``min(K, 4)``. Without a target the source's
    test split is the test set. Images keep their size in memory and are resized to the backbone's input size per
    item; gray digits are repeated over the backbone's channels, SVHN is converted to gray for a 1-channel backbone.

    Args:
        source: ``mnist``, ``usps`` or ``svhn``.
        target: ``mnist``, ``usps``, ``svhn`` or ``None`` (test on the source's test split).
        root: folder holding ``mnist/``, ``usps/`` and ``svhn/``; default ``data_dir``.
        download: fetch missing files with torchvision (MNIST, USPS libsvm, SVHN) in ``prepare_data``.
        val_fraction: share of each source class held out for validation.
        batch_size: batch size of every loader.
        **kwargs: see :class:`TransferDataModule` (num_shots, seed, data_dir, ...).
    """

    def __init__(
        self,
        source: DigitSet = "mnist",
        target: DigitSet | None = "usps",
        root: str | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        for name in (source, target):
            if name is not None and name not in DIGIT_SETS:
                raise ValueError(f"unknown digit set {name!r}; choose one of {', '.join(DIGIT_SETS)}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.source, self.target, self.download, self.val_fraction = source, target, download, val_fraction
        self.root = Path(root).expanduser() if root else self.data_dir
        self._formats: dict[str, str] = {}  # file format of each part read ("train", "test")
        self._labels: dict[str, np.ndarray] = {}  # labels of the array each split's indices point into

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def _parts(self) -> dict[str, tuple[str, str]]:
        return {"train": (self.source, "train"), "test": (self.target or self.source, "test")}

    def prepare_data(self) -> None:
        if self.download:
            for name, split in self._parts().values():
                load_digits_set(name, self.root / name, split, download=True)

    def setup(self, stage: str | None = None) -> None:
        """The target's test split always; the source's training split only for ``fit`` / ``validate`` (or no
        stage), so testing a checkpoint needs only the target's files. :meth:`train_dataloader` loads it on demand
        (CAFA's source statistics at test time)."""
        if stage in ("fit", "validate", None) and "train" not in self.datasets:
            self._setup_train()
        if "test" not in self.datasets:
            name, split = self._parts()["test"]
            test_x, test_y, self._formats["test"] = load_digits_set(name, self.root / name, split, self.download)
            self.splits["test"] = list(range(len(test_y)))
            self._labels["test"] = test_y
            self.datasets["test"] = DigitImages(test_x, test_y, self.data_config())
        self.log_split_digest()

    def _setup_train(self) -> None:
        name, split = self._parts()["train"]
        train_x, train_y, self._formats["train"] = load_digits_set(name, self.root / name, split, self.download)
        rest, held = stratified_split(train_y, self.val_fraction, seed=0)
        if self.num_shots is not None:
            rest = [rest[i] for i in fewshot_indices(train_y[rest], self.num_shots, self.seed,
                                                     class_names=self.class_names)]
            held = [held[i] for i in fewshot_indices(train_y[held], min(self.num_shots, 4), self.seed, strict=False)]
        self.splits.update(train=rest, val=held)
        self._labels.update(train=train_y, val=train_y)
        cfg = self.data_config()
        self.datasets.update(train=DigitImages(train_x[rest], train_y[rest], cfg),
                             val=DigitImages(train_x[held], train_y[held], cfg))

    def train_dataloader(self) -> Any:
        if "train" not in self.datasets:  # set up for testing only: read the source's training split now
            self._setup_train()
            self.log_split_digest()
        return super().train_dataloader()

    def val_dataloader(self) -> Any:
        if "val" not in self.datasets:
            self._setup_train()
            self.log_split_digest()
        return super().val_dataloader()

    def split_info(self) -> dict[str, Any]:
        """Hash of the split membership (indices and labels), the source/target variant and the split sizes."""
        if not self.splits:
            return {}
        items = {k: [f"{i}:{self._labels[k][i]}" for i in v] for k, v in self.splits.items()}
        return {"data/split_digest": split_digest(items), "data/name": type(self).__name__,
                "data/variant": self.variant, **{f"data/num_{k}": len(v) for k, v in self.splits.items()}}

    @property
    def variant(self) -> str:
        """``<source>[<format>]-><target>[<format>]`` of the files read (``unread`` for a split not loaded)."""
        train, test = (self._formats.get(k, "unread") for k in ("train", "test"))
        return f"{self.source}[{train}]->{self.target or self.source}[{test}]"
