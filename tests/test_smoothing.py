import math

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from codedsmooth.core import CodedSmoothing, NSchedule, SplineCode, coded_points_for


def test_schedule_ramps_from_k_to_one_and_a_half_k():
    sched = NSchedule.default(32, epochs=10)
    values = [sched(e) for e in range(10)]
    assert values[0] == 32 and values[-1] == 48
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert NSchedule.default(7, epochs=1)(0) == math.ceil(1.5 * 7) + 1  # 11 would share the point 0 with K = 7
    assert NSchedule.default(8, epochs=1)(0) == math.ceil(1.5 * 8)


def _reference_coded_loss(block, z, n):
    """The coded loss computed with scipy's natural splines."""
    k = z.shape[0]
    code = SplineCode(k, n, dtype=torch.float64)
    alpha, beta = code.alpha.numpy(), code.beta.numpy()
    zn = z.detach().double().numpy()
    coded = CubicSpline(alpha, zn, bc_type="natural", axis=0)(beta)
    with torch.no_grad():
        out_coded = block(torch.from_numpy(coded)).numpy()
        out_true = block(z.double()).numpy()
    decoded = CubicSpline(beta, out_coded, bc_type="natural", axis=0)(alpha)
    return float(((decoded - out_true) ** 2).sum(1).mean())


def test_coded_loss_matches_scipy_reference():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    z = torch.randn(12, 5, dtype=torch.float64)
    wrapped = CodedSmoothing(block, k=12, n=18, mu=0.5).train()
    out, loss = wrapped(z)
    torch.testing.assert_close(out, block(z))
    assert abs(loss.item() - 0.5 * _reference_coded_loss(block, z, 18)) < 1e-9


def test_eval_mode_returns_plain_output_and_gradients_reach_block():
    block = torch.nn.Linear(4, 2)
    wrapped = CodedSmoothing(block, k=8, n=12)
    z = torch.randn(8, 4)
    torch.testing.assert_close(wrapped.eval()(z), block(z))
    wrapped.train()
    _, loss = wrapped(torch.randn(8, 4) ** 3)
    loss.backward()
    assert block.weight.grad is not None and float(block.weight.grad.abs().sum()) > 0


def test_short_batches_keep_ratio_and_tiny_batches_skip():
    block = torch.nn.Linear(4, 2)
    wrapped = CodedSmoothing(block, k=32, n=48).train()
    out, loss = wrapped(torch.randn(10, 4))
    assert out.shape == (10, 2) and wrapped.last_skip_reason is None
    assert coded_points_for(10, 32, 48) == 15
    out, loss = wrapped(torch.randn(3, 4))
    assert float(loss) == 0.0 and "3 < 4" in wrapped.last_skip_reason
    out, loss = wrapped(torch.randn(1, 4))
    assert out.shape == (1, 2) and float(loss) == 0.0
    assert np.isfinite(float(loss))
