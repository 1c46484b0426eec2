"""The coding planner, the apply function, the point sets and the random sources (pure core, no server)."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from codedsmooth.core import (
    CodingPlan,
    CodingSpec,
    SeededRandomSource,
    SplineCode,
    SystemRandomSource,
    TrainedCoding,
    apply_plan,
    plan_groups,
    sparse_width,
    unit_rows,
)


def _supported():
    """Every K up to 24 with every N in [K, 2K], then larger K at the Ns that get served."""
    pairs = [(k, n) for k in range(2, 25) for n in range(k, 2 * k + 1)]
    pairs += [
        (k, n) for k in (31, 32, 33, 48, 64, 100, 128) for n in (k, k + 1, round(1.25 * k), round(1.5 * k), 2 * k)
    ]
    return [(k, n) for k, n in pairs if not (k % 2 and n % 2)]


def test_no_row_of_e_or_d_is_a_unit_vector_for_any_supported_k_and_n():
    checked = 0
    for k, n in _supported():
        code = SplineCode(k, n, dtype=torch.float64)
        assert len(unit_rows(code.E)) == 0 and len(unit_rows(code.D)) == 0, (k, n)
        # and no data point coincides with a coded point (the cause of unit rows)
        assert float((code.alpha[:, None] - code.beta[None, :]).abs().min()) > 1e-9, (k, n)
        checked += 1
    assert checked == len(_supported()) > 250


def test_unit_rows_detector_finds_the_legacy_lobatto_end_slots():
    code = SplineCode(8, 12, dtype=torch.float64, coded_kind="chebyshev-lobatto")
    assert unit_rows(code.D).tolist() == [0, 7]
    assert unit_rows(code.E).tolist() == [0, 11]


def test_odd_k_with_odd_n_is_refused_and_the_default_n_is_even():
    with pytest.raises(ValueError, match="both odd"):
        SplineCode(7, 11)
    trained = TrainedCoding(k=7, n=12, target_block="head")
    assert CodingSpec.resolve(trained).n == 12
    assert CodingSpec.resolve(trained, k=9).n % 2 == 0  # scaled N bumped off the shared point


def test_the_specs_shared_point_rule_is_the_geometry_of_the_point_sets():
    """core.spec's rule (odd K with odd N) against the point sets computed here with numpy: Gauss
    coded points meet equispaced data points exactly when the rule says so, and every N the spec
    picks for a group (any size, scaled from any trained K/N) avoids them."""
    from codedsmooth.core.spec import coded_points_for, shares_a_point

    for k in range(2, 41):
        alpha = np.linspace(-1.0, 1.0, k)
        for n in range(k, 2 * k + 2):
            beta = np.cos((2 * np.arange(n) + 1) * np.pi / (2 * n))
            meet = bool(np.abs(alpha[:, None] - beta[None, :]).min() < 1e-9)
            assert shares_a_point(k, n, "chebyshev-gauss") == meet, (k, n)
            assert not shares_a_point(k, n, "chebyshev-lobatto")  # legacy kind: allowed (ends shared by design)
    for trained_k, trained_n in [(32, 48), (16, 24), (15, 24), (7, 12)]:
        for batch in range(4, 70):
            n = coded_points_for(batch, trained_k, trained_n)
            assert n >= batch and not shares_a_point(batch, n), (trained_k, trained_n, batch, n)
            spec = CodingSpec.resolve(TrainedCoding(trained_k, trained_n, "head"), k=batch)
            assert spec.n == n


def test_spec_defaults_to_the_trained_code():
    trained = TrainedCoding(k=32, n=40, target_block="head")
    spec = CodingSpec.resolve(trained)
    assert (spec.k, spec.n, spec.scope, spec.coded_points) == (32, 40, "request", "chebyshev-gauss")
    assert CodingSpec.resolve(trained, k=16).n == 20  # N/K kept when K is overridden
    assert CodingSpec.resolve(trained, scope="batch").decode_tolerance == 0.0
    legacy = CodingSpec.resolve(TrainedCoding(16, 24, "head", coded_points="chebyshev-lobatto"))
    assert legacy.coded_points == "chebyshev-lobatto"
    with pytest.raises(ValueError, match="N=8 must be >= the group size K=16"):
        CodingSpec.resolve(trained, k=16, n=8)


def test_gauss_code_matches_scipy_natural_spline():
    code = SplineCode(12, 18, dtype=torch.float64)
    x = np.random.default_rng(0).normal(size=(12, 3))
    ref = CubicSpline(code.alpha.numpy(), x, bc_type="natural")(code.beta.numpy())
    np.testing.assert_allclose(code.encode(torch.from_numpy(x)).numpy(), ref, atol=1e-12)
    y = np.random.default_rng(1).normal(size=(18, 2))
    ref = CubicSpline(code.beta.numpy(), y, bc_type="natural")(code.alpha.numpy())  # extrapolates to ±1
    np.testing.assert_allclose(code.decode(torch.from_numpy(y)).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("scope", ["request", "batch"])
def test_plan_places_every_item_once_and_pads_with_distinct_filler(scope):
    sizes, k, pool = [1, 3, 20, 2], 8, 30
    plan = plan_groups(sizes, scope, k, pool, SeededRandomSource(1))
    total = sum(sizes)
    slots = plan.slots
    counts = Counter(slots[slots < total].tolist())
    assert sorted(counts) == list(range(total)) and set(counts.values()) == {1}
    for g in range(plan.groups):
        fill = plan.rows[g][plan.rows[g] >= total]
        assert len(set(fill.tolist())) == len(fill) and bool((fill < total + pool).all())
        assert sorted(plan.perms[g].tolist()) == list(range(k))
    if scope == "request":  # groups never mix requests
        owner = np.repeat(np.arange(len(sizes)), sizes)
        for g in range(plan.groups):
            members = plan.rows[g][plan.rows[g] < total].numpy()
            assert len(set(owner[members])) == 1
        assert plan.groups == 1 + 1 + 3 + 1
    else:
        assert plan.groups == 4


def test_seeded_plans_repeat_and_system_plans_do_not():
    a = plan_groups([1] * 5, "request", 16, 64, SeededRandomSource(9))
    b = plan_groups([1] * 5, "request", 16, 64, SeededRandomSource(9))
    assert torch.equal(a.slots, b.slots)
    c = plan_groups([1] * 5, "request", 16, 64, SystemRandomSource())
    d = plan_groups([1] * 5, "request", 16, 64, SystemRandomSource())
    assert not torch.equal(c.slots, d.slots)


def test_seeds_differ_beyond_32_bits():
    s = 12345
    assert not torch.equal(SeededRandomSource(s).keys(64), SeededRandomSource(s + 2**32).keys(64))
    assert not torch.equal(SeededRandomSource(s).keys(64), SeededRandomSource(-s).keys(64))


def test_system_source_keys_use_all_64_bits():
    keys = SystemRandomSource().keys(4096)
    assert keys.dtype == torch.int64
    bits = torch.stack([(keys >> b) & 1 for b in range(64)])
    share = bits.float().mean(1)
    assert bool(((share > 0.4) & (share < 0.6)).all())  # every bit varies, none stuck


def test_per_unit_seeding_makes_a_request_independent_of_its_batch_mates():
    alone = plan_groups([1], "request", 8, 20, SeededRandomSource(4, per_unit=True))
    later = plan_groups([5, 1], "request", 8, 20, SeededRandomSource(4, per_unit=True))
    # the one-item request is the second group in `later`; its filler picks and permutation are the same
    assert torch.equal(alone.perms[0], later.perms[1])
    assert torch.equal(alone.rows[0, 1:] - 1, later.rows[1, 1:] - 6)


def _reference(block, items, filler, plan, code):
    """Group by group with scipy's natural spline: encode, block, decode, then back to the items."""
    pool = torch.cat([items, filler]).detach().double().numpy()
    out = np.zeros((plan.n_items, 3))
    alpha, beta = code.alpha.double().numpy(), code.beta.double().numpy()
    for g in range(plan.groups):
        members = plan.slots[g].numpy()
        coded = CubicSpline(alpha, pool[members], bc_type="natural", axis=0)(beta)
        with torch.no_grad():
            y = block(torch.from_numpy(coded)).numpy()
        decoded = CubicSpline(beta, y, bc_type="natural", axis=0)(alpha)
        for s, m in enumerate(members):
            if m < plan.n_items:
                out[m] = decoded[s]
    return out


def _block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


@pytest.mark.parametrize("scope", ["request", "batch"])
def test_apply_matches_a_scipy_reference(scope):
    code = SplineCode(8, 12, dtype=torch.float64)
    items, filler = torch.randn(13, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    plan = plan_groups([1, 2, 10], scope, 8, 9, SeededRandomSource(3))
    got = apply_plan(_block(), items, filler, plan, code).detach().numpy()
    np.testing.assert_allclose(got, _reference(_block(), items, filler, plan, code), atol=1e-10)


def test_apply_is_differentiable_in_items_and_companions():
    code = SplineCode(4, 6, dtype=torch.float64)
    items = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    filler = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for scope in ("request", "batch"):
        plan = plan_groups([1, 2], scope, 4, 6, SeededRandomSource(0))
        for tol in (0.0, 1e-2):
            assert torch.autograd.gradcheck(
                lambda a, b, plan=plan, tol=tol: apply_plan(_block(), a, b, plan, code, tol), (items, filler)
            )


class CountingBlock(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, z):
        self.calls.append(z.shape[0])
        return self.inner(z)


def test_sparse_decode_runs_a_fixed_number_of_coded_samples_whatever_the_slot():
    code = SplineCode(32, 48, dtype=torch.float64)
    tol = 3e-3
    width = sparse_width(code, tol)
    assert width < 48 and width == int((code.D.abs() > tol).sum(1).max())
    block = CountingBlock(_block())
    items, filler = torch.randn(1, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    for slot in range(32):  # put the item in every slot in turn
        perms = torch.arange(32).roll(slot).unsqueeze(0)
        plan = CodingPlan(torch.cat([torch.tensor([0]), torch.arange(1, 32)]).unsqueeze(0), perms, 1)
        sparse = apply_plan(block, items, filler, plan, code, tol)
        full = apply_plan(_block(), items, filler, plan, code)
        # what the skipped weights can change: their L1 mass times the largest block output
        d_row = code.D[plan.perms[0].argsort()[0]].abs()
        dropped = float(d_row.sort(descending=True).values[width:].sum())
        with torch.no_grad():
            bound = dropped * float(_block()(code.encode(torch.cat([items, filler])[plan.slots[0]])).abs().max())
        assert float((sparse - full).abs().max()) <= bound + 1e-12
    assert set(block.calls) == {width}
    two = plan_groups([2], "request", 32, 40, SeededRandomSource(0))
    block.calls.clear()
    apply_plan(block, torch.randn(2, 5, dtype=torch.float64), filler, two, code, tol)
    assert block.calls == [2 * width]
