"""Callbacks shipped with lightning-transfer."""

from lightning_transfer.callbacks.efficiency import EfficiencyMonitor, SavedTensorsCounter, saved_bytes
from lightning_transfer.callbacks.predictions import PredictionWriter
from lightning_transfer.callbacks.progress import ThrottledProgressBar

__all__ = ["EfficiencyMonitor", "PredictionWriter", "SavedTensorsCounter", "ThrottledProgressBar", "saved_bytes"]
