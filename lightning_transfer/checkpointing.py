"""Checkpoints that survive a kill: atomic writes, and the random state an exact resume needs.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, whose local temporary file lives in the
system temporary directory; when that is another filesystem than the checkpoint (a tmpfs ``/tmp``, a cluster's
scratch), the final step is a copy into ``last.ckpt``, and a kill during it leaves a truncated checkpoint.
:class:`AtomicCheckpointIO` writes a temporary file *next to* the target, syncs it and renames it over the target,
which POSIX makes atomic: a reader sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Trainer

# the temporary name never contains "last": Lightning's `ckpt_path="last"` picks any file in the checkpoint folder
# whose name does, so a partial file left by a kill must not look like one
PARTIAL_PREFIX = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's folder, ``fsync``, then rename over the target.

    Remote paths (``s3://``, ...) go to Lightning's own writer: an object store upload already appears whole or not
    at all. A :class:`~lightning_transfer.module.TransferModule` installs this in place of Lightning's default
    ``TorchCheckpointIO`` when the trainer starts; a checkpoint IO plugin you pass yourself is kept.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def use_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Replace the strategy's default ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO` (others are kept)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ---- random state ----------------------------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python random states, as plain tensors, lists and ints.

    Plain types keep the checkpoint loadable with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [int(version), list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def unreadable_checkpoint(path: Any, err: BaseException, what: str = "checkpoint") -> ValueError:
    """The error for a file ``torch.load(weights_only=True)`` cannot read, naming it (as ``what``) and the fix."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {first}): it is truncated or not a "
                      "checkpoint written by fit, or it holds objects other than tensors, which are never unpickled "
                      "here (weights_only=True). Pass a complete checkpoint written by fit.")


def read_checkpoint(path: Any, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, memory-mapped where the file allows it (cheap for a large
    file); a file that cannot be read raises :func:`unreadable_checkpoint`'s ValueError."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap takes only torch's zip format
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  truncated zip, not a torch file, or objects other than tensors
        raise unreadable_checkpoint(path, err, what) from err
