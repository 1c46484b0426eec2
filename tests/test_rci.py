import numpy as np
import torch
from scipy.interpolate import CubicSpline

from codedsmooth.core import CodingPlan, SeededRandomSource, SplineCode, apply_plan, identity_permutations, plan_groups


def _one_group(block, x, code, perm):
    """RCI on one group of K items coded together in the slots ``perm`` says (the paper's batch semantics)."""
    k = x.shape[0]
    return apply_plan(block, x, x[:0], CodingPlan(torch.arange(k)[None], perm[None], k), code)


def _random_permutations(groups, k, generator):
    return torch.rand(groups, k, generator=generator).argsort(dim=1)


def test_identity_permutation_affine_block_returns_plain_output():
    k = 10
    code = SplineCode(k, 15, dtype=torch.float64)
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = a + code.alpha[:, None] * b
    block = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        out = _one_group(block, x, code, identity_permutations(1, k)[0])
        torch.testing.assert_close(out, block(x), rtol=0, atol=1e-12)


def test_matches_scipy_reference_in_input_order():
    k, n = 8, 12
    code = SplineCode(k, n, dtype=torch.float64)
    x = torch.randn(k, 3, dtype=torch.float64)
    block = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh()).double()
    with torch.no_grad():
        perm = _random_permutations(1, k, torch.Generator().manual_seed(42))[0]
        out = _one_group(block, x, code, perm)
        perm = perm.numpy()
        alpha, beta = code.alpha.numpy(), code.beta.numpy()
        coded = CubicSpline(alpha, x.numpy()[perm], bc_type="natural", axis=0)(beta)
        y = block(torch.from_numpy(coded)).numpy()
        decoded = CubicSpline(beta, y, bc_type="natural", axis=0)(alpha)
    expected = np.empty_like(decoded)
    expected[perm] = decoded  # item perm[j] sat at position j
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_deterministic_given_a_seeded_source():
    code = SplineCode(8, 8)
    block = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    x = torch.randn(8, 3)

    def served(seed):
        return apply_plan(block, x, x[:0], plan_groups([8], "batch", 8, 0, SeededRandomSource(seed)), code)

    with torch.no_grad():
        a, b, c = served(1), served(1), served(2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_groups_in_one_call_equal_group_by_group():
    code = SplineCode(6, 9)
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, z):
            calls.append(z.shape[0])
            return torch.sin(z).sum(-1, keepdim=True)

    z = torch.randn(5, 6, 4)
    perms = _random_permutations(5, 6, torch.Generator().manual_seed(0))
    rows = torch.arange(30).view(5, 6)
    with torch.no_grad():
        together = apply_plan(Counting(), z.flatten(0, 1), z[:0, 0], CodingPlan(rows, perms, 30), code).view(5, 6, 1)
        assert calls == [5 * 9]
        for g in range(5):
            alone = apply_plan(Counting(), z[g], z[:0, 0], CodingPlan(rows[:1], perms[g : g + 1], 6), code)
            torch.testing.assert_close(together[g], alone)


def test_encoder_rows_sum_to_one_so_affine_maps_commute_with_encoding():
    """A spline through constant data is that constant: E·1 = 1 for every point kind and (K, N) served."""
    for k, n in [(4, 4), (4, 6), (16, 24), (31, 48), (32, 48), (33, 50), (64, 96)]:
        for kind in ("chebyshev-gauss", "chebyshev-lobatto"):
            code = SplineCode(k, n, dtype=torch.float64, coded_kind=kind)
            assert torch.allclose(code.E.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12), (k, n, kind)


def test_hoisting_the_affine_prefix_keeps_the_coded_function():
    """Coding after the block's leading Flatten+Linear equals coding before it (both decodes, padded groups)."""
    from torch import nn

    from codedsmooth.core import SeededRandomSource, hoist_affine_prefix, plan_groups

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    block = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 5))).double()
    trunk = trunk.double()
    new_trunk, new_block = hoist_affine_prefix(trunk, block)
    assert isinstance(new_block[0], nn.ReLU) and len(new_block) == 2  # the Flatten and the first Linear moved
    x, filler = torch.rand(9, 1, 6, 6, dtype=torch.float64), torch.rand(5, 1, 6, 6, dtype=torch.float64)
    code = SplineCode(4, 6, dtype=torch.float64)
    for sizes, scope in [([1, 3, 5], "request"), ([9], "batch")]:
        plan = plan_groups(sizes, scope, 4, len(filler), SeededRandomSource(3))
        for tol in (0.0, 1e-2):
            before = apply_plan(block, trunk(x), trunk(filler), plan, code, tol)
            after = apply_plan(new_block, new_trunk(x), new_trunk(filler), plan, code, tol)
            assert torch.allclose(before, after, atol=1e-10), (sizes, scope, tol)
    assert torch.allclose(new_block(new_trunk(x)), block(trunk(x)), atol=1e-12)
    # a block that starts with a non-affine layer is left as it is
    relu_first = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5)).double()
    t2, b2 = hoist_affine_prefix(trunk, relu_first)
    assert isinstance(b2[0][0], nn.ReLU)
