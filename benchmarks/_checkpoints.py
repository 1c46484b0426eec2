"""Untrained checkpoints of the real architectures for timing (weights do not change the cost)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from codedsmooth.core import TrainedCoding, default_n_end
from codedsmooth.models import build_model, save_checkpoint

SHAPES = {"preact_resnet18": (3, 32, 32), "small_cnn": (1, 28, 28)}
TARGETS = {"preact_resnet18": "layer4", "small_cnn": "head"}


def make_checkpoint(
    out: Path, arch: str = "preact_resnet18", width: int = 64, k: int = 32, n: int | None = None
) -> Path:
    torch.manual_seed(0)
    c, h, _ = SHAPES[arch]
    kwargs = {"in_channels": c, "num_classes": 10, "width": width, "mean": [0.5] * c, "std": [0.25] * c}
    if arch == "small_cnn":
        kwargs["image_size"] = h
    model = build_model(arch, **kwargs).eval()
    config = {
        "name": f"bench-{arch}",
        "arch": arch,
        "arch_kwargs": kwargs,
        "input_shape": list(SHAPES[arch]),
        "classes": [str(i) for i in range(10)],
        "normalization": {"mean": kwargs["mean"], "std": kwargs["std"]},
        "training": {"method": "erm"},
        "coding": asdict(TrainedCoding(k, n or default_n_end(k), TARGETS[arch])),
        "dataset": "random",
        "test_accuracy": None,
    }
    return save_checkpoint(out, model, config, torch.rand(64, *SHAPES[arch]))
