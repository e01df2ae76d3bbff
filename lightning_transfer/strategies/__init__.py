"""Adaptation strategies (``model.adaptation``); importing this package registers all of them."""

from lightning_transfer.strategies.base import AdaptationStrategy
from lightning_transfer.strategies.full import FullFinetune
from lightning_transfer.strategies.linear_probe import LinearProbe
from lightning_transfer.strategies.partial_freeze import PartialFreeze

__all__ = ["AdaptationStrategy", "FullFinetune", "LinearProbe", "PartialFreeze"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
