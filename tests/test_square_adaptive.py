"""The adaptive Square attack against randomized scores: its budget, its reduction to Square as in
the reference, its confirmed breaks against RCI, and its cost on a deterministic model."""

import pytest
import torch

from codedsmooth.models import load_checkpoint
from codedsmooth.probe.square import adaptive_square_attack, square_attack
from codedsmooth.probe.targets import RCIModel


@pytest.fixture(autouse=True)
def _one_thread():
    """The attacks here send batches of tens of tiny images: one torch thread runs them faster than two
    (on shared cores, many times faster); set after conftest's fixed thread count, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SpikyTarget:
    """Probabilities of a fixed linear model whose top logit drops by ``spike`` on a random share of
    queries (one-sided noise, as RCI's: some draws lower the margin of a correctly classified input
    sharply). Logs every query: which clean image it belongs to (the nearest in L∞), the point, and
    whether the answer put the label off the top."""

    def __init__(self, x, y, seed=0, p=0.3, spike=4.0):
        g = torch.Generator().manual_seed(123)
        self.w = torch.randn(x[0].numel(), 3, generator=g) * 3
        self.x, self.y, self.p, self.spike = x, y, p, spike
        self.noise = torch.Generator().manual_seed(seed)
        self.log: list[tuple[int, torch.Tensor, bool]] = []

    def logits(self, batch):
        return batch.flatten(1) @ self.w

    def __call__(self, batch):
        z = self.logits(batch)
        hit = torch.rand(len(batch), generator=self.noise) < self.p
        z[hit, z[hit].argmax(1)] -= self.spike
        for row, zi in zip(batch, z):
            i = int((self.x - row).flatten(1).abs().amax(1).argmin())
            self.log.append((i, row.clone(), int(zi.argmax()) != int(self.y[i])))
        return z.softmax(1)


def _spiky_images(n=24):
    x = torch.rand(n, 1, 4, 4, generator=_gen(5))
    y = (x.flatten(1) @ (torch.randn(16, 3, generator=torch.Generator().manual_seed(123)) * 3)).argmax(1)
    return x, y


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score_queries": 1, "requery_incumbent": False, "confirm": 0},
        {"score_queries": 4, "statistic": "quantile", "confirm": 2},
        {"score_queries": 3, "statistic": "mean", "requery_incumbent": False, "confirm": 5},
    ],
)
def test_every_query_is_counted_and_the_budget_holds(kw):
    x, y = _spiky_images()
    target = SpikyTarget(x, y)
    budget, eps = 120, 0.15
    res = adaptive_square_attack(target, x, y, eps, budget, generator=_gen(), **kw)
    per_image = torch.zeros(len(x), dtype=torch.long)
    for i, row, _ in target.log:
        per_image[i] += 1
        assert float((row - x[i]).abs().max()) <= eps + 1e-6  # every query stays in its image's ball
    assert torch.equal(per_image, res.queries)
    assert int(res.queries.max()) <= budget
    assert float((res.x_adv - x).abs().max()) <= eps + 1e-6
    assert 0 < int(res.broken.sum()) < len(x)
    confirm = kw.get("confirm", 4)
    for i in res.broken.nonzero().flatten().tolist():
        last = [(row, off) for j, row, off in target.log if j == i][-max(confirm, 1) :]
        # broken only after the last `confirm` answers, all for the returned adversarial, put the label off the top
        assert all(off and torch.equal(row, res.x_adv[i]) for row, off in last)


def test_reduces_to_square_as_in_the_reference(tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    plain = RCIModel(ck, ck.coding_spec(enabled=False))
    x, y = digits.test_x[:40].float(), digits.test_y[:40]

    def probs(batch):
        with torch.no_grad():
            return plain(batch).softmax(1)

    x_old, q_old = square_attack(probs, x, y, 0.1, 150, generator=_gen(3))
    res = adaptive_square_attack(
        probs, x, y, 0.1, 150, score_queries=1, requery_incumbent=False, confirm=0, generator=_gen(3)
    )
    assert torch.equal(res.x_adv, x_old) and torch.equal(res.queries, q_old)
    with torch.no_grad():
        fooled = plain(x_old).argmax(1) != y
    assert 0 < int(fooled.sum()) < len(y)
    assert torch.equal(res.broken, fooled)
    # and on a randomized target answering the same sequence of calls with the same draws
    xs, ys = _spiky_images()
    x_old, q_old = square_attack(SpikyTarget(xs, ys, seed=7), xs, ys, 0.15, 80, generator=_gen(4))
    res = adaptive_square_attack(
        SpikyTarget(xs, ys, seed=7),
        xs,
        ys,
        0.15,
        80,
        score_queries=1,
        requery_incumbent=False,
        confirm=0,
        generator=_gen(4),
    )
    assert torch.equal(res.x_adv, x_old) and torch.equal(res.queries, q_old)


def test_confirmed_breaks_hold_on_fresh_draws_of_rci_where_the_reference_attack_is_fooled(tiny_checkpoint, digits):
    """Through RCI (request scope) Square as in the reference stops at the first noisy reading below
    zero; many of those adversarials are still correctly classified by most fresh draws and by the plain
    model. The adaptive attack's confirmed breaks are misclassified on fresh, independent draws."""
    ck = load_checkpoint(tiny_checkpoint)
    plain = RCIModel(ck, ck.coding_spec(enabled=False))
    served = RCIModel(ck, ck.coding_spec(enabled=True, scope="request"), seed=1)
    judge = RCIModel(ck, ck.coding_spec(enabled=True, scope="request"), seed=2)  # independent draws
    x, y = digits.test_x.float(), digits.test_y
    with torch.no_grad():
        keep = (plain(x).argmax(1) == y).nonzero().flatten()[:: len(y) // 30][:30]
    x, y = x[keep], y[keep]

    def probs(batch):
        with torch.no_grad():
            return served(batch).softmax(1)

    def fresh_misclassified(x_adv):  # per image: the share of 16 fresh draws with the label off the top
        with torch.no_grad():
            return torch.stack([judge(x_adv).argmax(1) != y for _ in range(16)]).float().mean(0)

    budget, eps = 150, 0.2
    x_old, q_old = square_attack(probs, x, y, eps, budget, generator=_gen())
    res = adaptive_square_attack(probs, x, y, eps, budget, generator=_gen())
    old_broken = q_old < budget  # the reference attack stops an image only on a negative reading
    with torch.no_grad():
        old_plain_correct = plain(x_old).argmax(1) == y
        new_plain_correct = plain(res.x_adv).argmax(1) == y
    f_old, f_new = fresh_misclassified(x_old), fresh_misclassified(res.x_adv)
    assert int(old_broken.sum()) >= 10 and int(res.broken.sum()) >= 10
    agreement_new = float(f_new[res.broken].mean())
    false_old = float(((f_old < 0.5) | old_plain_correct)[old_broken].float().mean())
    false_new = float(((f_new < 0.5) | new_plain_correct)[res.broken].float().mean())
    print(
        f"\nreference: {int(old_broken.sum())} 'broken', {false_old:.0%} of them correct on most fresh draws or the plain model, "
        f"fresh agreement {float(f_old[old_broken].mean()):.2f}; adaptive: {int(res.broken.sum())} broken, {false_new:.0%}, agreement {agreement_new:.2f}"
    )
    assert agreement_new >= 0.85
    assert false_new <= 0.1
    assert false_old >= false_new + 0.15


def test_on_a_deterministic_model_it_is_the_reference_attack_at_the_steps_its_budget_pays_for(tiny_checkpoint, digits):
    """Every reading of a point is the same, so the robust score and the re-query change nothing: at
    budget Q with m readings per candidate, a re-query and k confirmations, the search is Square's at
    S = (Q − m − k) // (m + 1) steps, each image broken at step t paying m + (m + 1)·t + k queries.
    The tolerance (1 image) is for the one difference in computation: the adaptive attack scores
    incumbents and candidates in one batch, and a CNN's float results may differ in the last bits
    with the batch's size, which can flip a comparison of near-equal margins."""
    ck = load_checkpoint(tiny_checkpoint)
    plain = RCIModel(ck, ck.coding_spec(enabled=False))
    x, y = digits.test_x[::8].float(), digits.test_y[::8]

    def probs(batch):
        with torch.no_grad():
            return plain(batch).softmax(1)

    budget, m, k = 240, 2, 4
    steps = (budget - m - k) // (m + 1)
    res = adaptive_square_attack(probs, x, y, 0.1, budget, score_queries=m, confirm=k, generator=_gen(1))
    x_ref, q_ref = square_attack(probs, x, y, 0.1, steps + 1, generator=_gen(1))
    with torch.no_grad():
        ref_broken = plain(x_ref).argmax(1) != y
        full_broken = plain(square_attack(probs, x, y, 0.1, budget, generator=_gen(1))[0]).argmax(1) != y
        assert torch.equal(
            res.broken, plain(res.x_adv).argmax(1) != y
        )  # on a deterministic model a confirmed break is a break
    print(
        f"\n{len(y)} images: adaptive broke {int(res.broken.sum())} at {budget} queries; Square at the {steps + 1} its steps pay for "
        f"broke {int(ref_broken.sum())}, at the full {budget} {int(full_broken.sum())}"
    )
    assert int(ref_broken.sum()) >= 10
    assert int((res.broken != ref_broken).sum()) <= 1
    same = res.broken & ref_broken
    assert torch.equal(res.queries[same], m + (m + 1) * (q_ref[same] - 1) + k)
    assert int(res.broken.sum()) >= int(ref_broken.sum()) - 1


@pytest.mark.parametrize(
    "kw",
    [
        {"statistic": "median"},
        {"score_queries": 0},
        {"confirm": -1},
        {"scores": "logprobs"},
        {"queries": 1, "score_queries": 2},
    ],
)
def test_rejects_settings_it_cannot_honour(kw):
    x, y = _spiky_images(4)
    target = SpikyTarget(x, y)
    args = {"queries": 50, **kw}
    with pytest.raises(ValueError):
        adaptive_square_attack(target, x, y, 0.1, generator=_gen(), **args)
    assert target.log == []  # rejected before any query
