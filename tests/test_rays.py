"""RayS (label-only, L∞): the boundary radius it finds on a linear model against the closed form, and a plain
model broken at ε = 0.3 through the registry."""

import torch

from codedsmooth.models import load_checkpoint
from codedsmooth.probe.evaluate import AttackConfig, run_attack
from codedsmooth.probe.rays import rays_attack
from codedsmooth.probe.runner import evaluation_data
from codedsmooth.probe.targets import InProcessTarget, RCIModel


def test_rays_finds_the_l_inf_distance_to_a_linear_boundary():
    """For a linear two-class model the smallest L∞ perturbation that crosses w·x + b = 0 has radius |w·x + b| / ‖w‖₁
    (no clipping: every pixel stays within [0, 1]); RayS, seeing labels only, reaches it to its search tolerance."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, generator=gen), (0.5 + 0.15 * torch.randn(6, 12, generator=gen)).clamp(0.25, 0.75)
    b = -float((x @ w).mean())  # the boundary runs through the images: both labels, small margins
    z = x @ w + b

    def label(v):
        return ((v.flatten(1) @ w + b) > 0).long()

    y = label(x)
    exact = z.abs() / w.abs().sum()
    assert (
        float(exact.max()) < 0.25 and float(exact.min()) > 0.005 and len(set(y.tolist())) == 2
    )  # inside [0, 1] all the way
    _, used, found = rays_attack(label, x, y, eps=0.0, queries=800)
    assert int(used.max()) <= 800
    torch.testing.assert_close(found, exact, atol=2e-3, rtol=0)


def test_rays_drives_a_plain_models_accuracy_to_about_zero(plain_erm_checkpoint):
    ck = load_checkpoint(plain_erm_checkpoint)
    x, y, pool = evaluation_data(ck, 40)
    target = InProcessTarget(RCIModel(ck, ck.coding_spec(enabled=False)))
    with torch.no_grad():
        right = (ck.model.eval()(x).argmax(1) == y).nonzero().flatten()[:10]
    cfg = AttackConfig(
        attack="rays", threat="blackbox", eps=[0.3], queries=1000, score_queries=1, samples=len(right), sanity=False
    )
    report = run_attack(cfg, ck, target, x[right], y[right], pool)
    assert report["clean_accuracy"]["target"] == 1.0 and len(right) == 10
    assert report["robust_accuracy"]["0.3"] <= 0.1
    assert report["target_queries"] <= 10 * 1000 + 2 * 10  # the budget, and the clean scoring
