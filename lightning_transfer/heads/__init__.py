"""Heads: linear and closed-form heads on the features a strategy gives."""

from lightning_transfer.heads.base import Head, fit_closed_form_head
from lightning_transfer.heads.linear import LinearHead

__all__ = ["Head", "LinearHead", "fit_closed_form_head"]

from lightning_transfer._discover import import_submodules  # noqa: E402

# every module in this package registers itself on import: adding one is adding a file
import_submodules(__name__, __path__)
