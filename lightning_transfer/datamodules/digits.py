"""Digits: scikit-learn's embedded 8x8 handwritten digits, split by class into a source and a target task."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_transfer.datamodules.base import TransferDataModule, cached_split, fewshot_indices, stratified_split
from lightning_transfer.registry import register_datamodule


def images_to_tensor(images: np.ndarray, data_config: dict[str, Any]) -> Tensor:
    """(N, H, W) gray values in [0, 1] -> (N, C, H', W') resized and normalised for the backbone."""
    c, h, w = data_config["input_size"]
    x = torch.as_tensor(images, dtype=torch.float32)[:, None]  # (N, 1, H, W)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.expand(-1, c, -1, -1)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, c, 1, 1)
    return ((x - mean) / std).contiguous()


@register_datamodule("digits")
class Digits(TransferDataModule):
    """scikit-learn's ``load_digits`` (1,797 8x8 images, embedded, no download) as a class-split transfer task.

    ``task="source"`` uses the ``source_classes`` with all their training images (the project's own
    pretraining); ``task="target"`` uses the ``target_classes``, usually with ``num_shots`` images per class.
    30% of each class is held out as the test set (a fixed split); validation comes from the rest: min(K, 4)
    images per class in the K-shot setting (the CoOp protocol), 15% otherwise.

    Args:
        task: ``source`` or ``target``.
        source_classes: digits of the source task.
        target_classes: digits of the target task (labels are remapped to 0..n-1 in the order given).
        **kwargs: see :class:`TransferDataModule` (batch_size, num_shots, seed, data_dir, ...).
    """

    def __init__(
        self,
        task: Literal["source", "target"] = "target",
        source_classes: list[int] | None = None,
        target_classes: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("source", "target"):
            raise ValueError(f"task must be 'source' or 'target', got {task!r}")
        self.source_classes = list(source_classes if source_classes is not None else range(5))
        self.target_classes = list(target_classes if target_classes is not None else range(5, 10))
        for name, classes in (("source_classes", self.source_classes), ("target_classes", self.target_classes)):
            bad = [c for c in classes if c not in range(10)]
            if bad or len(set(classes)) != len(classes) or not classes:
                raise ValueError(f"{name}={classes} must be distinct digits 0-9")
        self.task_name = task

    @property
    def classes(self) -> list[int]:
        return self.source_classes if self.task_name == "source" else self.target_classes

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.classes]

    def _make_splits(self, labels: np.ndarray) -> dict[str, list[int]]:
        pool, test = stratified_split(labels, 0.3, seed=0)  # the test set never depends on the run's seed
        pool_labels = labels[pool]
        if self.num_shots is not None:  # checked >= 1 at construction; 0 must never read as "all"
            train = [pool[i] for i in fewshot_indices(pool_labels, self.num_shots, self.seed,
                                                       class_names=self.class_names)]
            val = [pool[i] for i in fewshot_indices(pool_labels, min(self.num_shots, 4), self.seed + 10_000,
                                                     exclude=[pool.index(t) for t in train], strict=False)]
            if not val:
                raise ValueError(f"num_shots={self.num_shots} takes every image of the training pool and leaves no "
                                 "validation images: lower data.init_args.num_shots")
        else:
            rest, held = stratified_split(pool_labels, 0.15, seed=self.seed)
            train, val = [pool[i] for i in rest], [pool[i] for i in held]
        return {"train": sorted(train), "val": sorted(val), "test": test}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = np.isin(digits.target, self.classes)
        remap = {c: i for i, c in enumerate(self.classes)}
        images = digits.images[keep] / 16.0  # (N, 8, 8) in [0, 1]
        labels = np.array([remap[int(t)] for t in digits.target[keep]])
        shots = "all" if self.num_shots is None else f"{self.num_shots}shot"
        classes = "-".join(map(str, self.classes))
        path = self.data_dir / "splits" / f"digits_{classes}_{shots}_seed{self.seed}.json"
        self.splits = cached_split(path, lambda: self._make_splits(labels), ("train", "val", "test"), len(labels))
        x = images_to_tensor(images, self.data_config())
        y = torch.as_tensor(labels, dtype=torch.long)
        self.datasets = {split: TensorDataset(x[idx], y[idx]) for split, idx in self.splits.items()}
        self.log_split_digest()
