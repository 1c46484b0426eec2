import math

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from codedsmooth.core import SplineCode, chebyshev_points, data_points


@pytest.mark.parametrize("k", [8, 32, 64])
@pytest.mark.parametrize("ratio", [1.0, 1.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_matches_scipy_natural_spline(k, ratio, dtype, tol):
    n = int(ratio * k)
    code = SplineCode(k, n, dtype=dtype)
    gen = torch.Generator().manual_seed(k * 7 + n)
    x = torch.rand(k, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    alpha, beta = code.alpha.double().numpy(), code.beta.double().numpy()
    enc_ref = CubicSpline(alpha, x.numpy(), bc_type="natural", axis=0)(beta)
    dec_ref = CubicSpline(beta, y.numpy(), bc_type="natural", axis=0)(alpha)
    enc = code.encode(x.to(dtype)).double().numpy()
    dec = code.decode(y.to(dtype)).double().numpy()
    assert enc.shape == (n, 3, 4) and dec.shape == (k, 5)
    assert np.abs(enc - enc_ref).max() <= tol
    assert np.abs(dec - dec_ref).max() <= tol


def test_points_in_range_and_sorted():
    for m in (2, 5, 17, 96):
        for pts in (data_points(m), chebyshev_points(m, "chebyshev-lobatto")):
            assert pts.min() == -1.0 and pts.max() == 1.0
            assert bool(torch.all(pts[1:] > pts[:-1]))
    beta = chebyshev_points(9, "chebyshev-lobatto").numpy()
    np.testing.assert_allclose(beta, np.sort(np.cos(np.arange(9) * np.pi / 8)), atol=1e-15)


@pytest.mark.parametrize("k,n", [(4, 4), (8, 12), (33, 50)])
def test_rows_sum_to_one(k, n):
    code = SplineCode(k, n, dtype=torch.float64)
    torch.testing.assert_close(code.E.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(code.D.sum(1), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-12)


def test_constant_batch_decodes_exactly():
    code = SplineCode(16, 16, dtype=torch.float64)
    x = torch.randn(1, 2, 3, dtype=torch.float64).expand(16, 2, 3)
    torch.testing.assert_close(code.decode(code.encode(x)), x, rtol=0, atol=1e-12)


def test_affine_batch_through_affine_block_decodes_exactly():
    k, n = 12, 18
    code = SplineCode(k, n, dtype=torch.float64)
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    x = a + code.alpha[:, None] * b
    block = torch.nn.Linear(7, 3).double()
    with torch.no_grad():
        decoded = code.decode(block(code.encode(x)))
        torch.testing.assert_close(decoded, block(x), rtol=0, atol=1e-12)


def test_group_dims_equal_per_group():
    code = SplineCode(6, 9, dtype=torch.float64)
    z = torch.randn(4, 6, 2, 3, dtype=torch.float64)
    grouped = code.encode(z, group_dims=1)
    for g in range(4):
        torch.testing.assert_close(grouped[g], code.encode(z[g]))
    with pytest.raises(ValueError, match="expected 6 items"):
        code.encode(torch.zeros(5, 3))


def test_decode_error_falls_like_inverse_cube():
    """Smooth data through a smooth block: decode error slope in log-log is about -3 or steeper."""
    k = 16
    ns = [32, 48, 64, 96, 128]
    errs = []
    for n in ns:
        code = SplineCode(k, n, dtype=torch.float64)
        x = torch.stack([torch.sin(2 * code.alpha), torch.cos(code.alpha)], 1)
        f = lambda z: torch.tanh(1.5 * z) + 0.3 * z**2  # noqa: E731
        errs.append(float((code.decode(f(code.encode(x))) - f(x)).abs().max()))
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope < -2.5, (slope, errs)
    assert errs[-1] < errs[0] / 20


def test_matrices_are_cached():
    a = SplineCode(10, 15)
    b = SplineCode(10, 15)
    assert a.E is b.E and a.D is b.D


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    cpu = SplineCode(32, 48, dtype=torch.float32)
    gpu = SplineCode(32, 48, device="cuda", dtype=torch.float32)
    x = torch.randn(32, 10)
    torch.testing.assert_close(gpu.encode(x.cuda()).cpu(), cpu.encode(x), rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(gpu.decode(gpu.encode(x.cuda())).sum()))
