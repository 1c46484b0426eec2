"""Architectures and their registry.

Every model is a chain of named stages; ``split(target)`` cuts the chain into a
trunk (stages before ``target``) and the target block (``target`` to the end,
logits included), the part that coded-smoothing wraps and RCI codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, so models take raw pixels in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StagedModel(nn.Module):
    """A model made of named stages run in order."""

    default_target: str = ""

    def __init__(self, stages: dict[str, nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def split(self, target: str | None = None) -> tuple[nn.Sequential, nn.Sequential]:
        target = target or self.default_target
        names = self.stage_names
        if target not in names or target == names[0]:
            raise ValueError(
                f"unknown target block {target!r}; choose one of {names[1:]} (default {self.default_target!r})"
            )
        cut = names.index(target)
        trunk = nn.Sequential(*[self.stages[n] for n in names[:cut]])
        block = nn.Sequential(*[self.stages[n] for n in names[cut:]])
        return trunk, block


class SmallCNN(StagedModel):
    """Two conv layers and a two-layer head; for small grey or colour images (e.g. 8×8 digits)."""

    default_target = "head"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        width: int = 32,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ) -> None:
        pooled = image_size // 2
        super().__init__(
            {
                "normalize": Normalize(mean, std),
                "conv1": nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()),
                "conv2": nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                "head": nn.Sequential(
                    nn.Flatten(),
                    nn.Linear(2 * width * pooled * pooled, 4 * width),
                    nn.ReLU(),
                    nn.Linear(4 * width, num_classes),
                ),
            }
        )


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return cast(torch.Tensor, out + shortcut)  # a Module call is typed Any


class PreActResNet18(StagedModel):
    """PreActResNet-18 for 32×32 RGB input; ``width`` scales every layer (64 = the standard net)."""

    default_target = "layer4"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages: dict[str, nn.Module] = {
            "normalize": Normalize(mean, std),
            "stem": nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
        }
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths, [1, 2, 2, 2]), start=1):
            stages[f"layer{i}"] = nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1))
            in_planes = planes
        stages["head"] = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_planes, num_classes),
        )
        super().__init__(stages)


ARCHITECTURES: dict[str, Callable[..., StagedModel]] = {
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
}


def build_model(name: str, **kwargs: Any) -> StagedModel:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)


def default_arch_for(input_shape: tuple[int, ...]) -> str:
    """small_cnn for small images, preact_resnet18 from 32×32 up."""
    return "preact_resnet18" if min(input_shape[1:]) >= 32 else "small_cnn"
