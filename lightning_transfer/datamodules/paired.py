"""PairedDomains: a labelled source and an unlabelled target datamodule as one two-stream datamodule.

The training batches of unsupervised domain adaptation: ``{"source": (x_s, y_s), "target": x_t}``, a labelled
source batch and a target batch without its labels, drawn from each datamodule's own training split with its own
transforms and batch size. The shorter stream is cycled (Lightning's ``CombinedLoader`` in ``max_size_cycle``
mode), so an epoch is one pass over the longer one. Validation runs on the source's validation split (the honest
protocol: no target label picks a model) unless ``validate_on: target`` (an oracle choice, recorded as such in the
run's config); testing always runs on the target's labelled test split.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.registry import register_datamodule

ValidateOn = Literal["source", "target"]
_TARGET_SEED_OFFSET = 7919  # the target stream's order differs from the source's, even for equal lengths


class Unlabelled(Dataset):
    """A labelled dataset's inputs only: what a strategy sees of the target's training split."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        return self.dataset[i][0]


@register_datamodule("paired_domains")
class PairedDomains(TransferDataModule):
    """Two datamodules as domain adaptation's two streams: labelled source, unlabelled target (Ganin et al. 2016).

    The two must have the same classes (names compared when both have real names, counts otherwise). Target
    labels are used for no training step: the target's training split is given without them; its validation and
    test splits are labelled for evaluation only.

    Args:
        source: the labelled source datamodule (its batch size, shots and seed are used for the source stream).
        target: the target datamodule (its training split, unlabelled, is the target stream; its test split tests).
        validate_on: ``source`` (default: model selection on the source's validation split, as the literature's
            honest protocol does) or ``target`` (an oracle: the target's labelled validation split picks the model;
            every table should say so).
    """

    two_stream = True

    def __init__(self, source: TransferDataModule, target: TransferDataModule, validate_on: ValidateOn = "source"
                 ) -> None:
        if validate_on not in ("source", "target"):
            raise ValueError(f"validate_on must be 'source' or 'target', got {validate_on!r}: 'source' selects on the "
                             "source's validation split (no target labels), 'target' is the oracle selection")
        for role, data in (("source", source), ("target", target)):
            if getattr(data, "two_stream", False) or not isinstance(data, TransferDataModule):
                raise ValueError(f"PairedDomains' {role} must be a single-stream TransferDataModule, got "
                                 f"{type(data).__name__}")
        super().__init__(data_dir=str(target.data_dir), batch_size=source.batch_size,
                         num_workers=source.num_workers, num_shots=source.num_shots, seed=source.seed,
                         data_config=source.known_data_config())
        self.source, self.target, self.validate_on = source, target, validate_on
        self.target_train: Unlabelled | None = None  # the target stream, set up in setup("fit")
        self.modality = source.modality

    @property
    def class_names(self) -> list[str]:
        return self.target.class_names

    @property
    def labels_used(self) -> dict[str, str]:
        """Which target labels are used for what (logged with the run's data information)."""
        return {"target/train": "none (inputs only)",
                "target/val": "model selection (oracle)" if self.validate_on == "target" else "unused",
                "target/test": "evaluation only"}

    def _check_classes(self) -> None:
        source, target = self.source, self.target
        if source.num_classes != target.num_classes or (
                not source.class_names_generated and not target.class_names_generated
                and source.class_names != target.class_names):
            raise ValueError(
                f"source {type(source).__name__} and target {type(target).__name__} have different classes "
                f"({source.num_classes}: {source.class_names[:4]}... vs {target.num_classes}: "
                f"{target.class_names[:4]}...): domain adaptation needs one label space; choose data with the same "
                "classes in the same order")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        config = self.data_config()
        for data in (self.source, self.target):
            if data.known_data_config() is None:
                data.set_data_config(config)
            data.trainer = self.trainer
            data.setup(stage or "fit")
        self._check_classes()
        validation = self.target if self.validate_on == "target" else self.source
        found = {"train": self.source.datasets.get("train"), "val": validation.datasets.get("val"),
                 "test": self.target.datasets.get("test")}
        self.datasets.update({k: v for k, v in found.items() if v is not None})
        if "train" in self.target.datasets:  # apart from the labelled splits: it has no labels
            self.target_train = Unlabelled(self.target.datasets["train"])
        self.test_sets = list(self.target.test_sets)
        # the source's splits under their names (it trains), the target's under target/
        self.splits = {**self.source.splits, **{f"target/{k}": v for k, v in self.target.splits.items()}}
        self.log_split_digest()

    def train_dataloader(self) -> Any:
        """``{"source": (x, y), "target": x}`` batches; the shorter stream cycles."""
        if "train" not in self.datasets or self.target_train is None:
            raise RuntimeError("PairedDomains has no training splits (call setup('fit') first)")
        self.source.trainer = self.target.trainer = self.trainer
        source = self.source.train_dataloader()
        target = self.target.shuffled_loader(self.target_train, seed_offset=_TARGET_SEED_OFFSET)
        return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return (self.target if self.validate_on == "target" else self.source).val_dataloader()

    def test_dataloader(self) -> Any:
        return self.target.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.target.predict_dataloader()

    def split_info(self) -> dict[str, Any]:
        info = super().split_info()
        if info:
            info.update({"data/validate_on": self.validate_on, **{f"data/labels/{k}": v
                                                                  for k, v in self.labels_used.items()}})
        return info
