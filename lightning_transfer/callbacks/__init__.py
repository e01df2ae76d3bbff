"""Callbacks shipped with lightning-transfer."""

from lightning_transfer.callbacks.efficiency import EfficiencyMonitor, SavedTensorsCounter, saved_bytes

__all__ = ["EfficiencyMonitor", "SavedTensorsCounter", "saved_bytes"]
