"""Training: the loop, its guards and autopsy, callbacks, checkpoints."""

from stylepipe.train.callbacks import Callback, CSVMetricsWriter, ProgressBar, TrainState
from stylepipe.train.guards import CAUSES, Autopsy, TrainingHalted, classify_cause
from stylepipe.train.trainer import Trainer, TrainResult, resolve_device

__all__ = [
    "CAUSES",
    "Autopsy",
    "CSVMetricsWriter",
    "Callback",
    "ProgressBar",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingHalted",
    "classify_cause",
    "resolve_device",
]
