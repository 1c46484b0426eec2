"""Architectures, data sets, checkpoint I/O and the trainer."""

from .architectures import ARCHITECTURES, PreActResNet18, SmallCNN, StagedModel, build_model
from .checkpoint import Checkpoint, CheckpointError, default_checkpoint_path, load_checkpoint, save_checkpoint
from .data import DATASETS, DataSplit, as_float, load_dataset
from .trainer import TrainConfig, TrainResult, evaluate, resolve_device, train

__all__ = [
    "ARCHITECTURES",
    "SmallCNN",
    "PreActResNet18",
    "StagedModel",
    "build_model",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "default_checkpoint_path",
    "DATASETS",
    "DataSplit",
    "as_float",
    "load_dataset",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "resolve_device",
]
