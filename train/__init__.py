"""Data sets and the offline trainer (erm, mixup, coded-smoothing, pgd-at). Serving never imports this package."""

from .data import DATASETS, DataSplit, as_float, load_dataset
from .trainer import TrainConfig, TrainResult, evaluate, train

__all__ = ["DATASETS", "DataSplit", "as_float", "load_dataset", "TrainConfig", "TrainResult", "evaluate", "train"]
