"""Test-time adaptation methods for the ``model.test_time`` slot."""

from lightning_transfer.test_time.base import TestTimeAdaptation

__all__ = ["TestTimeAdaptation"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
