"""The converging attack suite against closed forms and invariants: APGD, PGD with restarts, Square, worst case."""

import pytest
import torch
import torch.nn.functional as F
from helpers import correct_per_image, worst_case

from codedsmooth.core.attacks import apgd, apgd_checkpoints, dlr_loss, pgd
from codedsmooth.probe.square import square_attack


def _linear(classes, d=20, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, classes).double()
    return lambda z: lin(z.flatten(1)), lin


def _closed_form_robust(lin, x, y, eps):
    """Exact L∞ robustness of a linear classifier in the box [0, 1]: for each j ≠ y the margin
    (w_y − w_j)·x' + b_y − b_j is smallest at x' = clip(x − ε sign(w_y − w_j)) coordinatewise."""
    xf = x.flatten(1)
    lo, hi = (xf - eps).clamp(min=0), (xf + eps).clamp(max=1)
    robust = torch.ones(len(x), dtype=torch.bool)
    for j in range(lin.out_features):
        dw = lin.weight[y] - lin.weight[j]
        worst = torch.where(dw > 0, lo, hi)
        m = (dw * worst).sum(1) + lin.bias[y] - lin.bias[j]
        robust &= (m > 0) | (y == j)
    return robust


def _data(model, n=300, seed=1):
    x = torch.rand(n, 1, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def test_apgd_ce_on_a_binary_linear_model_reaches_the_closed_form():
    model, lin = _linear(2)
    x, y = _data(model)
    eps = 0.1
    expected = _closed_form_robust(lin, x, y, eps)
    assert 0.2 < float(expected.float().mean()) < 0.9  # a case where the attack matters
    adv = apgd(model, x, y, eps, steps=20, loss="ce", generator=torch.Generator().manual_seed(0))
    assert torch.equal(correct_per_image(model, adv, y), expected)


def test_apgd_targeted_dlr_on_a_multiclass_linear_model_reaches_the_closed_form():
    model, lin = _linear(5)
    x, y = _data(model, n=400)
    eps = 0.05
    expected = _closed_form_robust(lin, x, y, eps)
    assert 0.2 < float(expected.float().mean()) < 0.9
    adv = apgd(model, x, y, eps, steps=50, loss="dlr-targeted", generator=torch.Generator().manual_seed(0))
    assert torch.equal(correct_per_image(model, adv, y), expected)
    # no attack can beat the closed form: a certificate-like lower bound on accuracy
    for loss in ("ce", "dlr"):
        adv = apgd(model, x, y, eps, steps=50, loss=loss, generator=torch.Generator().manual_seed(0))
        assert not bool((~correct_per_image(model, adv, y) & expected).any())


def test_apgd_best_loss_never_decreases_and_stays_in_the_ball():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.rand(64, 1, 4, 5)
    y = torch.randint(0, 4, (64,))
    for loss in ("ce", "dlr"):
        trace = []
        adv = apgd(net, x, y, 0.1, steps=40, loss=loss, generator=torch.Generator().manual_seed(0), trace=trace)
        assert len(trace) == 40
        best = torch.stack([t.best_loss for t in trace])
        assert bool((best[1:] >= best[:-1]).all())  # the best iterate is kept
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        plain_pgd = pgd(net, x, y, 0.1, steps=40, generator=torch.Generator().manual_seed(0))
        assert float(correct_per_image(net, adv, y).float().mean()) <= float(
            correct_per_image(net, plain_pgd, y).float().mean()
        )


def _papers_checkpoints(steps: int) -> list[int]:
    """Croce & Hein (2020): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), as iterations p_j · steps."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0 + 1e-9:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return [round(q * steps) for q in p[1:]]


@pytest.mark.parametrize("steps", [100, 50, 13])
def test_apgd_halves_its_step_size_at_the_checkpoints_of_the_paper(steps):
    """The attack as it runs: with a loss that never rises, every image halves its step size at every
    checkpoint, so the iterations where the recorded step size changes are the attack's schedule."""
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    flat = torch.tensor([[2.0, 1.0, 0.0]])

    def constant(z):  # the loss does not depend on the input: it never rises, so each check halves the step
        return flat + 0 * z.flatten(1)[:, :1]

    trace = []
    apgd(constant, x, y, 0.1, steps=steps, loss="ce", generator=torch.Generator().manual_seed(0), trace=trace)
    sizes = torch.stack([t.step_size for t in trace])  # (steps, images)
    assert len(trace) == steps
    halved_after = [
        i + 1 for i in range(steps) if bool((sizes[i] < (sizes[i - 1] if i else torch.full((3,), 0.2))).all())
    ]
    assert halved_after == apgd_checkpoints(steps)
    if steps == 100:  # at 100 steps the reference code's integer arithmetic is the paper's p_j exactly
        assert halved_after == _papers_checkpoints(100)
    torch.testing.assert_close(sizes[-1], torch.full((3,), 0.2 / 2 ** len(halved_after)))


def test_apgd_eot_averages_a_randomized_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 4)
    calls = []

    def noisy(z):
        calls.append(1)
        return lin(z.flatten(1)) + 0.1 * torch.randn(len(z), 4)

    x = torch.rand(8, 1, 4, 5)
    y = torch.randint(0, 4, (8,))
    apgd(noisy, x, y, 0.05, steps=5, eot=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 * 6  # (start + 5 steps) × 3 draws


def test_dlr_needs_three_classes_and_is_scale_invariant():
    logits = torch.randn(10, 5)
    y = torch.randint(0, 5, (10,))
    torch.testing.assert_close(dlr_loss(logits, y), dlr_loss(3 * logits + 2, y))
    with pytest.raises(ValueError, match="at least 3 classes"):
        apgd(lambda z: z.flatten(1)[:, :2], torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1, loss="dlr")


def test_pgd_with_restarts_is_at_least_as_strong_as_one_restart_per_image():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    x = torch.rand(200, 1, 4, 5)
    with torch.no_grad():
        y = net(x).argmax(1)
    eps = 0.08
    one = pgd(net, x, y, eps, steps=30, restarts=1, keep_best=True, generator=torch.Generator().manual_seed(0))
    five = pgd(net, x, y, eps, steps=30, restarts=5, generator=torch.Generator().manual_seed(0))  # same first start
    robust_one, robust_five = correct_per_image(net, one, y), correct_per_image(net, five, y)
    assert not bool((robust_five & ~robust_one).any())  # per image, never weaker
    assert float((five - x).abs().max()) <= eps + 1e-6
    with torch.no_grad():
        l1 = F.cross_entropy(net(one), y, reduction="none")
        l5 = F.cross_entropy(net(five), y, reduction="none")
    assert bool(
        (l5[robust_five] >= l1[robust_five] - 1e-5).all()
    )  # unfooled images: at least the loss of the first restart
    # keep_best never does worse than the last iterate
    last = pgd(net, x, y, eps, steps=30, generator=torch.Generator().manual_seed(0))
    assert not bool((robust_one & ~correct_per_image(net, last, y)).any())


@pytest.mark.parametrize("scores", ["probs", "logits"])
def test_square_stays_in_the_ball_and_within_its_budget(scores):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)

    def score_fn(batch):
        with torch.no_grad():
            out = net(batch)
        return out.softmax(1) if scores == "probs" else out

    adv, used = square_attack(
        score_fn, x, y, eps=0.1, queries=300, scores=scores, generator=torch.Generator().manual_seed(0)
    )
    assert int(used.max()) <= 300 and int(used.min()) >= 1
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    fooled = ~correct_per_image(net, adv, y)
    assert float(fooled.float().mean()) > 0.3
    assert bool((used[~fooled] == 300).all())  # unfooled images spend the whole budget
    assert float(used[fooled].float().mean()) < 150  # fooled ones stop once fooled
    # with repeats, every candidate costs `repeats` queries and the budget still holds
    _, used2 = square_attack(score_fn, x[:10], y[:10], eps=0.1, queries=101, repeats=4, scores=scores)
    assert int(used2.max()) <= 101 and bool((used2 % 4 == 0).all())


def test_square_counts_every_query_it_makes():
    lin = torch.nn.Linear(16, 3)
    x = torch.rand(6, 1, 4, 4)
    y = torch.zeros(6, dtype=torch.long)
    per_item = torch.zeros(6)

    def score_fn(batch):
        for row in batch:  # attribute each query to its source image by nearest clean input
            per_item[int(((x - row).flatten(1).abs().amax(1)).argmin())] += 1
        with torch.no_grad():
            return lin(batch.flatten(1)).softmax(1)

    _, used = square_attack(score_fn, x, y, eps=0.01, queries=50)
    torch.testing.assert_close(per_item, used.float())


def test_worst_case_is_the_per_image_and_over_attacks():
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, True, True])
    assert worst_case([a, b]).tolist() == [True, False, False, True]
    with pytest.raises(ValueError):
        worst_case([])
    with pytest.raises(ValueError, match="differ in shape"):
        worst_case([a, b[:3]])
