"""The report's attack cascade and scoring against independent computations, and ``codedsmooth report --quick`` end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import correct_per_image, worst_case

from codedsmooth.core import CodingSpec
from codedsmooth.core.attacks import fgsm
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.runner import evaluation_data
from codedsmooth.probe.stats import wilson
from codedsmooth.probe.suite import Outcome, Scorer, run_cascade, transfer_attack
from codedsmooth.probe.targets import RCIModel


def _fgsm_attacks(model, eps_values):
    """Per-image deterministic attacks, so running one on a subset gives what it gives on that image in the full set."""
    return [(f"fgsm {e}", lambda x, y, idx, e=e: fgsm(model, x, y, e)) for e in eps_values]


def test_cascade_is_the_per_image_worst_case_of_the_attacks_run_on_every_image(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    x, y, _ = evaluation_data(ck, 120)
    model = RCIModel(ck, CodingSpec.plain())
    scorer = Scorer(model, draws=32)
    assert scorer.draws == 1  # a plain model is one deterministic draw
    attacks = _fgsm_attacks(model, [0.05, 0.1, 0.2])
    out = run_cascade(attacks, scorer, x, y, scorer.start(x, y))
    independent = worst_case([correct_per_image(model, x, y)] + [correct_per_image(model, fn(x, y, None), y) for _, fn in attacks])
    assert torch.equal(out.correct[0], independent)
    assert out.accuracy < out.log[0][1]  # the attacks did something, or the test proves nothing
    accs = [a for _, a in out.log]
    assert accs == sorted(accs, reverse=True)  # each attack can only lower the worst case
    # every kept input is inside the ball of the largest radius and in [0, 1]
    assert float((out.x_adv - x).abs().max()) <= 0.2 + 1e-6 and float(out.x_adv.min()) >= 0 and float(out.x_adv.max()) <= 1


def test_larger_eps_starts_from_the_smaller_eps_result(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    x, y, _ = evaluation_data(ck, 100)
    model = RCIModel(ck, CodingSpec.plain())
    scorer = Scorer(model, 1)
    small = run_cascade(_fgsm_attacks(model, [0.1]), scorer, x, y, scorer.start(x, y))
    # a weak attack at the larger radius cannot undo what the smaller radius found
    large = run_cascade(_fgsm_attacks(model, [0.001]), scorer, x, y, small)
    assert bool((large.score <= small.score).all())
    assert large.log[0] == ("start", small.accuracy)


def test_rci_scores_are_shares_of_independent_draws(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    x, y, pool = evaluation_data(ck, 80)
    spec = ck.coding_spec(scope="request", n=ck.config.coding.k)  # N = K: the noisiest code, so draws disagree
    scorer = Scorer(RCIModel(ck, spec, pool, seed=3), draws=16)
    c = scorer(x, y)
    assert c.shape == (16, 80)
    out = Outcome(x.clone(), c)
    assert math.isclose(out.accuracy, float(c.float().mean()), rel_tol=1e-6)
    per_draw = c.float().mean(1)
    assert math.isclose(out.draw_sd, float(per_draw.std()), rel_tol=1e-6)
    assert torch.equal(out.majority(), c.float().mean(0) > 0.5)
    # transfer looks the adversarial of the same image up by its index in the source outcome
    src = Outcome(torch.rand_like(x), torch.ones(1, 80, dtype=torch.bool))
    name, attack = transfer_attack("t", src)
    idx = torch.tensor([5, 2, 70])
    assert torch.equal(attack(x[idx], y[idx], idx), src.x_adv[idx])


def test_merge_keeps_the_lower_score_per_image():
    x = torch.zeros(4, 1, 2, 2)
    out = Outcome(x.clone(), torch.tensor([[True, True, False, True], [True, False, False, True]]))
    new_x = torch.ones(3, 1, 2, 2)
    out.merge(torch.tensor([0, 1, 3]), new_x, torch.tensor([[False, True, True], [True, True, True]]))
    # image 0: 0.5 < 1 → taken; image 1: 1 > 0.5 → kept; image 3: 1 = 1 → kept
    assert out.score.tolist() == [0.5, 0.5, 0.0, 1.0]
    assert out.x_adv[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_report_end_to_end(tmp_path):
    """``codedsmooth report --quick``: trains, attacks over HTTP and in-process, writes markdown, JSON and figures whose numbers agree."""
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "codedsmooth", "report", "--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.with_suffix(".json").read_text())
    md = out.read_text()
    assert set(r["models"]) == {f"{m}/seed0" for m in ("erm", "mixup", "coded", "pgd-at")}
    for key, m in r["models"].items():
        assert set(m["settings"]) == {"plain", "request", "batch"}
        for setting, by_eps in m["settings"].items():
            accs = [by_eps[e]["accuracy"] for e in ("0.1", "0.2", "0.3")]
            assert accs == sorted(accs, reverse=True), (key, setting, accs)  # a larger ball never helps the model
            for s in by_eps.values():
                assert math.isclose(s["accuracy"], sum(s["score"]) / len(s["score"]), abs_tol=1e-3)
                ci = wilson(round(s["accuracy"] * s["n"]), s["n"])
                assert math.isclose(s["interval"][0], ci.low, abs_tol=1e-9) and math.isclose(s["interval"][1], ci.high, abs_tol=1e-9)
                assert s["draws"] == (1 if setting == "plain" else r["config"]["draws"])
        sq = m["square"]
        for setting in ("plain", "request"):
            assert 0 < sq[setting]["queries_sent"] <= r["config"]["square_queries"] * sq[setting]["images"]
    assert {c["name"] for c in r["sanity"]} >= {"black-box ≤ white-box", "more steps and restarts no longer help", "ε-curve reaches ~0", "identity permutation"}
    assert all(isinstance(c["passed"], bool) for c in r["sanity"])
    assert len(r["eot_curve"]["rows"]) >= 4 and r["n_sweep"]["rows"]
    for fig in ("RESULTS-eps.png", "RESULTS-eot.png", "RESULTS-examples.png"):
        assert (tmp_path / fig).stat().st_size > 1000
        assert fig in md
    pgd_at = r["models"]["pgd-at/seed0"]["settings"]["plain"]["0.1"]
    assert f"{100 * pgd_at['accuracy']:.1f}" in md
    assert "codedsmooth report --quick" in md
