"""Callbacks shipped with lightning-transfer."""

from lightning_transfer.callbacks.efficiency import EfficiencyMonitor, SavedTensorsCounter, saved_bytes
from lightning_transfer.callbacks.progress import ThrottledProgressBar

__all__ = ["EfficiencyMonitor", "SavedTensorsCounter", "ThrottledProgressBar", "saved_bytes"]
