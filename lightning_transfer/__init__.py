"""lightning-transfer: adapt pretrained models to new tasks with one command."""

__version__ = "0.1.0"

from lightning_transfer import backbones, callbacks, datamodules, strategies, test_time  # noqa: E402,F401
from lightning_transfer.module import TransferModule  # noqa: E402

__all__ = ["TransferModule", "__version__"]
