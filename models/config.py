"""The typed ``config.json`` of a checkpoint, validated in one place.

Everything the server, the attack client and the trainer read from a
checkpoint's config goes through ``CheckpointConfig``: strict types (a class
name is a string, K is an integer), bounds that keep a hostile or mistaken file
from allocating gigabytes, and cross-checks (channels, classes and image size
agree between ``input_shape``, ``classes`` and ``arch_kwargs``) before any
model is built.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from codedsmooth.core import CODED_POINT_KINDS, DATA_POINT_KINDS, CodedPointKind, DataPointKind, TrainedCoding
from codedsmooth.core.spec import DEFAULT_DATA_POINTS, LEGACY_CODED_POINTS

from .architectures import ARCHITECTURES

FORMAT_VERSION = 1
# The training methods: the trainer, the CLI's choices and the report's tables all take them from here.
# coded-at is coded-smoothing inside PGD adversarial training; trades is Zhang et al. (2019).
Method = Literal["erm", "mixup", "coded", "pgd-at", "coded-at", "trades", "fast-at", "coded-fast-at"]
METHODS: tuple[Method, ...] = get_args(Method)
CODED_METHODS: tuple[Method, ...] = ("coded", "coded-at", "coded-fast-at")  # with the coded loss (mu, the N schedule)
ADVERSARIAL_METHODS: tuple[Method, ...] = (
    "pgd-at",
    "coded-at",
    "trades",
    "fast-at",
    "coded-fast-at",
)  # on examples made against the current weights (the at_* settings)
MAX_CHANNELS = 64
MAX_SIDE = 1024
MAX_WIDTH = 512
MAX_K = 1024
MAX_N = 4096
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class TrainingInfo(_Strict):
    """How the model was trained; the method is checked, the hyper-parameters are kept as written."""

    method: Method


class CodingConfig(_Strict):
    k: StrictInt = Field(ge=2, le=MAX_K)
    n: StrictInt = Field(ge=2, le=MAX_N)
    target_block: StrictStr = Field(min_length=1)
    data_points: StrictStr = DEFAULT_DATA_POINTS
    # checkpoints written before the point kinds existed used Lobatto points
    coded_points: StrictStr = LEGACY_CODED_POINTS

    @model_validator(mode="after")
    def _consistent(self) -> CodingConfig:
        if self.n < self.k:
            raise ValueError(f"n={self.n} must be >= k={self.k}")
        if self.data_points not in DATA_POINT_KINDS:
            raise ValueError(f"data_points {self.data_points!r} not in {list(DATA_POINT_KINDS)}")
        if self.coded_points not in CODED_POINT_KINDS:
            raise ValueError(f"coded_points {self.coded_points!r} not in {list(CODED_POINT_KINDS)}")
        return self

    def trained(self) -> TrainedCoding:
        # the kinds were checked against the vocabulary by _consistent
        return TrainedCoding(
            self.k,
            self.n,
            self.target_block,
            cast(DataPointKind, self.data_points),
            cast(CodedPointKind, self.coded_points),
        )


class Normalization(_Strict):
    mean: list[StrictFloat | StrictInt]
    std: list[StrictFloat | StrictInt]
    input_range: list[StrictFloat | StrictInt] = [0.0, 1.0]


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: Literal[1]
    name: StrictStr = Field(pattern=NAME_PATTERN)
    arch: StrictStr
    arch_kwargs: dict[str, Any]
    input_shape: list[StrictInt] = Field(min_length=3, max_length=3)
    classes: list[StrictStr] = Field(min_length=2, max_length=100_000)
    normalization: Normalization
    training: TrainingInfo
    coding: CodingConfig
    dataset: StrictStr
    test_accuracy: StrictFloat | StrictInt | None = None
    history: list[dict[str, Any]] = []
    # pixel value per channel, in [0, 1], that transparent areas of an uploaded image are composited
    # onto (black for MNIST-style data); None in checkpoints written before it existed
    background: list[StrictFloat | StrictInt] | None = None

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, shape: list[int]) -> list[int]:
        c, h, w = shape
        if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
            raise ValueError(
                f"must be [C, H, W] with 1 <= C <= {MAX_CHANNELS} and 1 <= H, W <= {MAX_SIDE}, got {shape}"
            )
        return shape

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[str]) -> list[str]:
        if any(not c for c in classes) or len(set(classes)) != len(classes):
            raise ValueError("class names must be non-empty and distinct")
        return classes

    @field_validator("test_accuracy")
    @classmethod
    def _accuracy(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"must be in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _architecture(self) -> CheckpointConfig:
        """arch_kwargs must build the architecture named, for this input shape and these classes, at a sane size."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {sorted(ARCHITECTURES)}")
        kw = self.arch_kwargs
        params = inspect.signature(ARCHITECTURES[self.arch]).parameters
        unknown = sorted(set(kw) - set(params))
        if unknown:
            raise ValueError(f"arch_kwargs: {self.arch} takes no {unknown}")
        c, h, w = self.input_shape
        expect = {"in_channels": c, "num_classes": len(self.classes)}
        if "image_size" in params:
            if h != w:
                raise ValueError(f"{self.arch} needs square inputs, input_shape is {self.input_shape}")
            expect["image_size"] = h
        for key, value in expect.items():
            given = kw.get(key, params[key].default)
            if type(given) is not int or given != value:
                raise ValueError(f"arch_kwargs.{key} is {given!r} but input_shape/classes need {value}")
        width = kw.get("width", params["width"].default if "width" in params else 1)
        if type(width) is not int or not 1 <= width <= MAX_WIDTH:
            raise ValueError(f"arch_kwargs.width must be an integer in [1, {MAX_WIDTH}], got {width!r}")
        for key in ("mean", "std"):
            values = kw.get(key, params[key].default if key in params else None)
            if values is None:
                continue
            if not (
                isinstance(values, (list, tuple))
                and len(values) == c
                and all(type(v) in (int, float) and math.isfinite(v) for v in values)
            ):
                raise ValueError(f"arch_kwargs.{key} must list {c} finite numbers, got {values!r}")
            if key == "std" and min(values) <= 0:
                raise ValueError(f"arch_kwargs.std must be positive, got {values}")
        return self

    @model_validator(mode="after")
    def _background(self) -> CheckpointConfig:
        if self.background is not None:
            c = self.input_shape[0]
            if len(self.background) != c or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in self.background):
                raise ValueError(
                    f"background must list {c} pixel values in [0, 1] (one per channel), got {self.background}"
                )
        return self

    @property
    def method(self) -> str:
        return self.training.method
