"""CSVImages: any image dataset listed in one CSV file of ``path,label[,split]`` rows."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from lightning_transfer.datamodules.files import IMAGE_EXTENSIONS, FileListDataModule, Sample
from lightning_transfer.registry import register_datamodule

SPLITS = ("train", "val", "test")
INDEX = re.compile(r"-?\d+")  # a class index; "-1" too, so that the range check rejects it
# header cells (lower case): a first row whose path cell is one of these, or whose label cell is one of these while its
# path cell names no image file, is a header, not an image of class "label"
PATH_HEADERS = ("path", "file", "filepath", "file_path", "filename", "file_name", "image", "image_path", "img",
                "img_path")
LABEL_HEADERS = ("label", "labels", "class", "class_name", "classname", "target", "category", "y")


def _is_header(cells: list[str]) -> bool:
    path, label = (cells + ["", ""])[:2]
    if path.lower() in PATH_HEADERS:
        return True
    return label.lower() in LABEL_HEADERS and not path.lower().endswith(IMAGE_EXTENSIONS)


@register_datamodule("csv")
class CSVImages(FileListDataModule):
    """Images listed in a CSV file: ``path,label`` or ``path,label,split`` per row, an optional header row.

    Paths are relative to ``image_root`` (default: the CSV file's folder) unless absolute. Labels are class indices
    (``0..n-1``) or class names: with ``class_names`` given, a name is looked up in it; without, names are sorted
    into the classes, and integer labels give classes ``"0"`` to the largest label, which must leave no class without
    an image unless ``num_classes`` says so (one stray ``7`` in a 0-2 file is refused, naming its row, rather than
    making an 8-class head); an index outside the classes fails naming the file and row; a file mixing integer labels
    and names is an error. The split column
    holds ``train``, ``val`` or ``test``; rows without one are training rows. Without validation rows
    ``val_fraction`` of every training class is held out; without test rows the validation set is the test set.

    Args:
        csv_file: the CSV file.
        image_root: folder the relative image paths start from; default the CSV file's folder.
        class_names: the classes in label order (default: from the labels, see above).
        num_classes: the number of classes of integer labels (default: the largest label + 1, with every class
            present); labels must be below it.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (augment, cache_images,
            val_fraction: held out when the file has no validation rows; batch_size, num_shots, seed, ...).
    """

    def __init__(
        self,
        csv_file: str,
        image_root: str | None = None,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes is not None and (num_classes < 1 or (class_names is not None
                                                            and len(class_names) != num_classes)):
            raise ValueError(f"num_classes={num_classes} must be >= 1 and agree with the {len(class_names or [])} "
                             "class_names given: pass one of them")
        self.given_num_classes = num_classes
        self.csv_file = Path(csv_file).expanduser()
        self.root = Path(image_root).expanduser() if image_root else self.csv_file.parent
        self._class_names = list(class_names) if class_names is not None else None
        self._names_given = class_names is not None
        self._rows: list[tuple[int, str, str, str]] | None = None
        self.variant = f"csv:{self.csv_file.name}"
        self.listed_in = str(self.csv_file)

    def rows(self) -> list[tuple[int, str, str, str]]:
        """(line number, path, label, split) of every data row; a malformed row fails naming file and line."""
        if self._rows is None:
            if not self.csv_file.is_file():
                raise FileNotFoundError(f"CSV file {self.csv_file} not found: write one 'path,label[,split]' row per "
                                        "image, or fix data.init_args.csv_file")
            rows: list[tuple[int, str, str, str]] = []
            with open(self.csv_file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
                for number, row in enumerate(csv.reader(f), start=1):
                    cells = [c.strip() for c in row]
                    if not any(cells) or (not rows and _is_header(cells)):
                        continue  # blank line or header
                    if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
                        raise ValueError(f"{self.csv_file}:{number}: expected 'path,label[,split]', got {row}")
                    split = cells[2].lower() if len(cells) == 3 and cells[2] else "train"
                    if split not in SPLITS:
                        raise ValueError(f"{self.csv_file}:{number}: split {cells[2]!r} is not one of {SPLITS}")
                    rows.append((number, cells[0], cells[1], split))
            if not rows:
                raise ValueError(f"{self.csv_file} lists no images")
            self._rows = rows
        return self._rows

    @property
    def class_names_generated(self) -> bool:  # type: ignore[override]  # a flag attribute on the base
        """True when the labels are integers and no ``class_names`` were given: the names are "0", "1", ..."""
        names = self.class_names
        return not self._names_given and names == [str(i) for i in range(len(names))]

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            rows = self.rows()
            indices = [(n, label) for n, _, label, _ in rows if INDEX.fullmatch(label)]
            names = [(n, label) for n, _, label, _ in rows if not INDEX.fullmatch(label)]
            if indices and names:  # one typo would otherwise turn every index into a name and shift the classes
                raise ValueError(f"{self.csv_file} mixes integer labels (line {indices[0][0]}: {indices[0][1]!r}) and "
                                 f"class names (line {names[0][0]}: {names[0][1]!r}): use one kind in every row, or "
                                 "pass data.init_args.class_names")
            if indices:
                self._class_names = [str(i) for i in range(self._index_class_count(indices))]
            else:
                self._class_names = sorted({label for _, label in names})
        return list(self._class_names)

    def _index_class_count(self, indices: list[tuple[int, str]]) -> int:
        """Classes of integer labels: ``num_classes``, else the largest label + 1 if no class in between is empty."""
        if self.given_num_classes is not None:
            return self.given_num_classes
        line, top = max(((n, int(label)) for n, label in indices), key=lambda item: item[1])
        empty = sorted(set(range(top + 1)) - {int(label) for _, label in indices})
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            raise ValueError(f"{self.csv_file}:{line}: label {top} makes {top + 1} classes, but class(es) {shown} "
                             f"have no image: fix that row, or pass data.init_args.num_classes={top + 1} (or "
                             "class_names) if those classes really are empty")
        return top + 1

    def _label(self, number: int, label: str, index: dict[str, int]) -> int:
        if label in index:
            return index[label]
        if INDEX.fullmatch(label):
            count = len(index) or len(self.class_names)
            if int(label) >= count:
                raise ValueError(f"{self.csv_file}:{number}: label {label} is outside the {count} classes "
                                 f"(0..{count - 1}): fix the row, or pass data.init_args.num_classes / class_names "
                                 "for the classes the file really has")
            return int(label)
        raise ValueError(f"{self.csv_file}:{number}: label {label!r} is not a class name ({len(index)} classes: "
                         f"{', '.join(list(index)[:10])}{', ...' if len(index) > 10 else ''}) nor an index")

    def load_samples(self) -> dict[str, list[Sample]]:
        names = self.class_names
        index = {} if all(n == str(i) for i, n in enumerate(names)) else {n: i for i, n in enumerate(names)}
        samples: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        for number, path, label, split in self.rows():
            samples[split].append((str(self.root / path), self._label(number, label, index)))
        if not samples["train"]:
            raise ValueError(f"{self.csv_file} has no training rows (split column 'train' or empty)")
        return {split: rows for split, rows in samples.items() if rows}
