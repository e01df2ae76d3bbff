"""CIFAR ResNets (He et al. 2015, arXiv 1512.03385, section 4.2) with option-A shortcuts, as a CNN Backbone.

Parameter names follow the widely used CIFAR ResNet checkpoints (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``linear``), so the original ``resnet20-12fca82f.th`` style files load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_transfer.backbones.base import Backbone, load_into, per_channel_stats, read_state_dict
from lightning_transfer.registry import register_backbone

#: depth -> blocks per stage (depth = 6n + 2)
CIFAR_RESNET_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
# ImageNet statistics: what the common CIFAR ResNet checkpoints were trained with
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, C + 2 * pad, H / 2, W / 2)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes // 4)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _read_weights(path: str | Path) -> dict[str, Tensor]:
    """``.npz`` (numpy arrays, no pickle) or a torch file read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist: pass the path of a weights file")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                state = {k: torch.from_numpy(np.array(arrays[k])) for k in arrays.files}
        except Exception as err:  # numpy's BadZipFile / EOFError name neither the file nor the cause
            raise ValueError(
                f"cannot read {str(path)!r} as a .npz of numpy arrays: {err}. The file is truncated (an interrupted "
                "download or copy), not an .npz, or holds object arrays (never unpickled): write it again with "
                "np.savez(out, **{k: v.numpy() for k, v in state_dict.items()})"
            ) from err
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        return state
    try:
        return read_state_dict(path)
    except ValueError as err:
        if path.suffix == ".safetensors":  # the legacy-pickle advice below is about .th files only
            raise
        raise ValueError(
            f"{err}. Legacy (pre-1.6) CIFAR ResNet .th files are pickles that weights_only=True may refuse: convert "
            "the state dict to a .npz of numpy arrays (np.savez(out, **{k: v.numpy() for k, v in sd.items()})) in a "
            "trusted environment, or use the .npz copy shipped beside it, and pass that as checkpoint_path"
        ) from err


@register_backbone("cifar_resnet")
class CIFARResNet(Backbone):
    """ResNet-20/32/44/56/110 for 32x32 CIFAR images (He et al. 2015, arXiv 1512.03385), option-A shortcuts.

    A CNN backbone: ``embed`` is ``conv1 -> bn1 -> ReLU``, the blocks are the three stages ``layer1..3`` (16/32/64
    channels), ``pool`` is global average pooling to 64 features. The checkpoint's ``linear`` classifier is kept
    as ``self.linear`` (not used by ``forward``) so :meth:`reference_logits` can reproduce the original model.

    Args:
        depth: 20, 32, 44, 56 or 110.
        num_classes: classes of the original classifier ``linear`` (10 for CIFAR-10, 100 for CIFAR-100).
        checkpoint_path: a local weights file with the common CIFAR ResNet parameter names: a ``.npz`` of numpy
            arrays, a safetensors file, or a torch file readable with ``weights_only=True``; a DataParallel
            ``module.`` prefix is removed; ``num_batches_tracked`` may be absent.
        data_config: overrides for the preprocessing config (default 3x32x32, ImageNet mean/std); one ``mean`` /
            ``std`` value stands for all 3 channels, another count is an error.
    """

    has_tokens = False
    final_prefixes = ("linear.",)

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        checkpoint_path: str | None = None,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if depth not in CIFAR_RESNET_DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(CIFAR_RESNET_DEPTHS)}, got {depth}")
        n = CIFAR_RESNET_DEPTHS[depth]
        self.name = f"cifar_resnet{depth}"
        self.checkpoint_path = checkpoint_path
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.embed_dim = self.num_features = 64
        self._data_config_overrides = dict(data_config or {})
        self.data_config()  # a data_config that cannot fit conv1 fails here, not in the datamodule's setup
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        if checkpoint_path is not None:
            state = _read_weights(checkpoint_path)
            own = self.state_dict()
            # old checkpoints predate num_batches_tracked: keep this model's counters
            state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
            load_into(self, state, checkpoint_path)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def embed(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def pool(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=(2, 3))  # (B, 64, 8, 8) -> (B, 64)

    def reference_logits(self, x: Tensor) -> Tensor:
        """The original network's output: features through the checkpoint's own ``linear`` classifier."""
        return self.linear(self(x))  # (B, num_classes)

    def unused_by_forward(self) -> tuple[str, ...]:
        return ("linear.",)  # only reference_logits reads the original classifier

    def data_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"input_size": (3, 32, 32), "mean": _MEAN, "std": _STD,
                               "interpolation": "bilinear", "crop_pct": 1.0}
        cfg.update(self._data_config_overrides)
        # one mean/std value (e.g. the quickstart's gray digit statistics) is used for all 3 channels, as timm does
        return per_channel_stats(cfg, self._data_config_overrides, type(self).__name__, self.conv1.in_channels)

    def identity(self) -> str:
        return f"{self.name} ({self.checkpoint_path or 'random init'})"

    @property
    def random_init(self) -> bool:
        return not self.checkpoint_path


def _fixed_depth(depth: int) -> type[CIFARResNet]:
    class _Fixed(CIFARResNet):
        def __init__(self, num_classes: int = 10, checkpoint_path: str | None = None,
                     data_config: dict[str, Any] | None = None) -> None:
            super().__init__(depth, num_classes, checkpoint_path, data_config)

    _Fixed.__name__ = _Fixed.__qualname__ = f"CIFARResNet{depth}"
    _Fixed.__doc__ = (
        f"ResNet-{depth} for CIFAR (He et al. 2015, arXiv 1512.03385): :class:`CIFARResNet` with depth={depth}.\n\n"
        "    Args:\n        num_classes: classes of the original classifier ``linear``.\n"
        "        checkpoint_path: a local weights file (.npz, safetensors or a torch state dict).\n"
        "        data_config: overrides for the preprocessing config.\n")
    return register_backbone(f"cifar_resnet{depth}")(_Fixed)


CIFARResNet20 = _fixed_depth(20)
CIFARResNet32 = _fixed_depth(32)
CIFARResNet44 = _fixed_depth(44)
CIFARResNet56 = _fixed_depth(56)
CIFARResNet110 = _fixed_depth(110)
