"""ClassSubset: the base or new half of another datamodule's classes (CoCoOp's base-to-new protocol)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.registry import register_datamodule

Subset = Literal["base", "new", "all"]


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's split of the labels 0..n-1: the first ceil(n / 2) are base, the rest new."""
    if num_classes < 2:
        raise ValueError(f"base-to-new needs at least 2 classes, got {num_classes}")
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def dataset_labels(dataset: Dataset) -> list[int]:
    """Integer labels of a (image, label) dataset: ``TensorDataset`` / ``targets`` without loading images."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return [int(y) for y in tensors[1]]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(y) for y in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]  # map-style dataset


class _Relabelled(Dataset):
    """The samples at ``indices`` with labels mapped through ``remap`` (old label -> 0..k-1)."""

    def __init__(self, dataset: Dataset, indices: list[int], remap: dict[int, int]) -> None:
        self.dataset, self.indices, self.remap = dataset, indices, remap

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        x, y = self.dataset[self.indices[i]][:2]
        return x, torch.as_tensor(self.remap[int(y)], dtype=torch.long)


@register_datamodule("class_subset")
class ClassSubset(TransferDataModule):
    """Restrict any datamodule to its base or new classes, relabelled 0..k-1 (the base-to-new protocol).

    Base = the first ceil(n / 2) classes of ``data.class_names``, new = the rest (as CoCoOp splits them). Train on
    ``base`` (usually 16-shot: set ``num_shots`` on the inner datamodule), then test the same prompt on ``base``
    and on ``new``; :func:`lightning_transfer.base_to_new.evaluate_base_to_new` runs both and logs the harmonic mean.

    Args:
        data: the datamodule to restrict (its batch size, shots and seed are used).
        subset: ``base``, ``new`` or ``all`` (``all`` passes everything through).
    """

    def __init__(self, data: TransferDataModule, subset: Subset = "base") -> None:
        if subset not in ("base", "new", "all"):
            raise ValueError(f"subset must be 'base', 'new' or 'all', got {subset!r}")
        super().__init__(data_dir=str(data.data_dir), batch_size=data.batch_size, num_workers=data.num_workers,
                         num_shots=data.num_shots, seed=data.seed, data_config=data.known_data_config())
        self.data = data
        self.subset = subset

    def _labels(self) -> list[int]:
        n = len(self.data.class_names)
        if self.subset == "all":
            return list(range(n))
        base, new = base_new_split(n)
        return base if self.subset == "base" else new

    @property
    def class_names_generated(self) -> bool:  # type: ignore[override]  # a flag attribute on the base
        return self.data.class_names_generated

    @property
    def class_names(self) -> list[str]:
        names = self.data.class_names
        return [names[i] for i in self._labels()]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.data.known_data_config() is None:
            self.data.set_data_config(self.data_config())
        self.data.setup(stage or "fit")
        remap = {old: new for new, old in enumerate(self._labels())}
        for split, dataset in self.data.datasets.items():
            self.datasets[split], keep, keep_all = self._restrict(dataset, remap)
            inner = self.data.splits.get(split)
            self.splits[split] = [inner[i] for i in keep] if inner is not None and len(inner) == len(keep_all) else keep
        # several test sets (one per corruption, ...): each restricted, in the inner order (names: test_names)
        self.test_sets = [self._restrict(d, remap)[0] for d in self.data.test_sets]
        if self.test_sets:
            self.datasets["test"] = self.test_sets[0]
        self.log_split_digest()

    @staticmethod
    def _restrict(dataset: Dataset, remap: dict[int, int]) -> tuple[_Relabelled, list[int], list[int]]:
        """``dataset`` without the other classes, relabelled; also the kept indices and all the labels."""
        labels = dataset_labels(dataset)
        keep = [i for i, y in enumerate(labels) if y in remap]
        return _Relabelled(dataset, keep, remap), keep, labels

    @property
    def test_names(self) -> list[str] | None:
        """The names of the inner datamodule's test sets (``None`` where it has none)."""
        names = getattr(self.data, "test_names", None)
        return list(names) if names is not None else None
