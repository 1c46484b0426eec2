"""The report's attack cascade and scoring against independent computations, and ``codedsmooth report --quick`` end to end."""

import hashlib
import json
import math
import shlex
import subprocess
import sys
from collections import Counter

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
from codedsmooth.train import load_dataset


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
    independent = worst_case(
        [correct_per_image(model, x, y)] + [correct_per_image(model, fn(x, y, None), y) for _, fn in attacks]
    )
    assert torch.equal(out.correct[0], independent)
    assert out.accuracy < out.log[0][1]  # the attacks did something, or the test proves nothing
    accs = [a for _, a in out.log]
    assert accs == sorted(accs, reverse=True)  # each attack can only lower the worst case
    # every kept input is inside the ball of the largest radius and in [0, 1]
    assert (
        float((out.x_adv - x).abs().max()) <= 0.2 + 1e-6 and float(out.x_adv.min()) >= 0 and float(out.x_adv.max()) <= 1
    )


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
    """``codedsmooth report --quick``: trains, attacks over HTTP and in-process, writes markdown, JSON, figures and
    weights whose numbers agree; its samples are balanced; a second run reuses every cached stage."""
    out = tmp_path / "RESULTS.md"
    # --width 4: the same pipeline on narrower models (what is checked below holds at any width; training them is most of the run)
    cmd = [
        sys.executable,
        "-m",
        "codedsmooth",
        "report",
        "--quick",
        "--width",
        "4",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke test" in proc.stderr  # the terminal says what this is
    r = json.loads(out.with_suffix(".json").read_text())
    md = out.read_text()
    assert r["quick"] is True and "smoke test" in md.splitlines()[0] and "not robustness results" in md
    assert set(r["models"]) == {f"{m}/seed0" for m in ("erm", "mixup", "coded", "pgd-at")}
    test_y = load_dataset("mnist").test_y
    classes = sorted(set(test_y.tolist()))
    for name, idx in r["samples"].items():  # every sample covers every class in equal shares, and says so
        counts = Counter(test_y[torch.tensor(idx)].tolist())
        assert sorted(counts) == classes and len(set(counts.values())) == 1, (name, counts)
        assert len(set(idx)) == len(idx)
        assert f"*{name}*: {len(idx)} images, {len(idx) // len(classes)} of each of the {len(classes)} classes" in md
    assert (
        r["samples"]["rci"] == r["samples"]["white-box"][: len(r["samples"]["rci"])]
    )  # nested: results on the smaller sample line up
    for key, m in r["models"].items():
        assert set(m["settings"]) == {"plain", "request", "batch"}
        assert m["settings"]["plain"]["0.1"]["n"] == len(r["samples"]["white-box"]) and m["settings"]["request"]["0.1"][
            "n"
        ] == len(r["samples"]["rci"])
        for setting, by_eps in m["settings"].items():
            accs = [by_eps[e]["accuracy"] for e in ("0.1", "0.2", "0.3")]
            assert accs == sorted(accs, reverse=True), (key, setting, accs)  # a larger ball never helps the model
            for s in by_eps.values():
                assert math.isclose(s["accuracy"], sum(s["score"]) / len(s["score"]), abs_tol=1e-3)
                ci = wilson(round(s["accuracy"] * s["n"]), s["n"])
                assert math.isclose(s["interval"][0], ci.low, abs_tol=1e-9) and math.isclose(
                    s["interval"][1], ci.high, abs_tol=1e-9
                )
                assert s["draws"] == (1 if setting == "plain" else r["config"]["draws"])
    b = r["blackbox"]
    assert set(b["servers"]) == {"plain", "request", "noise"}
    noise = b["noise"]["coded"]
    assert noise["sigma"] == min(
        r["config"]["noise_grid"], key=lambda s: (abs(noise["grid"][f"{s:g}"] - noise["rci_clean"]), s)
    )
    bb_n = len(r["samples"]["black-box"])
    for row in b["rows"]:
        assert row["n"] == bb_n and len(row["queries"]) == bb_n
        assert max(row["queries"]) <= row["budget"]  # every query counted, none over the budget
        assert math.isclose(row["accuracy"], sum(row["score"]) / bb_n, abs_tol=1e-3)
        if row["server"] in ("plain", "request"):
            assert "whitebox_accuracy" in row
    assert {row["served_by"] for row in b["rows"]} == {
        "repository"
    } and "all of them models of one repository server" in md
    for budget in r["config"]["budgets"]:
        assert {x["server"] for x in b["rows"] if x["budget"] == budget} == {"plain", "request", "noise"}
    assert any(x["attacker"].startswith("transfer") and x["budget"] == 1 for x in b["rows"])
    # the black-box attacks joined the worst case: it is at most every row's accuracy on the same images
    coded = r["models"]["coded/seed0"]["settings"]
    assert any(name.startswith("adaptive Square") for name, _ in coded["plain"]["0.3"]["cascade"])
    worst_plain = sum(coded["plain"]["0.3"]["score"][:bb_n]) / bb_n
    assert all(worst_plain <= x["accuracy"] + 1e-6 for x in b["rows"] if x["server"] == "plain")
    full = r["full_split"]["rows"]["pgd-at/seed0"]
    assert full["n"] == r["full_split"]["n"] == len(test_y)
    for c in r["checkpoints"].values():  # published weights are the files whose hashes are recorded
        for name, rec in c["files"].items():
            assert hashlib.sha256((tmp_path / c["published"] / name).read_bytes()).hexdigest() == rec["sha256"]
    assert r["environment"]["torch"] == torch.__version__
    assert {c["name"] for c in r["sanity"]} >= {
        "black-box ≤ white-box",
        "more steps and restarts no longer help",
        "ε-curve reaches ~0",
        "identity permutation",
    }
    assert all(isinstance(c["passed"], bool) and c["what"] for c in r["sanity"])
    assert len(r["eot_curve"]["rows"]) >= 4 and r["n_sweep"]["rows"]
    for fig in ("RESULTS-eps.png", "RESULTS-eot.png", "RESULTS-examples.png"):
        assert (tmp_path / fig).stat().st_size > 1000
        assert fig in md
    pgd_at = r["models"]["pgd-at/seed0"]["settings"]["plain"]["0.1"]
    assert f"{100 * pgd_at['accuracy']:.1f}" in md
    assert (
        shlex.split(r["command"])[:2] == ["codedsmooth", "report"]
        and "--quick" in shlex.split(r["command"])
        and f"`{r['command']}`" in md
    )
    _check_size_study(r, md, tmp_path / "runs")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    r2 = json.loads(out.with_suffix(".json").read_text())
    assert r2["reused_stages"] > 0 and r2["models"] == r["models"] and r2["blackbox"]["rows"] == b["rows"]
    assert r2["sizes"]["rows"] == r["sizes"]["rows"]  # the study's models reused, not retrained


def _check_size_study(r, md, runs):
    """The training-set-size study: the models were trained on the subsets it names, its per-image outcomes are
    the models' own, and its tests and sentences follow from them (recomputed here with scipy)."""
    from scipy.stats import binomtest

    st, cfg = r["sizes"], r["config"]
    data = load_dataset("mnist")
    x, y = data.test_x.float() / 255, data.test_y
    assert {(x_["size"], x_["method"], x_["seed"]) for x_ in st["rows"]} == {
        (n, m, s) for n in cfg["sizes"] for m in cfg["size_methods"] for s in cfg["size_seeds"]
    }
    assert min(cfg["sizes"]) < st["n_train"] == max(cfg["sizes"])
    for row in st["rows"]:
        path = runs / (
            f"{row['method']}-seed{row['seed']}"
            if row["size"] == st["n_train"]
            else f"sizes/{row['method']}-n{row['size']}-seed{row['seed']}"
        )
        ck = load_checkpoint(path)
        assert ck.config.training.method == row["method"]
        assert getattr(ck.config.training, "train_images", st["n_train"]) == row["size"]
        assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == row["sha256"]
        model = RCIModel(ck, CodingSpec.plain())
        clean = correct_per_image(model, x, y)
        assert "".join("1" if c else "0" for c in clean.tolist()) == row["clean"]["per_image"] and row["clean"][
            "correct"
        ] == int(clean.sum())
        with torch.no_grad():
            assert row["clean"]["classes_predicted"] == len(model(x).argmax(1).unique())
        if "worst" in row:
            sample = torch.tensor(st["sample"])
            worst = torch.tensor([c == "1" for c in row["worst"]["per_image"]])
            assert not bool((worst & ~clean[sample]).any())  # the worst case never beats the clean image
    assert {r_["method"] for r_ in st["rows"] if "worst" in r_} == {"pgd-at", "coded-at"}
    for size, counts in st["subset_classes"].items():
        assert sum(counts.values()) == int(size) and len(set(counts.values())) == 1
    by = {(x_["size"], x_["method"], x_["seed"]): x_ for x_ in st["rows"]}
    assert {(t["size"], t["a"], t["b"], t["measure"]) for t in st["tests"]} == {
        (n, a, b, m)
        for n in cfg["sizes"]
        for a, b, m in (
            ("coded", "erm", "clean"),
            ("coded", "mixup", "clean"),
            ("coded-at", "pgd-at", "clean"),
            ("coded-at", "pgd-at", "worst"),
        )
    }
    for t in st["tests"]:
        for one in t["tests"]:
            a = by[(t["size"], t["a"], one["seed"])][t["measure"]]["per_image"]
            b = by[(t["size"], t["b"], one["seed"])][t["measure"]]["per_image"]
            only_a = sum(p == "1" and q == "0" for p, q in zip(a, b))
            only_b = sum(p == "0" and q == "1" for p, q in zip(a, b))
            assert (one["only_a"], one["only_b"]) == (only_a, only_b)
            assert math.isclose(one["p"], binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0)
    assert "## What coded training adds, by training-set size" in md
    for a, b, measure in (("coded", "erm", "clean"), ("coded-at", "pgd-at", "worst-case")):
        assert f"**{a} against {b}, {measure} accuracy**" in md
