"""The math of coded-smoothing: spline codes, the coded loss, N schedule and RCI. Pure torch, no I/O."""

from .rci import identity_permutations, random_permutations, rci_forward, rci_forward_groups, rci_forward_with_companions
from .smoothing import MIN_CODED_BATCH, CodedSmoothing, NSchedule, coded_points_for
from .spline import SplineCode, chebyshev_points, data_points, natural_spline_matrix

__all__ = [
    "SplineCode",
    "chebyshev_points",
    "data_points",
    "natural_spline_matrix",
    "CodedSmoothing",
    "NSchedule",
    "coded_points_for",
    "MIN_CODED_BATCH",
    "rci_forward",
    "rci_forward_groups",
    "random_permutations",
    "identity_permutations",
    "rci_forward_with_companions",
]
