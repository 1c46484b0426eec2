"""The environment a run computed in: what a rerun must match to get the same bits (torch build and threads)."""

from __future__ import annotations

import os
import platform
import sys

import torch


def environment() -> dict:
    """torch build and threads, CPUs, platform, Python."""
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
