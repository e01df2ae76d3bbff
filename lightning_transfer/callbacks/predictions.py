"""Where ``python -m lightning_transfer predict`` puts its predictions: a CSV and the class probabilities."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


def new_folder(base: Path) -> Path:
    """``base``, or ``base-1``, ``base-2``, ... : the first that does not exist (earlier predictions are kept)."""
    candidate, k = base, 0
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


class PredictionWriter(BasePredictionWriter):
    """After ``predict``, write ``predictions.csv`` (index, predicted class index and name, its probability) and
    ``probabilities.safetensors`` (the (N, C) softmax) to a new ``predictions`` folder in the run folder (the logger's,
    else ``default_root_dir``); an earlier ``predictions`` folder is kept and the new one numbered. Indices are
    positions in the predicted split (the datamodule's test split), in order. With several processes each writes
    its share (``predictions_rank<r>.csv``), with the split positions Lightning reports for its batches.

    Args:
        output_dir: write here instead (a folder that does not exist yet, or is empty).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.written: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and self.output_dir is not None:
            self._folder(trainer)  # a bad output_dir fails before anything is predicted

    def _folder(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            folder = Path(self.output_dir)
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise FileExistsError(f"predictions output {str(folder)!r} exists and is not an empty folder: pass a "
                                      "new folder (earlier predictions are never overwritten)")
            return folder
        root = Path(trainer.log_dir or trainer.default_root_dir)
        return new_folder(root / "predictions")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        several = bool(predictions) and isinstance(predictions[0], list)  # one list of batches per dataloader
        loaders = predictions if several else [predictions]
        # the split positions of each loader's batches (flattened whatever their nesting; unused if they do not add up)
        if several:
            fits = batch_indices and len(batch_indices) == len(loaders)
            indices = list(batch_indices) if fits else [[] for _ in loaders]
        else:
            indices = [batch_indices]
        hparams = getattr(pl_module, "hparams", {})
        datamodule = getattr(trainer, "datamodule", None)
        names = list(hparams.get("class_names") or getattr(datamodule, "class_names", None) or [])
        chosen = self._folder(trainer) if trainer.is_global_zero else None
        folder = trainer.strategy.broadcast(chosen)  # one folder for every process
        assert folder is not None
        folder.mkdir(parents=True, exist_ok=True)
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        for i, (batches, positions) in enumerate(zip(loaders, indices)):
            if not batches:
                continue
            probs = torch.cat([b.float().cpu() for b in batches])  # (N, C)
            flat = _flatten_ints(positions)
            index = flat if len(flat) == len(probs) else list(range(len(probs)))
            suffix = (f"_{i}" if len(loaders) > 1 else "") + rank
            self._write(folder, suffix, probs, index, names)
        self.written = folder
        rank_zero_info(f"predict: wrote {folder / 'predictions.csv'} and probabilities.safetensors"
                       + (" (one pair per dataloader or process)" if len(loaders) > 1 or rank else ""))

    @staticmethod
    def _write(folder: Path, suffix: str, probs: torch.Tensor, index: list[int], names: list[str]) -> None:
        from safetensors.torch import save_file

        confidence, predicted = probs.max(dim=1)
        partial = folder / f".predictions{suffix}.csv.partial"
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "predicted", "class_name", "probability"])
            for position, cls, p in zip(index, predicted.tolist(), confidence.tolist()):
                writer.writerow([position, cls, names[cls] if cls < len(names) else "", f"{p:.6f}"])
        os.replace(partial, folder / f"predictions{suffix}.csv")
        save_file({"probabilities": probs.contiguous(), "index": torch.tensor(index, dtype=torch.long)},
                  str(folder / f"probabilities{suffix}.safetensors"))


def _flatten_ints(value: object) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [i for item in value for i in _flatten_ints(item)]
    return [int(value)]  # type: ignore[call-overload]
