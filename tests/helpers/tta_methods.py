"""Every registered test-time method, built from its YAML in configs/test_time/, and the tiny backbones it claims:
what the test-time contract suite and the DDP comparison iterate over (the registry, not a fixed list)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_transfer._config import build_component
from lightning_transfer.registry import TEST_TIME
from lightning_transfer.test_time.base import TestTimeAdaptation

REPO = Path(__file__).resolve().parents[2]


def method_from_yaml(name: str, **overrides) -> TestTimeAdaptation:
    """The method ``configs/test_time/<name>.yaml`` configures, with ``overrides`` of its init args."""
    config = yaml.safe_load((REPO / "configs/test_time" / f"{name}.yaml").read_text())["model"]["test_time"]
    config = {**config, "init_args": {**(config.get("init_args") or {}), **overrides}}
    return build_component(config, TestTimeAdaptation)


def backbones_claimed(name: str) -> list[str]:
    """The tiny backbones (tests/helpers/models.py) the method claims: the BatchNorm CNN always, the LayerNorm ViT
    unless it requires BatchNorm."""
    return ["cnn"] if "batch_norm" in TEST_TIME.get(name).requires else ["cnn", "vit"]


CASES = [(name, kind) for name in TEST_TIME.names() for kind in backbones_claimed(name)]
