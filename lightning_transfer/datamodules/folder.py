"""ImageFolder: any dataset laid out as ``root/<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Subset
from torchvision.datasets import ImageFolder as _TorchvisionImageFolder

from lightning_transfer.datamodules.base import (
    TransferDataModule,
    cached_split,
    fewshot_indices,
    split_digest,
    stratified_split,
)
from lightning_transfer.datamodules.files import read_image
from lightning_transfer.datamodules.transforms import build_transform
from lightning_transfer.registry import register_datamodule


@register_datamodule("image_folder")
class ImageFolder(TransferDataModule):
    """Images in ``root/<split>/<class>/*`` (``train`` required; ``val`` and ``test`` optional).

    Classes are the sub-folders of ``train`` in sorted order. Without a ``val`` folder 10% of ``train`` (per class,
    fixed seed) is held out for validation; without ``test`` the validation set is used for testing. With
    ``num_shots`` the training set has K images per class and validation ``min(K, 4)`` (CoOp's protocol); the test
    set stays whole.

    Args:
        root: the dataset folder.
        augment: random-resized-crop and flip on the training set.
        **kwargs: see :class:`TransferDataModule` (batch_size, num_shots, seed, ...).
    """

    def __init__(
        self,
        root: str,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.augment = augment
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(
                f"ImageFolder: no training folder at {str(train)!r}; lay the data out as "
                f"{str(self.root)}/train/<class>/<image> (val/ and test/ optional) or fix data.root"
            )
        self._class_names = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not self._class_names:
            raise FileNotFoundError(f"ImageFolder: {str(train)!r} has no class sub-folders (<class>/<image>)")

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    def _folder(self, split: str, transform: Any) -> _TorchvisionImageFolder:
        # our loader names the file on a decode error (torchvision's raises PIL's error, often without the path)
        ds = _TorchvisionImageFolder(str(self.root / split), transform=transform, loader=read_image)
        if ds.classes != self._class_names:
            raise ValueError(
                f"ImageFolder: classes of {split}/ {ds.classes} differ from train/ {self._class_names}; every split "
                "needs the same class folders"
            )
        return ds

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cfg = self.data_config()
        train_tf, eval_tf = build_transform(cfg, True, self.augment), build_transform(cfg, False, self.augment)
        train_full = self._folder("train", train_tf)
        labels = [t for _, t in train_full.samples]
        has_val = (self.root / "val").is_dir()

        def make() -> dict[str, list]:
            pool, held = (list(range(len(labels))), []) if has_val else stratified_split(labels, 0.1, seed=0)
            if self.num_shots is not None:
                pool = [pool[i] for i in fewshot_indices([labels[i] for i in pool], self.num_shots, self.seed,
                                                         class_names=train_full.classes)]
            return {"train": pool, "val": held}

        tag = "all" if self.num_shots is None else f"{self.num_shots}shot_seed{self.seed}"
        # the file list's digest names the cache, so changed folder contents never reuse a stale split
        files = split_digest({"files": [p for p, _ in train_full.samples], "val": [str(has_val)]})
        self.splits = cached_split(self.data_dir / "splits" / f"folder_{self.root.name}_{files}_{tag}.json", make,
                                   ("train", "val"), len(labels))
        self.datasets["train"] = Subset(train_full, self.splits["train"])
        val_folder = self._folder("val", eval_tf) if has_val else None
        val_full = val_folder if val_folder is not None else Subset(self._folder("train", eval_tf), self.splits["val"])
        self.datasets["val"] = val_full
        if self.num_shots is not None:  # min(K, 4) per class, as in CoOp (a fixed draw: not cached)
            val_labels = ([t for _, t in val_folder.samples] if val_folder is not None
                          else [labels[i] for i in self.splits["val"]])
            keep = fewshot_indices(val_labels, min(self.num_shots, 4), self.seed, strict=False)
            self.datasets["val"] = Subset(val_full, keep)
            # indices into val/ when it exists, else into train/ (as the held-out list)
            self.splits["val"] = keep if has_val else [self.splits["val"][i] for i in keep]
        # the test set is never reduced: test/, or else the whole validation pool
        self.datasets["test"] = self._folder("test", eval_tf) if (self.root / "test").is_dir() else val_full
        self.log_split_digest()
