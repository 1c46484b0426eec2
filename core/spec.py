"""The coding spec: what RCI computes (on/off, scope, K, N, point kinds, sparse decode), in one typed value.

This is the only place the defaults are written. A spec is resolved once,
from what the checkpoint was trained with plus what the operator asked for:
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
from typing import Literal

Scope = Literal["request", "batch"]
SCOPES: tuple[str, ...] = ("request", "batch")
DEFAULT_SCOPE: Scope = "request"
DEFAULT_DATA_POINTS = "equispaced"
DEFAULT_CODED_POINTS = "chebyshev-gauss"
LEGACY_CODED_POINTS = "chebyshev-lobatto"
# N at the end of training (and so at serving) as a multiple of K: 1.5 K decodes
# almost exactly while still coding every item with its neighbours.
DEFAULT_N_RATIO = 1.5
# Decoder weights below this are skipped in request scope; chosen from benchmarks/sparse_decode.py
# (README, Results): on the default checkpoint's 1,000 test images at K = 32, N = 48, 1e-2 runs the
# block on 7 of 48 coded samples with 100 % label agreement with the full decode (max |logit
# difference| 0.05); 1e-1 (4 of 48) is the first to change a label (1 in 1,000).
DEFAULT_DECODE_TOLERANCE = 1e-2


def default_n_end(k: int) -> int:
    """The N a training schedule ends at for K items: ceil(1.5 K), made even where K is odd.

    Gauss coded points and equispaced data points share the point 0 when K and
    N are both odd, which would code that slot exactly (see ``core.spline``).
    """
    n = math.ceil(DEFAULT_N_RATIO * k)
    return n + 1 if (k % 2 == 1 and n % 2 == 1) else n


@dataclass(frozen=True)
class TrainedCoding:
    """The coding a checkpoint was trained with (its ``coding`` entry)."""

    k: int
    n: int
    target_block: str
    data_points: str = DEFAULT_DATA_POINTS
    coded_points: str = DEFAULT_CODED_POINTS


@dataclass(frozen=True)
class CodingSpec:
    """What RCI computes for a served model; ``decode_tolerance`` 0 means the full decode."""

    enabled: bool
    scope: Scope
    k: int
    n: int
    data_points: str = DEFAULT_DATA_POINTS
    coded_points: str = DEFAULT_CODED_POINTS
    decode_tolerance: float = 0.0

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {self.scope!r}")
        if self.k < 2:
            raise ValueError(f"group size K must be at least 2, got {self.k}")
        if self.n < self.k:
            raise ValueError(f"coded points N={self.n} must be >= the group size K={self.k}")
        if not 0.0 <= self.decode_tolerance < 1.0:
            raise ValueError(f"decode tolerance must be in [0, 1), got {self.decode_tolerance}")
        from .spline import SplineCode

        SplineCode(self.k, self.n, data_kind=self.data_points, coded_kind=self.coded_points)  # refuses kinds and K/N it cannot code

    @staticmethod
    def resolve(
        trained: TrainedCoding,
        enabled: bool = True,
        scope: str | None = None,
        k: int | None = None,
        n: int | None = None,
        decode_tolerance: float | None = None,
    ) -> "CodingSpec":
        """The spec in force for a checkpoint trained with ``trained`` and the given overrides (None: default)."""
        k = int(k or trained.k)
        if n is None:
            n = trained.n if k == trained.k else max(k, round(trained.n * k / trained.k))
            if trained.coded_points == DEFAULT_CODED_POINTS and k % 2 == 1 and n % 2 == 1:
                n += 1
        scope = scope or DEFAULT_SCOPE
        tol = DEFAULT_DECODE_TOLERANCE if decode_tolerance is None else float(decode_tolerance)
        return CodingSpec(
            enabled=bool(enabled), scope=scope, k=k, n=int(n), data_points=trained.data_points,
            coded_points=trained.coded_points, decode_tolerance=tol if scope == "request" else 0.0,
        )

    @staticmethod
    def plain() -> "CodingSpec":
        """RCI off: the model's own function."""
        return CodingSpec(enabled=False, scope=DEFAULT_SCOPE, k=2, n=2)

    def with_scope(self, scope: str) -> "CodingSpec":
        return replace(self, scope=scope, decode_tolerance=self.decode_tolerance if scope == "request" else 0.0)

    @property
    def sparse(self) -> bool:
        return self.enabled and self.scope == "request" and self.decode_tolerance > 0

    def code(self, device=None, dtype=None):
        from .spline import SplineCode

        return SplineCode(self.k, self.n, device=device, dtype=dtype, data_kind=self.data_points, coded_kind=self.coded_points)

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        if not self.enabled:
            return "no rci"
        sparse = f", sparse {self.decode_tolerance:g}" if self.sparse else ""
        return f"rci {self.scope} K={self.k} N={self.n}{sparse}"
