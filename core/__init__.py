"""The math of coded-smoothing: spline codes, the coded loss, N schedule, the coding spec, RCI and the differentiable attack primitives (``core.attacks``). Pure torch, no I/O."""

from .randomness import RandomSource, SeededRandomSource, SystemRandomSource
from .rci import CodingPlan, apply_plan, hoist_affine_prefix, identity_permutations, plan_groups, sparse_width
from .smoothing import MIN_CODED_BATCH, CodedSmoothing, NSchedule
from .spec import (
    CODED_POINT_KINDS,
    DATA_POINT_KINDS,
    SCOPES,
    CodedPointKind,
    CodingSpec,
    DataPointKind,
    Scope,
    TrainedCoding,
    coded_points_for,
    default_n_end,
)
from .spline import SplineCode, chebyshev_points, data_points, natural_spline_matrix, unit_rows

__all__ = [
    "hoist_affine_prefix",
    "SplineCode",
    "chebyshev_points",
    "data_points",
    "natural_spline_matrix",
    "unit_rows",
    "DATA_POINT_KINDS",
    "CODED_POINT_KINDS",
    "CodedSmoothing",
    "NSchedule",
    "coded_points_for",
    "MIN_CODED_BATCH",
    "CodingSpec",
    "TrainedCoding",
    "SCOPES",
    "Scope",
    "DataPointKind",
    "CodedPointKind",
    "default_n_end",
    "RandomSource",
    "SystemRandomSource",
    "SeededRandomSource",
    "CodingPlan",
    "plan_groups",
    "apply_plan",
    "sparse_width",
    "identity_permutations",
]
