"""Attack math against closed forms; each threat model on a trained tiny model; probes against real servers."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import metric_samples, running_server

from codedsmooth.core.attacks import fgsm, pgd
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.evaluate import AttackConfig, run_attack
from codedsmooth.probe.runner import evaluation_data
from codedsmooth.probe.square import margin, square_attack
from codedsmooth.probe.targets import HttpTarget, InProcessTarget, RCIModel, accuracy


def test_fgsm_matches_the_closed_form_of_a_linear_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 4).double()
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    # ∇ₓ CE(Wx + b, y) = Wᵀ (softmax(Wx + b) − onehot(y))
    with torch.no_grad():
        p = torch.softmax(lin(x), 1)
        grad = (p - F.one_hot(y, 4).double()) @ lin.weight
    expected = (x + 0.1 * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(lin, x, y, 0.1), expected, rtol=0, atol=0)


def test_pgd_stays_in_the_ball_and_beats_fgsm_on_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.rand(32, 12)
    y = torch.randint(0, 3, (32,))
    adv = pgd(net, x, y, eps=0.05, steps=15, generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        loss_pgd = F.cross_entropy(net(adv), y)
        loss_fgsm = F.cross_entropy(net(fgsm(net, x, y, 0.05)), y)
        loss_clean = F.cross_entropy(net(x), y)
    assert loss_pgd >= loss_fgsm - 1e-6 and loss_pgd > loss_clean


def test_margin_is_negative_exactly_when_misclassified():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    y = torch.tensor([0, 0])
    m = margin(probs, y)
    torch.testing.assert_close(m, torch.tensor([0.5, -0.3]))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    x, y, pool = evaluation_data(ck, 60)
    return ck, x, y, pool


@pytest.mark.parametrize("attack,threat", [("fgsm", "transfer"), ("pgd", "transfer"), ("fgsm", "adaptive"), ("eot-pgd", "adaptive")])
def test_each_gradient_attack_lowers_accuracy(tiny, attack, threat):
    ck, x, y, pool = tiny
    spec = ck.coding_spec()
    target = InProcessTarget(RCIModel(ck, spec, pool, seed=5))
    cfg = AttackConfig(attack=attack, threat=threat, eps=[0.15], steps=10, eot_samples=4, samples=len(x), sanity=False)
    report = run_attack(cfg, ck, target, x, y, pool)
    assert report["robust_accuracy"]["0.15"] < report["clean_accuracy"]["target"] - 0.2


def test_sanity_checks_hold_on_a_working_attack(tiny):
    ck, x, y, pool = tiny
    spec = ck.coding_spec()
    target = InProcessTarget(RCIModel(ck, spec, pool, seed=5))
    cfg = AttackConfig(attack="pgd", threat="adaptive", eps=[0.05, 0.15], steps=10, samples=len(x))
    report = run_attack(cfg, ck, target, x, y, pool)
    checks = {c["name"]: c for c in report["sanity"]}
    assert set(checks) == {"identity permutation", "pgd <= fgsm", "large eps"}
    ident = checks["identity permutation"]
    for eps in ("0.05", "0.15"):
        assert abs(ident["value"][eps] - ident["reference"][eps]) <= 0.1
    assert all(c["passed"] for c in checks.values()), checks


def test_square_attack_in_process_lowers_accuracy_within_budget(tiny):
    ck, x, y, pool = tiny
    target = InProcessTarget(RCIModel(ck, ck.coding_spec(), pool, seed=5))
    x_adv, used = square_attack(target.predict_proba, x, y, eps=0.2, queries=60, generator=torch.Generator().manual_seed(0))
    assert int(used.max()) <= 60
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert accuracy(target, x_adv, y) < accuracy(target, x, y) - 0.2


def test_blackbox_attack_against_a_real_server_within_its_budget(tiny, tiny_checkpoint):
    ck, x, y, pool = tiny
    xs, ys = x[:12], y[:12]
    with running_server(tiny_checkpoint, max_queue_size=1024) as server:
        target = HttpTarget(server.url, concurrency=16)
        clean = accuracy(target, xs, ys)
        x_adv, used = square_attack(target.predict_proba, xs, ys, eps=0.25, queries=40, generator=torch.Generator().manual_seed(0))
        robust = accuracy(target, x_adv, ys)
        samples = metric_samples(server)
        seen = sum(v for (name, labels), v in samples.items() if name == "codedsmooth_requests_total" and ("status", "200") in labels
                   and dict(labels)["endpoint"].endswith("/infer"))  # the client sends v2 binary tensors
    assert int(used.max()) <= 40
    assert seen == target.queries == 2 * len(xs) + int(used.sum())  # every query was one real request
    assert robust < clean


def test_cotenant_flips_labels_in_batch_scope_and_never_in_request_scope(tiny_checkpoint, tiny):
    ck, x, y, pool = tiny
    xs, ys = x[:20], y[:20]
    cfg = AttackConfig(attack="cotenant", steps=15, eot_samples=4)
    rates = {}
    for scope in ("batch", "request"):
        with running_server(tiny_checkpoint, rci_scope=scope, coded_points=16, rci_seed=3, max_delay_ms=150, max_batch_size=64) as server:
            report = run_attack(cfg, ck, HttpTarget(server.url), xs, ys, pool)
        rates[scope] = report["cotenant"]["flip_rate"]
    assert rates["request"] == 0.0
    assert rates["batch"] > 0.0


def test_attack_cli_writes_report_and_plot(tiny_checkpoint, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    proc = subprocess.run(
        [sys.executable, "-m", "codedsmooth.cli", "attack", "--checkpoint", str(tiny_checkpoint), "--attack", "fgsm", "--threat", "transfer",
         "--eps", "0.05", "0.2", "--samples", "30", "--report", str(report), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert set(data["robust_accuracy"]) == {"0.05", "0.2"}
    assert data["robust_accuracy"]["0.2"] <= data["robust_accuracy"]["0.05"] <= data["clean_accuracy"]["target"]
    assert {"no_rci", "target"} <= set(data["clean_accuracy"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "codedsmooth.cli", "attack", "--attack", "square", "--threat", "adaptive"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "threat 'blackbox'" in bad.stderr and "Traceback" not in bad.stderr
