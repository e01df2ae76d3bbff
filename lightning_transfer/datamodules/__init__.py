"""DataModules; importing this package registers all of them."""

from lightning_transfer.datamodules.base import TransferDataModule
from lightning_transfer.datamodules.cifar import CIFAR10, CIFAR100
from lightning_transfer.datamodules.digits import Digits
from lightning_transfer.datamodules.folder import ImageFolder
from lightning_transfer.datamodules.torchvision_sets import (
    DTD,
    SUN397,
    UCF101,
    Caltech101,
    EuroSAT,
    FGVCAircraft,
    Flowers102,
    Food101,
    ImageNet,
    OxfordPets,
    StanfordCars,
)

__all__ = ["Digits", "ImageFolder", "TransferDataModule"]
__all__ += ["CIFAR10", "CIFAR100", "DTD", "SUN397", "UCF101", "Caltech101", "EuroSAT", "FGVCAircraft", "Flowers102",
            "Food101", "ImageNet", "OxfordPets", "StanfordCars"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
