"""Callbacks shipped with lightning-transfer."""

from lightning_transfer.callbacks.efficiency import EfficiencyMonitor, SavedTensorsCounter, saved_bytes
from lightning_transfer.callbacks.housekeeping import AtomicCheckpoints, FreeGradientsEarly
from lightning_transfer.callbacks.predictions import PredictionWriter
from lightning_transfer.callbacks.progress import ThrottledProgressBar
from lightning_transfer.callbacks.report import FitReport

__all__ = ["AtomicCheckpoints", "EfficiencyMonitor", "FitReport", "FreeGradientsEarly", "PredictionWriter",
           "SavedTensorsCounter", "ThrottledProgressBar", "saved_bytes"]
