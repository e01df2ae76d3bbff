"""TextCSV: text classification from one CSV file with a header row (``text,label[,split]``), for text backbones."""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_transfer.datamodules.files import FileListDataModule, Sample
from lightning_transfer.registry import register_datamodule

SPLITS = ("train", "val", "test")
INDEX = re.compile(r"-?\d+")


class TokenizedTexts(Dataset):
    """Token ids of each text (truncated to ``max_length``) and its label; :func:`pad_token_batch` pads a batch."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids = [torch.tensor(row, dtype=torch.long) for row in ids]
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.ids[index], self.labels[index]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def pad_token_batch(pad_id: int) -> Callable[[Sequence[tuple[Tensor, Tensor]]], tuple[Tensor, Tensor]]:
    """A collate function: (ids (L_i,), label) items -> ids and mask stacked (B, 2, L), L the batch's longest."""

    def collate(items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        length = max(len(ids) for ids, _ in items)
        out = torch.full((len(items), 2, length), pad_id, dtype=torch.long)
        out[:, 1] = 0
        for i, (ids, _) in enumerate(items):
            out[i, 0, : len(ids)] = ids
            out[i, 1, : len(ids)] = 1
        return out, torch.stack([label for _, label in items])

    return collate


@register_datamodule("text_csv")
class TextCSV(FileListDataModule):
    """Texts and their labels in a CSV file with a header row, tokenised with the text backbone's own tokenizer.

    The header names the columns (``text_column``, ``label_column`` and, optionally, ``split_column`` with
    ``train``/``val``/``test``; rows without a split are training rows). Labels are class indices ``0..n-1`` or
    class names: with ``class_names`` given, names are looked up in it; without, names are sorted into the classes
    and integer labels give classes ``"0"`` to the largest (a file mixing both is an error). Without validation rows
    ``val_fraction`` of every training class is held out; without test rows the validation set is the test set;
    ``num_shots`` draws K texts per class. The tokenizer is the backbone's (``model_name_or_path``, loaded from local
    files) unless ``tokenizer`` names another; texts are truncated to the backbone's maximum length, and every batch
    is padded to its longest text: ids and attention mask stacked, (B, 2, L).

    Args:
        csv_file: the CSV file (UTF-8, a header row first).
        text_column: the header of the text column.
        label_column: the header of the label column.
        split_column: the header of the split column, when the file has one.
        class_names: the classes in label order (default: from the labels, see above).
        tokenizer: a folder (or hub name) with the tokenizer; default the backbone's ``model_name_or_path``.
        max_length: truncate texts to this many tokens; default the backbone's maximum.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (val_fraction: held out when
            the file has no validation rows; batch_size, num_shots, seed, ...). Texts have no ``augment`` or
            ``cache_images``.
    """

    modality = "text"
    files_on_disk = False  # the samples are texts, not paths

    def __init__(
        self,
        csv_file: str,
        text_column: str = "text",
        label_column: str = "label",
        split_column: str | None = None,
        class_names: list[str] | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(augment=False, cache_images=False, **kwargs)
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a [CLS] token and one more), got {max_length}")
        self.csv_file = Path(csv_file).expanduser()
        self.text_column, self.label_column, self.split_column = text_column, label_column, split_column
        self.tokenizer_name, self.max_length = tokenizer, max_length
        self._class_names = list(class_names) if class_names is not None else None
        self._rows: list[tuple[int, str, str, str]] | None = None
        self.variant = f"text_csv:{self.csv_file.name}"
        self._loaded_tokenizer: Any = None

    # ---- the file -----------------------------------------------------------------------------------------
    def rows(self) -> list[tuple[int, str, str, str]]:
        """(line number, text, label, split) of every data row; a missing column or bad row names file and line."""
        if self._rows is not None:
            return self._rows
        if not self.csv_file.is_file():
            raise FileNotFoundError(f"CSV file {self.csv_file} not found: write a header row ('{self.text_column},"
                                    f"{self.label_column}') and one row per text, or fix data.init_args.csv_file")
        with open(self.csv_file, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's byte-order mark
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            wanted = [c for c in (self.text_column, self.label_column, self.split_column) if c is not None]
            missing = [c for c in wanted if c not in header]
            if missing:
                raise ValueError(f"{self.csv_file}: no column {', '.join(map(repr, missing))} in the header "
                                 f"{header}; set data.init_args.text_column / label_column / split_column")
            rows = []
            for row in reader:
                line = reader.line_num
                text, label = row[self.text_column], (row[self.label_column] or "").strip()
                split = (row[self.split_column] or "").strip().lower() if self.split_column else ""
                if text is None or not label:
                    raise ValueError(f"{self.csv_file}:{line}: a row needs a text and a label, got {row}")
                if split and split not in SPLITS:
                    raise ValueError(f"{self.csv_file}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
                rows.append((line, text, label, split or "train"))
        if not any(split == "train" for _, _, _, split in rows):
            raise ValueError(f"{self.csv_file} has no training rows")
        self._rows = rows
        return rows

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            labels = {label for _, _, label, _ in self.rows()}
            numeric = {bool(INDEX.fullmatch(label)) for label in labels}
            if numeric == {True, False}:
                raise ValueError(f"{self.csv_file} mixes integer labels and class names: use one kind, or give "
                                 "data.init_args.class_names")
            if numeric == {True}:
                self._class_names = [str(i) for i in range(max(int(label) for label in labels) + 1)]
            else:
                self._class_names = sorted(labels)
        return list(self._class_names)

    @property
    def class_names_generated(self) -> bool:  # type: ignore[override]  # a flag attribute on the base
        return all(INDEX.fullmatch(name) for name in self.class_names)

    def load_samples(self) -> dict[str, list[Sample]]:
        names = self.class_names
        index = {name: i for i, name in enumerate(names)}
        out: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        for line, text, label, split in self.rows():
            if INDEX.fullmatch(label) and label not in index:
                y = int(label)  # a class index; check_labels names one outside the range
            elif label in index:
                y = index[label]
            else:
                raise ValueError(f"{self.csv_file}:{line}: label {label!r} is not one of the class_names "
                                 f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
            out[split].append((text, y))
        return {split: rows for split, rows in out.items() if rows}

    # ---- tokenising -------------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        if self._loaded_tokenizer is None:
            self._loaded_tokenizer = self._load_tokenizer()
        return self._loaded_tokenizer

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        config = self.data_config()
        if config.get("modality") != "text":
            raise ValueError(f"TextCSV yields token ids, but the backbone reads images (its data_config is "
                             f"{ {k: config[k] for k in list(config)[:3]} }): choose a text backbone "
                             "(HFTextBackbone) or an image datamodule")
        name = self.tokenizer_name or config.get("tokenizer")
        if not name:
            raise ValueError("the backbone names no tokenizer (it was built from a config, not model_name_or_path): "
                             "set data.init_args.tokenizer to a folder holding the model's tokenizer")
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ValueError(f"no tokenizer could be loaded from {name!r} ({error}); save the model's tokenizer there "
                             "(tokenizer.save_pretrained) or set data.init_args.tokenizer") from error

    def _dataset(self, samples: list[Sample], training: bool) -> Dataset:
        tokenizer = self._tokenizer()
        limit = self.max_length or self.data_config().get("max_length")
        encoded = tokenizer([text for text, _ in samples], truncation=limit is not None, max_length=limit)
        return TokenizedTexts(encoded["input_ids"], [y for _, y in samples])

    @property
    def collate_fn(self) -> Any:  # type: ignore[override]  # an attribute on the base
        """Pads each batch to its longest text with the tokenizer's padding id."""
        pad = self._tokenizer().pad_token_id
        return pad_token_batch(int(pad) if pad is not None else 0)
