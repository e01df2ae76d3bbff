"""DataModules; importing this package registers all of them."""

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.digits import Digits
from lightning_transfer.datamodules.folder import ImageFolder

__all__ = ["Digits", "ImageFolder", "TransferDataModule"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
