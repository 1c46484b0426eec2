"""The spline code's point kinds and the one rule they impose on K and N; a leaf module.

Both ``core.spline`` (which builds the points) and ``core.spec`` (which names them in a
coding spec) import this, so neither imports the other back. Why Gauss points and why odd K
with odd N is refused: see ``core.spline``'s docstring.
"""

from __future__ import annotations

from typing import Literal, get_args

DataPointKind = Literal["equispaced"]
CodedPointKind = Literal["chebyshev-gauss", "chebyshev-lobatto"]
DATA_POINT_KINDS: tuple[DataPointKind, ...] = get_args(DataPointKind)
CODED_POINT_KINDS: tuple[CodedPointKind, ...] = get_args(CodedPointKind)
DEFAULT_DATA_POINTS: DataPointKind = "equispaced"
DEFAULT_CODED_POINTS: CodedPointKind = "chebyshev-gauss"
LEGACY_CODED_POINTS: CodedPointKind = "chebyshev-lobatto"


def check_point_kinds(data_kind: str, coded_kind: str) -> None:
    if data_kind not in DATA_POINT_KINDS:
        raise ValueError(f"unknown data point kind {data_kind!r}; known: {list(DATA_POINT_KINDS)}")
    if coded_kind not in CODED_POINT_KINDS:
        raise ValueError(f"unknown coded point kind {coded_kind!r}; known: {list(CODED_POINT_KINDS)}")


def shares_a_point(k: int, n: int, coded_kind: str = DEFAULT_CODED_POINTS) -> bool:
    """Whether a data point coincides with an interior coded point: Gauss points with K and N both odd (both hold 0)."""
    return coded_kind == "chebyshev-gauss" and k % 2 == 1 and n % 2 == 1


def check_code(k: int, n: int, coded_kind: str = DEFAULT_CODED_POINTS) -> None:
    """Refuse a K/N pair the spline code cannot code without an exact (uncoded) slot."""
    if shares_a_point(k, n, coded_kind):
        raise ValueError(
            f"K={k} and N={n} are both odd: equispaced and Gauss points then share 0, which codes that slot exactly; make N even"
        )


def fix_parity(k: int, n: int, coded_kind: str = DEFAULT_CODED_POINTS) -> int:
    """``n``, raised by one where K and N would share a point (see :func:`shares_a_point`)."""
    return n + 1 if shares_a_point(k, n, coded_kind) else n
