"""Natural cubic spline codes: the encoder E (n×k) and decoder D (k×n) as matrices.

A natural cubic spline through values ``y`` at fixed nodes is linear in ``y``, so
evaluating it at fixed query points is a matrix product. The encoder fits the
spline through the K batch items at the data points ``alpha`` and samples it at
the N coded points ``beta``; the decoder fits a spline through the block's N
outputs at ``beta`` and samples it at ``alpha``.

Point kinds (named in a checkpoint's coding spec, so a model is served with the
points it was trained with; the names, the default and the rules below are
written in ``core.points``):
- data points ``equispaced``: K equispaced points on [-1, 1], ends included;
- coded points ``chebyshev-gauss`` (default): the N Chebyshev points of the first
  kind cos((2j+1)π/2N), strictly inside (-1, 1), clustered near the ends;
- coded points ``chebyshev-lobatto`` (legacy): cos(jπ/(N-1)), ends included.

Why Gauss points: wherever a data point coincides with a coded point, the
encoder row of that coded point and the decoder row of that data point are
unit vectors, so an item permuted into that slot is answered by exactly the
uncoded model, a deterministic path a client can find by repetition. Lobatto
points share ±1 with the data points (slots 0 and K-1). Equispaced points are
rational, and by Niven's theorem the only rational values of cos(rπ) are 0,
±1/2 and ±1; cos((2j+1)π/2N) is never ±1 or ±1/2, and is 0 only for odd N.
So Gauss points meet the data points only when K and N are both odd (both sets
then hold 0), a pair ``SplineCode`` refuses (``core.points.check_code``). The decoder then extrapolates a
little (to ±1 from ±cos(π/2N)), which the natural end pieces handle.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch

from .points import CODED_POINT_KINDS, DATA_POINT_KINDS, DEFAULT_CODED_POINTS, DEFAULT_DATA_POINTS, check_code


def data_points(k: int, kind: str = DEFAULT_DATA_POINTS) -> torch.Tensor:
    """K equispaced data points on [-1, 1] (float64)."""
    if kind not in DATA_POINT_KINDS:
        raise ValueError(f"unknown data point kind {kind!r}; known: {list(DATA_POINT_KINDS)}")
    if k == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(-1.0, 1.0, k, dtype=torch.float64)


def chebyshev_points(n: int, kind: str) -> torch.Tensor:
    """N Chebyshev points, ascending (float64): Lobatto (ends included) or Gauss (first kind, interior)."""
    if kind not in CODED_POINT_KINDS:
        raise ValueError(f"unknown coded point kind {kind!r}; known: {list(CODED_POINT_KINDS)}")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    j = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    if kind == "chebyshev-lobatto":
        pts = torch.cos(j * math.pi / (n - 1))
    else:
        pts = torch.cos((2 * j + 1) * math.pi / (2 * n))
    # cos() leaves tiny asymmetries; make the set exactly symmetric.
    return 0.5 * (pts - pts.flip(0))


def unit_rows(matrix: torch.Tensor, atol: float = 1e-12) -> torch.Tensor:
    """Indices of the rows of ``matrix`` that are unit vectors (one entry 1, the rest 0)."""
    m = matrix.to(torch.float64)
    top = m.abs().max(1)
    rest = m.abs().sum(1) - top.values
    return ((m.gather(1, top.indices[:, None])[:, 0] - 1).abs().le(atol) & rest.le(atol)).nonzero().flatten()


def natural_spline_matrix(nodes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Matrix W (q×m) with W @ y = natural cubic spline through (nodes, y) at queries.

    Outside [nodes[0], nodes[-1]] the end pieces are continued as cubics, as
    ``scipy.interpolate.CubicSpline(bc_type="natural")`` does.
    """
    x = nodes.to(torch.float64)
    t = queries.to(torch.float64)
    m = x.numel()
    if m < 2:
        raise ValueError("a spline needs at least 2 nodes")
    if not bool(torch.all(x[1:] > x[:-1])):
        raise ValueError("spline nodes must be strictly increasing")
    h = x[1:] - x[:-1]  # (m-1,)
    eye = torch.eye(m, dtype=torch.float64)

    # Second derivatives M = S @ y; natural ends: M_0 = M_{m-1} = 0.
    s = torch.zeros(m, m, dtype=torch.float64)
    if m > 2:
        inner = m - 2
        a = torch.zeros(inner, inner, dtype=torch.float64)
        idx = torch.arange(inner)
        a[idx, idx] = 2.0 * (h[:-1] + h[1:])
        a[idx[1:], idx[:-1]] = h[1:-1]
        a[idx[:-1], idx[1:]] = h[1:-1]
        # Right-hand side: 6 * (slope_{i} - slope_{i-1}) as a matrix acting on y.
        slopes = (eye[1:] - eye[:-1]) / h[:, None]  # (m-1, m)
        b = 6.0 * (slopes[1:] - slopes[:-1])  # (m-2, m)
        s[1:-1] = torch.linalg.solve(a, b)

    seg = torch.searchsorted(x, t, right=True) - 1
    seg = seg.clamp(0, m - 2)
    x0, x1, hs = x[seg], x[seg + 1], h[seg]
    right = (x1 - t)[:, None]
    left = (t - x0)[:, None]
    hh = hs[:, None]
    m0, m1 = s[seg], s[seg + 1]
    y0, y1 = eye[seg], eye[seg + 1]
    return (
        m0 * right**3 / (6 * hh)
        + m1 * left**3 / (6 * hh)
        + (y0 / hh - m0 * hh / 6) * right
        + (y1 / hh - m1 * hh / 6) * left
    )


@functools.lru_cache(maxsize=128)
def _matrices(
    k: int, n: int, data_kind: str, coded_kind: str, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha, beta = data_points(k, data_kind), chebyshev_points(n, coded_kind)
    enc = natural_spline_matrix(alpha, beta) if k >= 2 else torch.ones(n, 1, dtype=torch.float64)
    dec = natural_spline_matrix(beta, alpha) if n >= 2 else torch.ones(k, 1, dtype=torch.float64)
    dev = torch.device(device)
    return (
        alpha.to(dev, dtype),
        beta.to(dev, dtype),
        enc.to(dev, dtype).contiguous(),
        dec.to(dev, dtype).contiguous(),
    )


def _apply(matrix: torch.Tensor, x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Multiply ``matrix`` into dimension ``batch_dims`` of ``x`` (the coding dimension)."""
    lead = x.shape[:batch_dims]
    rows = x.shape[batch_dims]
    if rows != matrix.shape[1]:
        raise ValueError(f"expected {matrix.shape[1]} items in dimension {batch_dims}, got {rows}")
    flat = x.reshape(*lead, rows, -1)
    out = torch.matmul(matrix.to(x.dtype), flat)
    return out.reshape(*lead, matrix.shape[0], *x.shape[batch_dims + 1 :])


class _CodeSpec(Protocol):
    """What :meth:`SplineCode.from_spec` reads of a spec (``core.spec.CodingSpec`` has it; spec imports this module, not the reverse)."""

    @property
    def k(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def data_points(self) -> str: ...
    @property
    def coded_points(self) -> str: ...


class SplineCode:
    """Encoder/decoder pair of the natural cubic spline code for K data and N coded points.

    ``encode`` maps (…groups, K, *shape) → (…groups, N, *shape); ``decode`` maps
    (…groups, N, *shape) → (…groups, K, *shape). ``groups`` leading dims are
    optional (set ``group_dims``); the matrices are computed once per
    (k, n, kinds, device, dtype). The point kinds default to ``core.points``'
    (Gauss coded points, see the module docstring); ``chebyshev-lobatto``
    reproduces codes trained before.
    """

    def __init__(
        self,
        k: int,
        n: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        data_kind: str = DEFAULT_DATA_POINTS,
        coded_kind: str = DEFAULT_CODED_POINTS,
    ) -> None:
        if k < 1 or n < 1:
            raise ValueError(f"k and n must be positive, got k={k}, n={n}")
        if k >= 2 and n < 2:
            raise ValueError(f"n must be at least 2 when k >= 2, got n={n}")
        check_code(k, n, coded_kind)
        self.k, self.n = int(k), int(n)
        self.data_kind, self.coded_kind = data_kind, coded_kind
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.alpha, self.beta, self.E, self.D = _matrices(
            self.k, self.n, data_kind, coded_kind, str(self.device), self.dtype
        )

    @classmethod
    def from_spec(
        cls, spec: _CodeSpec, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SplineCode:
        """The code of a coding spec (anything with ``k``, ``n``, ``data_points`` and ``coded_points``, e.g. ``core.spec.CodingSpec``)."""
        return cls(spec.k, spec.n, device=device, dtype=dtype, data_kind=spec.data_points, coded_kind=spec.coded_points)

    def encode(self, x: torch.Tensor, group_dims: int = 0) -> torch.Tensor:
        return _apply(self.E.to(x.device), x, group_dims)

    def decode(self, y: torch.Tensor, group_dims: int = 0) -> torch.Tensor:
        return _apply(self.D.to(y.device), y, group_dims)

    def __repr__(self) -> str:
        return f"SplineCode(k={self.k}, n={self.n}, {self.data_kind}/{self.coded_kind}, device={self.device}, dtype={self.dtype})"
