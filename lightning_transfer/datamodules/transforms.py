"""Image transforms built from a backbone's ``data_config()``: the one place the datamodules get them from.

``data_config`` is the backbone's preprocessing config (``input_size`` (C, H, W), ``mean``, ``std``,
``interpolation``, ``crop_pct``, ``crop_mode``); every transform here takes a PIL image and gives a normalised
(C, H, W) tensor with the backbone's channels.
"""

from __future__ import annotations

import math
from typing import Any


def image_channels(data_config: dict[str, Any]) -> int:
    """The channels the backbone takes: 3 (RGB) or 1 (gray, PIL's "L" luma); any other count is an error."""
    channels = int(data_config["input_size"][0])
    if channels not in (1, 3):
        raise ValueError(f"data_config input_size {tuple(data_config['input_size'])} asks for {channels} channels, "
                         "but images are read as 1 (gray) or 3 (RGB) channels: build the backbone with 1 or 3 "
                         "input channels or fix data_config's input_size")
    return channels


def with_channels(transform: Any, data_config: dict[str, Any]) -> Any:
    """``transform`` after a conversion to gray when the backbone takes 1 channel (PIL images in)."""
    from torchvision.transforms import Compose, Grayscale

    return Compose([Grayscale(1), transform]) if image_channels(data_config) == 1 else transform


def eval_geometry(data_config: dict[str, Any]) -> tuple[int, int, int]:
    """(resize size of the shorter side, crop height, crop width) of timm's evaluation transform."""
    _, h, w = data_config["input_size"]
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    return math.floor(min(h, w) / crop_pct), h, w


def interpolation_mode(data_config: dict[str, Any]) -> Any:
    """torchvision's ``InterpolationMode`` for ``data_config["interpolation"]`` (bilinear when unknown)."""
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}.get(str(data_config.get("interpolation", "bilinear")),
                                                      InterpolationMode.BILINEAR)


def build_transform(data_config: dict[str, Any], training: bool, augment: bool) -> Any:
    """timm's standard transforms from the backbone's data config (random-resized-crop + flip when augmenting).

    A 1-channel backbone gets gray images (PIL's "L"), converted before timm's transform. ``crop_mode`` (timm's
    ``center``, ``squash`` or ``border``) chooses the evaluation geometry, as timm's own pipeline does.
    """
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: data_config[k] for k in keys if k in data_config}
    return with_channels(create_transform(**cfg, is_training=training and augment), data_config)


def direct_resize_transform(data_config: dict[str, Any]) -> Any:
    """Resize straight to ``input_size`` (no aspect-preserving resize, no crop) and normalise: the VTAB-1k transform."""
    from torchvision.transforms import Compose, Normalize, Resize, ToTensor

    _, h, w = data_config["input_size"]
    return with_channels(Compose([Resize((h, w), interpolation=interpolation_mode(data_config)), ToTensor(),
                                  Normalize(data_config["mean"], data_config["std"])]), data_config)
