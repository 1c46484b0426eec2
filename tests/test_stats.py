"""Report statistics against scipy's own implementations and closed forms."""

import pytest
import torch
from scipy.stats import binomtest

from codedsmooth.probe.stats import mcnemar, sign_test, wilson


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (137, 200), (500, 1000), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ours = wilson(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert ours.low == pytest.approx(ref.low, abs=1e-12) and ours.high == pytest.approx(ref.high, abs=1e-12)
    assert ours.low <= k / n <= ours.high


def test_wilson_narrows_as_n_grows_and_rejects_nonsense():
    widths = [wilson(n // 2, n).high - wilson(n // 2, n).low for n in (20, 200, 2000)]
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(2 * 1.959964 * (0.25 / 200) ** 0.5, rel=0.02)  # ≈ ±6.9 points at n = 200
    with pytest.raises(ValueError):
        wilson(5, 3)


def test_mcnemar_counts_discordant_pairs_and_matches_the_exact_binomial():
    a = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0, 1] * 10).bool()
    b = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 1] * 10).bool()
    paired = mcnemar(a, b)
    assert (paired.only_a, paired.only_b) == (30, 10)
    assert paired.p_value == pytest.approx(binomtest(30, 40, 0.5).pvalue)
    assert paired.supports_difference()
    same = mcnemar(a, a)
    assert same.p_value == 1.0 and not same.supports_difference()
    with pytest.raises(ValueError):
        mcnemar(a, b[:5])


def test_sign_test_on_scores_reduces_to_mcnemar_on_outcomes():
    a = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert sign_test(a.float(), b.float()) == mcnemar(a, b)
    scores = torch.tensor([0.5, 0.25, 0.0, 1.0, 0.75, 0.125])
    other = torch.tensor([0.0, 0.25, 0.0, 0.5, 1.0, 0.0])
    t = sign_test(scores, other)
    assert (t.only_a, t.only_b) == (3, 1)  # higher in images 0, 3, 5; lower in 4; ties dropped
    assert t.p_value == pytest.approx(0.625)  # P(|X - 2| >= 1) for X ~ Bin(4, 1/2): 1 - 6/16


def test_paired_difference_matches_a_bootstrap_of_the_pairs():
    """The Wald interval of a paired difference against an independent reference: resampling the image pairs."""
    from codedsmooth.probe.stats import paired_difference

    gen = torch.Generator().manual_seed(0)
    n = 4000
    a = torch.rand(n, generator=gen) < 0.90
    flip = torch.rand(n, generator=gen) < 0.08
    b = a ^ flip  # B differs from A on about 8 % of the images
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    d = paired_difference(only_a, only_b, n)
    assert d.diff == pytest.approx((a.float().mean() - b.float().mean()).item())
    idx = torch.randint(0, n, (4000, n), generator=gen)
    boot = (a[idx].float().mean(1) - b[idx].float().mean(1)).sort().values
    low, high = boot[int(0.025 * len(boot))].item(), boot[int(0.975 * len(boot))].item()
    assert d.low == pytest.approx(low, abs=0.002) and d.high == pytest.approx(high, abs=0.002)
    with pytest.raises(ValueError):
        paired_difference(5, 6, 10)
