"""LinearProbe: a linear head on frozen pooled features, with an optional feature cache."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from lightning_transfer import distributed
from lightning_transfer.backbones.base import Backbone
from lightning_transfer.registry import register_strategy
from lightning_transfer.strategies.base import AdaptationStrategy, freeze

_KEY_BYTES = 16


def sample_keys(inputs: Tensor) -> list[bytes]:
    """One exact content key per sample (blake2b of its bytes): equal keys mean bit-identical inputs."""
    flat = inputs.detach().cpu().contiguous().reshape(inputs.shape[0], -1)
    raw = flat.view(torch.uint8).numpy() if flat.dtype != torch.bool else flat.numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=_KEY_BYTES).digest() for row in raw]


@register_strategy("linear_probe")
class LinearProbe(AdaptationStrategy):
    """Linear probing: the backbone is frozen and kept in eval mode; only the head trains.

    Args:
        cache_features: keep the pooled features of every training input seen so far, keyed by the exact input
            bytes, so later epochs skip the backbone for inputs seen before. It only pays off when the training
            transform is deterministic (no random augmentation): a changed input is a cache miss, never a stale hit.
            Under DDP the cache is shared: every process stores the features any process computed (one all-gather
            per step), so from the second epoch on no process runs the backbone, whichever shard it is given. It is
            not saved in checkpoints: after a resume it fills again, with the same values.
    """

    def __init__(self, cache_features: bool = False) -> None:
        super().__init__()
        self.cache_features = cache_features
        self._cache: dict[bytes, Tensor] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def _attach(self, backbone: Backbone, head: nn.Module | None) -> None:
        freeze(backbone)

    def forward(self, backbone: Backbone, head: nn.Module | None, inputs: Tensor) -> Tensor:
        assert head is not None
        return head(self.features(backbone, inputs))

    @torch.no_grad()
    def features(self, backbone: Backbone, inputs: Tensor) -> Tensor:
        # Only training batches are cached: evaluation runs once per epoch and may use other transforms.
        if not (self.cache_features and self.training):
            return backbone(inputs)
        keys = sample_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        fresh = backbone(inputs[missing]) if missing else inputs.new_zeros((0, backbone.num_features))  # (M, D)
        fresh_keys = [keys[i] for i in missing]
        if distributed.is_distributed():
            fresh_keys, fresh = _gather_fresh(fresh_keys, fresh)
        for key, feature in zip(fresh_keys, fresh):
            self._cache.setdefault(key, feature.detach())
        return torch.stack([self._cache[k] for k in keys]).to(inputs.device)

    def clear_cache(self) -> None:
        self._cache.clear()


def _gather_fresh(keys: list[bytes], fresh: Tensor) -> tuple[list[bytes], Tensor]:
    """Under DDP, the keys and features every process computed in this step, so that every process caches them.

    Each process sees a different shard every epoch (the sampler reshuffles across processes), so a per-process
    cache would miss about (N - 1) / N of its inputs in the second epoch and compute them again; shared, every
    process skips the backbone for the whole training set from the second epoch on, as a single process does.
    Costs one all-gather of the step's new features (M, D) and keys; every process calls it in every step.
    """
    packed = torch.tensor(list(b"".join(keys)), dtype=torch.uint8, device=fresh.device).view(-1, _KEY_BYTES)
    all_keys = distributed.gather_rows(packed).cpu()  # (M_all, 16)
    all_fresh = distributed.gather_rows(fresh.detach().float())  # (M_all, D); one dtype on every process
    return [bytes(k.tolist()) for k in all_keys], all_fresh
