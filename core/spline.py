"""Natural cubic spline codes: the encoder E (n×k) and decoder D (k×n) as matrices.

A natural cubic spline through values ``y`` at fixed nodes is linear in ``y``, so
evaluating it at fixed query points is a matrix product. The encoder fits the
spline through the K batch items at the data points ``alpha`` and samples it at
the N coded points ``beta``; the decoder fits a spline through the block's N
outputs at ``beta`` and samples it at ``alpha``.

Points: ``alpha`` are K equispaced points on [-1, 1]; ``beta`` are the N
Chebyshev–Lobatto points cos(j·pi/(N-1)) in ascending order. Both include the
end points, so neither map extrapolates, and beta clusters near the ends where
a natural spline's forced zero curvature costs the most accuracy. With N = K
the two point sets differ, so encode→decode is not the identity.
"""

from __future__ import annotations

import functools
import math

import torch


def data_points(k: int) -> torch.Tensor:
    """K equispaced data points on [-1, 1] (float64)."""
    if k == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(-1.0, 1.0, k, dtype=torch.float64)


def chebyshev_points(n: int) -> torch.Tensor:
    """N Chebyshev–Lobatto points on [-1, 1], ascending (float64)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    j = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    pts = torch.cos(j * math.pi / (n - 1))
    # cos() leaves tiny asymmetries; make the set exactly symmetric.
    return 0.5 * (pts - pts.flip(0))


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
def _matrices(k: int, n: int, device: str, dtype: torch.dtype):
    alpha, beta = data_points(k), chebyshev_points(n)
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


class SplineCode:
    """Encoder/decoder pair of the natural cubic spline code for K data and N coded points.

    ``encode`` maps (…groups, K, *shape) → (…groups, N, *shape); ``decode`` maps
    (…groups, N, *shape) → (…groups, K, *shape). ``groups`` leading dims are
    optional (set ``group_dims``); the matrices are computed once per
    (k, n, device, dtype).
    """

    def __init__(self, k: int, n: int, device=None, dtype=None):
        if k < 1 or n < 1:
            raise ValueError(f"k and n must be positive, got k={k}, n={n}")
        if k >= 2 and n < 2:
            raise ValueError(f"n must be at least 2 when k >= 2, got n={n}")
        self.k, self.n = int(k), int(n)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.alpha, self.beta, self.E, self.D = _matrices(self.k, self.n, str(self.device), self.dtype)

    def encode(self, x: torch.Tensor, group_dims: int = 0) -> torch.Tensor:
        return _apply(self.E.to(x.device), x, group_dims)

    def decode(self, y: torch.Tensor, group_dims: int = 0) -> torch.Tensor:
        return _apply(self.D.to(y.device), y, group_dims)

    def __repr__(self) -> str:
        return f"SplineCode(k={self.k}, n={self.n}, device={self.device}, dtype={self.dtype})"
