"""Building frozen auxiliary networks: a teacher (distillation), an old model (backward compatibility).

A strategy that needs one holds a :class:`FrozenNetwork` as a submodule, built in its constructor from a backbone
config or from a fit checkpoint of this project (:func:`frozen_network`). Like the frozen backbone, its weights are
left out of the strategy's checkpoints, which record its identity and a digest of its weights instead; on reload the
network is built again from the same settings and its digest is checked (``checkpointing.CheckpointFormat``).
Trainable auxiliaries (a domain discriminator, a projector) are plain submodules of the strategy, saved with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_transfer.assembly import assemble
from lightning_transfer.checkpointing import CheckpointFormat, read_checkpoint
from lightning_transfer.frozen import FrozenNetwork

__all__ = ["FrozenNetwork", "frozen_network"]


def frozen_network(backbone: nn.Module | None = None, checkpoint: str | None = None, role: str = "teacher"
                   ) -> FrozenNetwork:
    """A :class:`FrozenNetwork` from exactly one of a backbone (as configured, e.g. its pretrained weights) or the
    path of a fit checkpoint (its backbone, strategy and head, reloaded with every checkpoint check)."""
    if (backbone is None) == (checkpoint is None):
        raise ValueError(f"give the {role} as exactly one of a backbone config ({role}_backbone) or a fit checkpoint "
                         f"({role}_checkpoint); got {'both' if backbone is not None else 'neither'}")
    if backbone is not None:
        return FrozenNetwork(backbone)
    file = Path(str(checkpoint)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{role}_checkpoint {str(checkpoint)!r} does not exist: pass a .ckpt written by fit")
    saved = read_checkpoint(file, f"{role}_checkpoint")
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if not isinstance(hparams, dict) or "backbone" not in hparams or "state_dict" not in saved:
        raise ValueError(f"{role}_checkpoint {str(file)!r} is not a checkpoint written by fit (no recorded model)")
    parts = _Parts(*assemble(hparams["backbone"], hparams.get("adaptation"), int(hparams.get("num_classes") or 0),
                             hparams.get("class_names"), hparams.get("head"), float(hparams.get("head_dropout", 0.0))))
    CheckpointFormat(parts).load(parts, saved)  # every check fit's checkpoints get, and the frozen weights filled in
    parts.load_state_dict(saved["state_dict"], strict=True)
    identity = f"{file} ({type(parts.adaptation).__name__} on {parts.backbone.identity()})"
    return FrozenNetwork(parts.backbone, parts.adaptation, parts.head, identity=identity)


class _Parts(nn.Module):
    """A fit's model without the Lightning module around it: what its checkpoint's state dict is keyed by."""

    test_time = None
    backbone: Any
    adaptation: Any
    head: Any

    def __init__(self, backbone: nn.Module, adaptation: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.backbone, self.adaptation, self.head = backbone, adaptation, head
        self.num_classes = getattr(head, "num_classes", 0)
