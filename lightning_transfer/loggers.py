"""Weights & Biases set-up: a fresh machine without an API key logs offline instead of failing."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_api_key_available() -> bool:
    """True when wandb can authenticate: ``WANDB_API_KEY`` or a netrc entry written by ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def default_wandb_mode() -> str | None:
    """Set ``WANDB_MODE=offline`` unless the user chose a mode or has a key; return the mode now in force."""
    if "WANDB_MODE" not in os.environ and not wandb_api_key_available():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE")
