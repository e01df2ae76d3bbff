"""Collectives the methods use under multi-process training (DDP/FSDP), each a no-op in a single process.

Lightning syncs what it owns (gradients of the wrapped model, logged metrics, samplers). What our methods compute on
their own (CAFA's source statistics, LinearProbe's feature cache, test-time gradient steps, BatchNorm statistics at
test time) goes through these helpers, so that ``N`` processes with batch ``B`` compute what one process computes
with batch ``N * B``. Every helper must be called by every process, the same number of times.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: BatchNorm layers: torch's public classes (timm's BatchNormAct2d and friends subclass them)
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def rank_and_world() -> tuple[int, int]:
    """(this process's global rank, number of processes); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def is_rank_zero() -> bool:
    return rank_and_world()[0] == 0


def sum_across_ranks_(tensor: Tensor) -> Tensor:
    """In-place sum over processes (no autograd); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: d(sum_r x_r)/d x_r = 1, so the backward pass sums the output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def differentiable_sum_across_ranks(tensor: Tensor) -> Tensor:
    return _SumAcrossRanks.apply(tensor) if is_distributed() else tensor


def average_gradients_(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over processes (what DDP does for the model it wraps).

    Each process's loss is the mean over its own batch and the batches are equally large (Lightning's
    DistributedSampler pads), so the mean of the gradients is the gradient of the mean loss over the global batch.
    """
    if not is_distributed():
        return
    # the same code runs on every process, so the same parameters have gradients everywhere
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` (M_r, ...) along dim 0, in rank order; M_r may differ per process."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:int(s.item())] for g, s in zip(gathered, sizes)])


def gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _global_batch_norm(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """BatchNorm with the statistics of the batch over all processes: x (B, C, ...) -> same shape.

    Sums, sums of squares and counts are summed across processes with a gradient, so the backward pass is that of
    one BatchNorm over the concatenated batch. The variance is biased (1/N), as BatchNorm normalises with.
    """
    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])  # (2C + 1,)
    stats = differentiable_sum_across_ranks(stats)
    channels = x.shape[1]
    mean = stats[:channels] / stats[-1]  # (C,)
    var = (stats[channels:2 * channels] / stats[-1] - mean * mean).clamp_min(0)  # (C,)
    shape = (1, channels) + (1,) * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out


@contextlib.contextmanager
def global_batch_statistics(layers: list[nn.Module]) -> Iterator[None]:
    """Inside the block, BatchNorm layers that normalise with batch statistics use those of the global batch.

    For test-time methods (BN-adapt, Tent, CAFA) under DDP, where the model is not wrapped in SyncBatchNorm (which
    also needs a GPU): each process adapts on its shard, yet the statistics and gradients are those of the batch
    all processes see together. Outside a process group it does nothing.
    """
    patched = [m for m in layers if isinstance(m, BATCH_NORM_TYPES)] if is_distributed() else []
    for m in patched:
        m.forward = types.MethodType(_global_batch_norm, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward



# ---- FSDP -----------------------------------------------------------------------------------------------------
# the block classes of the backbones we wrap: timm ViT/EVA blocks, HF CLIP encoder layers, HF BERT/ViT layers
DEFAULT_BLOCK_NAMES = ("Block", "EvaBlock", "ResidualAttentionBlock", "CLIPEncoderLayer", "BertLayer", "ViTLayer")
_LEAF_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.Embedding, nn.GroupNorm)


class BlockWrapPolicy:
    """FSDP auto-wrap policy for a frozen backbone with trainable parts (``configs/trainer/fsdp.yaml``).

    Every backbone block is one FSDP unit (sharded, gathered only while it runs). Within a unit that would hold both
    frozen and trainable weights (a block with LoRA matrices or adapters, the model's root with the head), each leaf
    layer whose weights all train becomes a unit of its own. PyTorch's FSDP accepts mixed units with
    ``use_orig_params=True`` (Lightning's default) but then allocates gradients for the frozen weights too; split,
    the frozen weights sit in flat parameters that never get a gradient. Trainable parameters that are not in such a
    layer (prompt or query tokens) stay in their enclosing unit.

    Args:
        block_names: class names of the modules to wrap as blocks.
    """

    def __init__(self, block_names: list[str] | None = None) -> None:
        self.block_names = tuple(block_names or DEFAULT_BLOCK_NAMES)
        self._plan: set[int] = set()  # ids of the modules to wrap, for the model seen last
        self._known: set[int] = set()  # ids of every module of that model

    def plan(self, root: nn.Module) -> set[nn.Module]:
        """The modules of ``root`` that become FSDP units (besides ``root`` itself)."""
        blocks = [m for m in root.modules() if m is not root and type(m).__name__ in self.block_names]
        units: set[nn.Module] = set(blocks)
        for unit in [root, *blocks]:
            owned = _owned_modules(unit, set(blocks) - {unit})
            trains = {p.requires_grad for m in owned for p in m.parameters(recurse=False)}
            if len(trains) == 2:  # mixed: give the trainable leaf layers their own units
                units |= {m for m in owned if isinstance(m, _LEAF_TYPES) and _all_train(m)}
        return units

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        # FSDP's callable interface, called top-down from the model's root: recurse=True asks whether to look inside
        # `module`, recurse=False whether to wrap it. A module not seen before is the root of a new model.
        if id(module) not in self._known:
            self._plan = {id(m) for m in self.plan(module)}
            self._known = {id(m) for m in module.modules()}
        return True if recurse else id(module) in self._plan


def _owned_modules(unit: nn.Module, other_units: set[nn.Module]) -> list[nn.Module]:
    """Modules under ``unit`` (itself included) that are not inside another unit."""
    out, stack = [], [unit]
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(c for c in m.children() if c not in other_units)
    return out


def _all_train(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.requires_grad for p in params)
