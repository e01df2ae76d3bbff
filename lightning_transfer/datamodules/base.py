"""TransferDataModule: the common surface of every dataset (classes, transforms from the backbone, K-shot splits)."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_transfer.datamodules.resumable import EpochShuffleSampler, ResumableDataLoader, shuffle_seed

# the tasks a datamodule can declare (TransferDataModule.task); each picks its metrics in the module
TASKS = ("classification", "anomaly_detection", "retrieval")


def default_data_dir() -> str:
    return os.environ.get("LT_DATA_DIR", str(Path("~/.cache/lightning_transfer").expanduser()))


def fewshot_indices(
    labels: Sequence[int] | np.ndarray, num_shots: int, seed: int, exclude: Sequence[int] = (), strict: bool = True,
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """``num_shots`` indices per class drawn without replacement with ``seed``.

    With ``strict`` (the K-shot training draw) a class with fewer than ``num_shots`` images (after ``exclude``) is a
    ValueError naming it (by ``class_names`` when given) and its count; without, it gives all it has ("up to K": the
    ``min(K, 4)`` validation draw, ImageNet-C's ``images_per_class``). Same labels and seed -> same indices, on every
    platform (numpy's PCG64 stream is stable).
    """
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    label_array = np.asarray(labels)
    excluded = set(int(i) for i in exclude)
    pools = {int(c): np.array([i for i in np.flatnonzero(label_array == c) if int(i) not in excluded], dtype=np.int64)
             for c in np.unique(label_array)}
    short = {c: len(pool) for c, pool in pools.items() if len(pool) < num_shots}
    if strict and short:  # silently taking fewer would give a K-shot run with fewer shots in some classes
        counts = ", ".join((f"{class_names[c]!r}" if class_names is not None else f"class {c}") + f" ({n} images)"
                           for c, n in list(short.items())[:10]) + (", ..." if len(short) > 10 else "")
        raise ValueError(f"num_shots={num_shots} but {len(short)} class(es) have fewer images: {counts}; lower "
                         f"data.init_args.num_shots to at most {min(short.values())}")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for pool in pools.values():
        chosen.extend(int(i) for i in rng.choice(pool, size=min(num_shots, len(pool)), replace=False))
    return sorted(chosen)


def stratified_split(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (rest, held_out) with ``fraction`` of every class held out.

    With ``fraction > 0``, every class of two or more items gives at least one and keeps at least one: a small class
    (4 images at 0.1) would otherwise round to nothing and be missing from validation.
    """
    label_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(label_array):
        idx = np.flatnonzero(label_array == c)
        n = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.extend(int(i) for i in rng.choice(idx, size=n, replace=False))
    held_set = set(held)
    return [i for i in range(len(label_array)) if i not in held_set], sorted(held)


def split_digest(splits: Mapping[str, Sequence[Any]]) -> str:
    """A short hash of split membership, logged so two runs can prove they used the same data."""
    payload = json.dumps({k: [str(x) for x in v] for k, v in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_split(path: Path, make: Any, keys: Sequence[str] = (), num_items: int | None = None) -> dict[str, list]:
    """Read the split lists at ``path``; create them with ``make()`` and write them the first time.

    A cache that is not valid JSON, lacks one of ``keys`` or lists an index outside ``[0, num_items)`` (a crash
    mid-write, a hand edit, a dataset that changed) fails naming the file: deleting it redraws the split.
    """
    if path.is_file():
        return _read_split_cache(path, keys, num_items)
    splits = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(splits, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power cut never leaves a renamed, empty file
    os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    return splits


def _read_split_cache(path: Path, keys: Sequence[str], num_items: int | None) -> dict[str, list]:
    def bad(problem: str) -> ValueError:
        return ValueError(f"split cache {path} is {problem}; delete it to redraw the split (same seed, same split)")

    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from e
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise bad("not a JSON object of lists")
    missing = [k for k in keys if k not in splits]
    if missing:
        raise ValueError(f"split cache {path} lacks the split(s) {', '.join(missing)}; delete it to redraw the split")
    if num_items is not None:
        for name, indices in splits.items():
            out = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_items]
            if out:
                raise bad(f"stale: its {name!r} list has index {out[0]!r} outside 0..{num_items - 1}")
    return splits


def check_count(name: str, value: Any, minimum: int, fix: str, none_means: str = "") -> None:
    """Raise a ValueError naming ``name``, ``value`` and ``fix`` unless ``value`` is an integer >= ``minimum``.

    ``none_means`` (e.g. "all images") allows ``None`` with that meaning. Datamodules check their counts when they
    are built: otherwise a bad batch size only fails in torch's DataLoader after the fit has started, and a
    ``num_shots`` of 0 read as "unset" by an ``if num_shots:`` trains on all the data without a word.
    """
    if value is None and none_means:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f">= {minimum} or null ({none_means})" if none_means else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}: {fix}")


class TransferDataModule(LightningDataModule):
    """Base class of the datamodules.

    Its options are keyword-only: a subclass takes its own options and forwards these as ``**kwargs``
    (``super().__init__(**kwargs)``), which the CLI follows, so every datamodule lists them with these docs. A
    subclass names one itself only where its default differs (``batch_size: int = 64``) and passes it on by keyword.

    Args:
        data_dir: where the data (and cached split lists) live; default ``$LT_DATA_DIR`` or
            ``~/.cache/lightning_transfer``.
        batch_size: batch size of every loader.
        num_workers: DataLoader workers.
        num_shots: K-shot training set (K >= 1 images per class, drawn with ``seed``; validation then has up to
            ``min(K, 4)`` per class, as in CoOp); ``None`` uses all training data (0 is an error, not "all").
        seed: seed of the K-shot draw.
        data_config: preprocessing config (``input_size``, ``mean``, ``std``, ...); by default taken from the
            model's backbone when the Trainer starts.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        num_shots: int | None = None,
        seed: int = 1,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_count("batch_size", batch_size, 1, "set data.init_args.batch_size to the images per batch, e.g. 32")
        check_count("num_workers", num_workers, 0,
                    "set data.init_args.num_workers to 0 (load in the main process) or the number of worker processes")
        check_count("num_shots", num_shots, 1, "set data.init_args.num_shots to the training images per class, or "
                    "leave it null for the whole training set", none_means="all images")
        self.data_dir = Path(data_dir or default_data_dir()).expanduser()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.num_shots = None if num_shots is None else int(num_shots)
        self.seed = seed
        self._data_config = dict(data_config) if data_config else None
        self.datasets: dict[str, Dataset] = {}
        self.splits: dict[str, list] = {}
        # several test sets (e.g. one per corruption and severity): one test dataloader each, in order
        self.test_sets: list[Dataset] = []

    # True where class_names are placeholders ("0", "1", ...) the datamodule made up for lack of real names: a
    # prompt built from them means nothing, so CLIP-style methods refuse them
    class_names_generated: bool = False
    class_names_fix: str = "pass the real names in order as data.init_args.class_names"
    # what the loaders yield, checked against the backbone's data_config "modality" before anything runs
    modality: str = "image"
    # how the loaders batch items (None: torch's default); a text datamodule pads each batch to its longest item
    collate_fn: Any = None

    # ---- what the model needs -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def task(self) -> str:
        """What the labels mean, which picks the metrics and the monitored value: ``"classification"`` (one class
        per item; top-1/top-5 accuracy, ECE), ``"anomaly_detection"`` or ``"retrieval"`` (see :data:`TASKS`)."""
        return "classification"

    def set_data_config(self, config: dict[str, Any]) -> None:
        self._data_config = dict(config)

    def known_data_config(self) -> dict[str, Any] | None:
        """The preprocessing config if it is known yet (given, set, or already taken from the backbone), else
        ``None``; unlike :meth:`data_config` it never looks for a Trainer or raises."""
        return dict(self._data_config) if self._data_config is not None else None

    def data_config(self) -> dict[str, Any]:
        if self._data_config is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            backbone = getattr(module, "backbone", None)
            if backbone is None:
                raise RuntimeError(
                    f"{type(self).__name__} has no data_config: pass data_config=..., call set_data_config(), "
                    "or use it with a Trainer and a TransferModule (the backbone provides it)"
                )
            self._data_config = backbone.data_config()
        return self._data_config

    # ---- loaders ------------------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split (call setup first)")
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the run's seed, split across processes, and resumable mid-epoch."""
        if "train" not in self.datasets:
            return self._loader("train", shuffle=True)  # raises the "call setup first" error
        return self.shuffled_loader(self.datasets["train"])

    def shuffled_loader(self, dataset: Dataset, seed_offset: int = 0) -> DataLoader:
        """A training loader over ``dataset``: shuffled per epoch from the run's seed (plus ``seed_offset``, so two
        streams of one run draw different orders), split across processes, resumable mid-epoch."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffleSampler(dataset, num_replicas=world, rank=rank, seed=shuffle_seed(world) + seed_offset)
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, generator=torch.Generator(), collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> Any:
        if len(self.test_sets) > 1:  # Lightning then reports each under its dataloader index
            return [DataLoader(d, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                               collate_fn=self.collate_fn) for d in self.test_sets]
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def split_info(self) -> dict[str, Any]:
        """What identifies this run's data (empty before ``setup``): the hash of the split membership; subclasses
        add the protocol variant and sizes."""
        if not self.splits:
            return {}
        return {"data/split_digest": split_digest(self.splits), "data/name": type(self).__name__}

    def log_split_digest(self) -> None:
        """Log :meth:`split_info` to the Trainer's loggers, so two runs can prove they used the same data."""
        trainer = self.trainer
        info = self.split_info() if trainer is not None else {}
        if trainer is None or not info:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(info)
