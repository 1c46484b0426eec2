"""Architectures, checkpoint I/O and the device choice: what serving needs of a model, and no more."""

from .architectures import ARCHITECTURES, PreActResNet18, SmallCNN, StagedModel, build_model, default_arch_for
from .card import CARD_FILE, CardError, RobustnessCard, read_card
from .checkpoint import Checkpoint, CheckpointError, default_checkpoint_path, load_checkpoint, save_checkpoint
from .config import METHODS, Method
from .device import resolve_device

__all__ = [
    "ARCHITECTURES",
    "SmallCNN",
    "PreActResNet18",
    "StagedModel",
    "build_model",
    "default_arch_for",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "default_checkpoint_path",
    "METHODS",
    "Method",
    "resolve_device",
    "CARD_FILE",
    "CardError",
    "RobustnessCard",
    "read_card",
]
