"""The training DataLoader: shuffled per epoch from a seed, sharded across processes, resumable mid-epoch.

Lightning saves the state of a training loader that has ``state_dict``/``load_state_dict`` in every checkpoint and
restores it before iterating. Together with Lightning's loop state this makes a fit resumed from a mid-epoch
checkpoint see exactly the batches the interrupted fit would have seen next: the order depends only on the seed and
the epoch (never on the global random state), and the samples already trained on are skipped without being loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def shuffle_seed(world_size: int) -> int:
    """The seed of the training order: ``seed_everything``'s seed (``PL_GLOBAL_SEED``), as Lightning's own sampler.

    Without one, a single process draws a seed (a new order each run, as a plain shuffled DataLoader); several
    processes use 0, since they must agree on the order to split it between them.
    """
    if "PL_GLOBAL_SEED" in os.environ:
        return int(os.environ["PL_GLOBAL_SEED"])
    if world_size > 1:
        return 0
    return int(torch.randint(0, 2**31 - 1, ()).item())


class EpochShuffleSampler(DistributedSampler):
    """A :class:`DistributedSampler` (also used with one process) that can skip the start of its next epoch.

    The order of epoch ``e`` is the permutation drawn from ``seed + e`` (``set_epoch``, which Lightning calls);
    process ``rank`` takes every ``num_replicas``-th index of it. Being a ``DistributedSampler``, Lightning keeps it
    under DDP instead of replacing it, so one process with batch ``N * B`` sees, step by step, the union of what
    ``N`` processes with batch ``B`` see.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0  # samples to leave out at the start of the next iteration only (resuming mid-epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` whose position Lightning checkpoints and restores.

    State: the epoch, the number of batches the trainer has taken in it, and the batch size and process count they
    were taken with. Lightning's training loop fetches map-style (sized) loaders one batch per step, so at a
    checkpoint that count is the number of steps done in the epoch. Resumed with another process count (a DDP
    checkpoint resumed on one process, a requeued job on fewer GPUs), the samples the processes took together, the
    start of the epoch's permutation, are what is left out, shared between the new processes. ``generator`` (which
    seeds worker processes) is reseeded per epoch, so creating the iterator never draws from the global random state
    that dropout and augmentations use.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # a generator: this runs at the first batch, after Lightning has called set_epoch for the epoch
        sampler = self.sampler
        self._epoch = int(getattr(sampler, "epoch", 0))
        resume_epoch, resume_batches, batch_size, world = getattr(self, "_resume", (-1, 0, None, None))
        self._resume: tuple[int, int, int | None, int | None] = (-1, 0, None, None)
        self._taken = 0
        if resume_epoch == self._epoch and isinstance(sampler, EpochShuffleSampler) and self.batch_size is not None:
            # the interrupted epoch: leave out what was trained on, the first `taken` samples of the permutation,
            # which process r of `world` took as every world-th one from r (DistributedSampler's split)
            world = world or sampler.num_replicas
            taken = resume_batches * (batch_size or self.batch_size) * world
            # this process's share, rounded up on every process: they must keep equal batch counts (a process with
            # one batch more would wait for the others at its gradient sync), so at most one sample each is left out
            sampler.skip = min(-(-taken // sampler.num_replicas), sampler.num_samples)
            self._taken = -(-sampler.skip // self.batch_size)
        if self.generator is not None and isinstance(sampler, EpochShuffleSampler):
            self.generator.manual_seed(sampler.seed * 100_003 + self._epoch)
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        world = self.sampler.num_replicas if isinstance(self.sampler, EpochShuffleSampler) else 1
        return {"epoch": getattr(self, "_epoch", 0), "batches": getattr(self, "_taken", 0),
                "batch_size": int(self.batch_size or 0), "world_size": int(world)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # applied only if the fit goes on with that epoch; when the checkpoint closed it (its last batch), Lightning
        # starts the next epoch, from its beginning (checkpoints written before the batch size and process count
        # were stored count in this loader's own)
        self._resume = (int(state.get("epoch", 0)), int(state.get("batches", 0)),
                        int(state.get("batch_size", 0)) or None, int(state.get("world_size", 0)) or None)
