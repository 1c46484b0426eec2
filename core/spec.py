"""The coding spec: what RCI computes (on/off, scope, K, N, point kinds, sparse decode), in one typed value.

This is the one place the coding vocabulary and rules are read from; ``CodedSmoothing``,
the trainer and the server ask this module:
- the scopes (written here);
- the point kinds and the parity rule, written in the leaf module ``core.points`` (which
  ``core.spline`` imports too, so the spec can build its ``SplineCode`` without an import
  circle) and re-exported here: data points ``equispaced``; coded points ``chebyshev-gauss``
  (the default) or ``chebyshev-lobatto`` (legacy); odd K with odd N is refused with Gauss
  points, and every N this module chooses is made even there (``fix_parity``);
- N for a group of another size keeps the ratio N/K (``coded_points_for``).

A spec is resolved once, from what the checkpoint was trained with plus what
the operator asked for:
- K defaults to the trained K;
- N defaults to the N the training schedule ended at (scaled by K/K_trained
  when K is overridden), so a model is served with the code it was fitted to;
- the point kinds always come from the checkpoint (a model is served with the
  points it was trained with);
- the sparse-decode tolerance applies to ``request`` scope only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast, get_args

import torch

# re-exported (``X as X``): the point vocabulary is part of the spec
from .points import (
    CODED_POINT_KINDS as CODED_POINT_KINDS,
    DATA_POINT_KINDS as DATA_POINT_KINDS,
    DEFAULT_CODED_POINTS as DEFAULT_CODED_POINTS,
    DEFAULT_DATA_POINTS as DEFAULT_DATA_POINTS,
    LEGACY_CODED_POINTS as LEGACY_CODED_POINTS,
    CodedPointKind as CodedPointKind,
    DataPointKind as DataPointKind,
    check_code as check_code,
    check_point_kinds as check_point_kinds,
    fix_parity as fix_parity,
    shares_a_point as shares_a_point,
)
from .spline import SplineCode

Scope = Literal["request", "batch"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
DEFAULT_SCOPE: Scope = "request"
# N at the end of training (and so at serving) as a multiple of K: 1.5 K decodes
# almost exactly while still coding every item with its neighbours.
DEFAULT_N_RATIO = 1.5
# Decoder weights below this are skipped in request scope; chosen from benchmarks/sparse_decode.py
# (docs/rci.md, Sparse decode): on the default checkpoint's 1,000 test images at K = 32, N = 48, 1e-2 runs the
# block on 7 of 48 coded samples with 100 % label agreement with the full decode (max |logit
# difference| 0.05); 1e-1 (4 of 48) is the first to change a label (1 in 1,000).
DEFAULT_DECODE_TOLERANCE = 1e-2


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")


def coded_points_for(batch: int, k: int, n: int, coded_kind: str = DEFAULT_CODED_POINTS) -> int:
    """N for a group of ``batch`` items when the code says N for K (keeps N/K, at least ``batch``).

    With Gauss coded points an odd group never gets an odd N (both sets would hold 0).
    """
    m = n if batch == k else max(batch, int(round(n * batch / k)))
    return fix_parity(batch, m, coded_kind)


def default_n_end(k: int) -> int:
    """The N a training schedule ends at for K items: ceil(1.5 K), made even where K is odd.

    Gauss coded points and equispaced data points share the point 0 when K and
    N are both odd, which would code that slot exactly (see ``core.spline``).
    """
    return fix_parity(k, math.ceil(DEFAULT_N_RATIO * k))


@dataclass(frozen=True)
class TrainedCoding:
    """The coding a checkpoint was trained with (its ``coding`` entry)."""

    k: int
    n: int
    target_block: str
    data_points: DataPointKind = DEFAULT_DATA_POINTS
    coded_points: CodedPointKind = DEFAULT_CODED_POINTS


@dataclass(frozen=True)
class CodingSpec:
    """What RCI computes for a served model; ``decode_tolerance`` 0 means the full decode."""

    enabled: bool
    scope: Scope
    k: int
    n: int
    data_points: DataPointKind = DEFAULT_DATA_POINTS
    coded_points: CodedPointKind = DEFAULT_CODED_POINTS
    decode_tolerance: float = 0.0

    def __post_init__(self) -> None:
        check_scope(self.scope)
        if self.k < 2:
            raise ValueError(f"group size K must be at least 2, got {self.k}")
        if self.n < self.k:
            raise ValueError(f"coded points N={self.n} must be >= the group size K={self.k}")
        if not 0.0 <= self.decode_tolerance < 1.0:
            raise ValueError(f"decode tolerance must be in [0, 1), got {self.decode_tolerance}")
        check_point_kinds(self.data_points, self.coded_points)
        check_code(self.k, self.n, self.coded_points)

    @staticmethod
    def resolve(
        trained: TrainedCoding,
        enabled: bool = True,
        scope: str | None = None,
        k: int | None = None,
        n: int | None = None,
        decode_tolerance: float | None = None,
    ) -> CodingSpec:
        """The spec in force for a checkpoint trained with ``trained`` and the given overrides (None: default)."""
        k = int(k or trained.k)
        if n is None:
            n = coded_points_for(k, trained.k, trained.n, trained.coded_points)
        scope = scope or DEFAULT_SCOPE
        tol = DEFAULT_DECODE_TOLERANCE if decode_tolerance is None else float(decode_tolerance)
        return CodingSpec(
            enabled=bool(enabled),
            scope=cast(Scope, scope),
            k=k,
            n=int(n),
            data_points=trained.data_points,
            coded_points=trained.coded_points,
            decode_tolerance=tol if scope == "request" else 0.0,
        )

    @staticmethod
    def plain() -> CodingSpec:
        """RCI off: the model's own function."""
        return CodingSpec(enabled=False, scope=DEFAULT_SCOPE, k=2, n=2)

    def with_scope(self, scope: str) -> CodingSpec:
        return replace(
            self, scope=cast(Scope, scope), decode_tolerance=self.decode_tolerance if scope == "request" else 0.0
        )

    @property
    def sparse(self) -> bool:
        return self.enabled and self.scope == "request" and self.decode_tolerance > 0

    def code(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SplineCode:
        return SplineCode.from_spec(self, device=device, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        if not self.enabled:
            return "no rci"
        sparse = f", sparse {self.decode_tolerance:g}" if self.sparse else ""
        return f"rci {self.scope} K={self.k} N={self.n}{sparse}"
