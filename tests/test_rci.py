import numpy as np
import torch
from scipy.interpolate import CubicSpline

from codedsmooth.core import CodingPlan, SplineCode, apply_plan, random_permutations, rci_forward


def test_identity_permutation_affine_block_returns_plain_output():
    k = 10
    code = SplineCode(k, 15, dtype=torch.float64)
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = a + code.alpha[:, None] * b
    block = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        out = rci_forward(block, x, code, permute=False)
        torch.testing.assert_close(out, block(x), rtol=0, atol=1e-12)


def test_matches_scipy_reference_in_input_order():
    k, n = 8, 12
    code = SplineCode(k, n, dtype=torch.float64)
    x = torch.randn(k, 3, dtype=torch.float64)
    block = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh()).double()
    with torch.no_grad():
        out = rci_forward(block, x, code, torch.Generator().manual_seed(42))
        perm = random_permutations(1, k, torch.Generator().manual_seed(42))[0].numpy()
        alpha, beta = code.alpha.numpy(), code.beta.numpy()
        coded = CubicSpline(alpha, x.numpy()[perm], bc_type="natural", axis=0)(beta)
        y = block(torch.from_numpy(coded)).numpy()
        decoded = CubicSpline(beta, y, bc_type="natural", axis=0)(alpha)
    expected = np.empty_like(decoded)
    expected[perm] = decoded  # item perm[j] sat at position j
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)


def test_deterministic_given_generator():
    code = SplineCode(8, 8)
    block = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    x = torch.randn(8, 3)
    with torch.no_grad():
        a = rci_forward(block, x, code, torch.Generator().manual_seed(1))
        b = rci_forward(block, x, code, torch.Generator().manual_seed(1))
        c = rci_forward(block, x, code, torch.Generator().manual_seed(2))
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
    perms = random_permutations(5, 6, torch.Generator().manual_seed(0))
    rows = torch.arange(30).view(5, 6)
    with torch.no_grad():
        together = apply_plan(Counting(), z.flatten(0, 1), z[:0, 0], CodingPlan(rows, perms, 30), code).view(5, 6, 1)
        assert calls == [5 * 9]
        for g in range(5):
            alone = apply_plan(Counting(), z[g], z[:0, 0], CodingPlan(rows[:1], perms[g : g + 1], 6), code)
            torch.testing.assert_close(together[g], alone)
