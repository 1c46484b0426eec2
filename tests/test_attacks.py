"""Attack math against closed forms; each threat model on a trained tiny model; probes against real servers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import metric_samples, running_server

from codedsmooth.core.attacks import fgsm, pgd
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.attacks import ATTACKS
from codedsmooth.probe.checks import CHECKS, failure_lines
from codedsmooth.probe.evaluate import AttackConfig, run_attack
from codedsmooth.probe.runner import check_served_model, evaluation_data
from codedsmooth.probe.servers import query_attack, repository_server, serve_options
from codedsmooth.probe.square import margin, square_attack
from codedsmooth.probe.targets import HttpTarget, InProcessTarget, RCIModel, accuracy, expected_accuracy, is_randomized
from codedsmooth.service.launcher import free_port, local_server
from codedsmooth.train import TrainConfig, train


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


@pytest.mark.parametrize(
    "attack,threat",
    [("fgsm", "transfer"), ("pgd", "transfer"), ("fgsm", "adaptive"), ("eot-pgd", "adaptive"), ("cascade", "adaptive")],
)
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
    checks = report["sanity"]
    assert {c["name"] for c in checks} == {"identity permutation", "iterative ≤ one step", "large eps"}
    ident = [c for c in checks if c["name"] == "identity permutation"]
    assert sorted(c["eps"] for c in ident) == [0.05, 0.15]
    for c in checks:  # each check is decided by the shared thresholds, from its own numbers
        _, tolerance, passes = CHECKS[c["name"]]
        assert c["tolerance"] == tolerance and c["passed"] == passes(c["measured"], c["reference"], tolerance)
        assert c["what"] and c["value"]
    assert all(c["passed"] for c in checks), checks
    assert failure_lines(checks) == []
    failed = dict(ident[0], passed=False)
    assert failure_lines([failed]) == [
        f"sanity check failed: identity permutation ({failed['what']}): {failed['value']} (tolerance 5 points)"
    ]


def test_randomized_targets_are_scored_over_draws(tiny):
    ck, x, y, pool = tiny
    spec = ck.coding_spec(n=ck.config.coding.k)  # N = K: draws disagree
    got = expected_accuracy(InProcessTarget(RCIModel(ck, spec, pool, seed=9)), x, y, draws=6)
    reference = RCIModel(ck, spec, pool, seed=9)  # the same stream of draws, scored one draw at a time
    with torch.no_grad():
        per_draw = [float((reference(x).argmax(1) == y).float().mean()) for _ in range(6)]
    assert got == pytest.approx(sum(per_draw) / 6, abs=1e-9)
    assert len(set(per_draw)) > 1  # the draws differed, so one draw would not have been the expected accuracy
    plain = InProcessTarget(RCIModel(ck, ck.coding_spec(enabled=False)))
    assert not is_randomized(plain) and plain.queries == 0
    assert expected_accuracy(plain, x, y, draws=6) == accuracy(plain, x, y) and plain.queries == 2 * len(
        x
    )  # a deterministic target: one query each


def test_square_attack_in_process_lowers_accuracy_within_budget(tiny):
    ck, x, y, pool = tiny
    target = InProcessTarget(RCIModel(ck, ck.coding_spec(), pool, seed=5))
    x_adv, used = square_attack(
        target.predict_proba, x, y, eps=0.2, queries=60, generator=torch.Generator().manual_seed(0)
    )
    assert int(used.max()) <= 60
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6
    assert accuracy(target, x_adv, y) < accuracy(target, x, y) - 0.2


def test_blackbox_attack_against_a_real_server_within_its_budget(tiny, tiny_checkpoint):
    ck, x, y, pool = tiny
    xs, ys = x[:12], y[:12]
    with running_server(tiny_checkpoint, max_queue_size=1024) as server:
        target = HttpTarget(server.url, concurrency=16)
        clean = accuracy(target, xs, ys)
        x_adv, used = square_attack(
            target.predict_proba, xs, ys, eps=0.25, queries=40, generator=torch.Generator().manual_seed(0)
        )
        robust = accuracy(target, x_adv, ys)
        samples = metric_samples(server)
        seen = sum(
            v
            for (name, labels), v in samples.items()
            if name == "codedsmooth_requests_total"
            and ("status", "200") in labels
            and dict(labels)["endpoint"].endswith("/infer")
        )  # the client sends v2 binary tensors
    assert int(used.max()) <= 40
    assert seen == target.queries == 2 * len(xs) + int(used.sum())  # every query was one real request
    assert robust < clean


def test_cotenant_flips_labels_in_batch_scope_and_never_in_request_scope(tiny_checkpoint, tiny):
    ck, x, y, pool = tiny
    xs, ys = x[:40], y[:40]
    cfg = AttackConfig(
        attack="cotenant", steps=10, eot_samples=4, draws=1
    )  # crafting (twice, once per server) is most of the time
    rates = {}
    k = (
        ck.config.coding.k
    )  # a victim (1 item) and its attacker (K-1 items) fill a micro-batch of K: it runs at once, not after max_delay_ms
    for scope in ("batch", "request"):
        with running_server(
            tiny_checkpoint, rci_scope=scope, coded_points=16, rci_seed=3, max_delay_ms=150, max_batch_size=k
        ) as server:
            report = run_attack(cfg, ck, HttpTarget(server.url), xs, ys, pool)
        rates[scope] = report["cotenant"]["flip_rate"]
    assert rates["request"] == 0.0
    assert rates["batch"] > 0.0


def test_attack_cli_writes_report_and_plot(tiny_checkpoint, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "p.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedsmooth.cli",
            "attack",
            "--checkpoint",
            str(tiny_checkpoint),
            "--attack",
            "fgsm",
            "--threat",
            "transfer",
            "--eps",
            "0.05",
            "0.2",
            "--samples",
            "30",
            "--report",
            str(report),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert set(data["robust_accuracy"]) == {"0.05", "0.2"}
    assert data["robust_accuracy"]["0.2"] <= data["robust_accuracy"]["0.05"] <= data["clean_accuracy"]["target"]
    assert {"no_rci", "target"} <= set(data["clean_accuracy"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, "-m", "codedsmooth.cli", "attack", "--attack", "square", "--threat", "adaptive"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "threat 'blackbox'" in bad.stderr and "Traceback" not in bad.stderr


def _attack_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "codedsmooth.cli", "attack", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_registry_decides_each_attack_and_threat_pair():
    from codedsmooth.probe.attacks import ATTACKS, THREATS

    for name, cls in ATTACKS.items():
        for threat in THREATS:
            cfg = AttackConfig(attack=name, threat=threat)
            if threat in cls.threats:
                cfg.validate()
            else:
                with pytest.raises(ValueError, match=f"attack '{name}' needs {cls.needs}"):
                    cfg.validate()
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        AttackConfig(attack="nope").validate()


def test_apgd_is_a_deprecated_name_of_cascade(tiny_checkpoint):
    with pytest.warns(FutureWarning, match="'apgd' is deprecated.*use 'cascade'"):
        cfg = AttackConfig(attack="apgd")
    assert cfg.attack == "cascade" and cfg.attack_class is ATTACKS["cascade"]
    cli = _attack_cli(
        "--checkpoint", str(tiny_checkpoint), "--attack", "apgd", "--threat", "blackbox", "--samples", "10"
    )
    assert (
        cli.returncode == 2
        and "FutureWarning: attack 'apgd' is deprecated" in cli.stderr
        and "needs gradients" in cli.stderr
    )


def test_attack_cli_errors_are_one_line(tiny_checkpoint):
    dead = _attack_cli(
        "--checkpoint", str(tiny_checkpoint), "--url", f"http://127.0.0.1:{free_port()}", "--samples", "10"
    )
    assert dead.returncode == 2 and "Traceback" not in dead.stderr
    assert dead.stderr.strip().count("\n") == 0 and "cannot reach a server at http://127.0.0.1:" in dead.stderr
    plot = _attack_cli(
        "--checkpoint", str(tiny_checkpoint), "--attack", "cotenant", "--plot", "p.png", "--samples", "10"
    )
    assert plot.returncode == 2 and "drop --plot" in plot.stderr and "Traceback" not in plot.stderr


def test_served_model_is_checked_against_the_attackers_copy(tiny, tiny_checkpoint, tmp_path, digits):
    ck, x, y, pool = tiny
    other = tmp_path / "other-seed"  # same architecture, method and data, so the same name; other weights
    train(
        TrainConfig(
            method="coded",
            epochs=1,
            width=8,
            batch_size=16,
            out=str(other),
            progress=False,
            seed=7,
            filler_size=32,
            max_steps=3,
        ),
        data=digits,
    )
    with running_server(tiny_checkpoint) as server:
        target = HttpTarget(server.url)
        same = check_served_model(ck, target, x, given=True)
        assert same["agreement"] == 1.0 and same["items"] == 32
        with pytest.raises(ValueError, match="other weights under the same name"):
            check_served_model(load_checkpoint(other), target, x, given=True)
        target.close()
        embedded = _attack_cli(
            "--url", server.url, "--samples", "10"
        )  # no --checkpoint: the embedded model, another name
    assert (
        embedded.returncode == 2
        and "the embedded default checkpoint" in embedded.stderr
        and "Traceback" not in embedded.stderr
    )


def test_adaptive_square_over_http_counts_every_query_against_noise_and_rci_servers(tiny, tiny_checkpoint):
    ck, x, y, pool = tiny
    xs, ys = x[:10], y[:10]
    for setting in ("noise", "request"):
        with running_server(tiny_checkpoint, **serve_options(setting, 0.1)) as server:
            per_request = 1 if setting == "request" else 128
            target = HttpTarget(server.url, items_per_request=per_request)
            assert is_randomized(target)  # the noise server says nothing of its noise; two answers to one input differ
            before = target.queries
            res = query_attack(target, xs, ys, eps=0.3, budget=40, score_queries=2, confirm=2, seed=0)
            samples = metric_samples(server)
            requests = sum(
                v
                for (name, labels), v in samples.items()
                if name == "codedsmooth_requests_total"
                and ("status", "200") in labels
                and dict(labels)["endpoint"].endswith("/infer")
            )
            target.close()
            if setting == "request":  # a randomized server's items are never batched into one request
                with pytest.raises(ValueError, match="one-item requests"):
                    HttpTarget(server.url, items_per_request=8)
        assert (
            int(res["queries"].max()) <= 40
            and int(res["queries"].sum()) == res["queries_sent"] == target.queries - before
        )
        assert float((res["x_adv"] - xs).abs().max()) <= 0.3 + 1e-6
        if setting == "request":
            assert requests == target.queries  # against RCI every query is its own one-item request
        else:
            assert requests < target.queries  # items answered independently go several to a request


def test_repository_targets_answer_as_one_server_of_each_setting_does(tiny, tiny_checkpoint):
    """The report's black-box targets: one repository server holding the model once per setting. Plain answers
    equal a single plain server's; the noise and RCI models are randomized, and RCI is on only where asked."""
    ck, x, y, pool = tiny
    xs = torch.cat([x, x.flip(0)])[
        :100
    ]  # more than a server's default items per request (the plain and noise targets send up to 128 per request)
    assert len(xs) == 100
    with repository_server(
        {"m-plain": (ck, "plain", 0.0), "m-noise": (ck, "noise", 0.1), "m-request": (ck, "request", 0.0)}
    ) as target:
        plain, noise, rci = target("m-plain"), target("m-noise"), target("m-request")
        assert target("m-plain") is plain
        from_repository = plain.predict_proba(xs)
        assert not plain.spec.enabled and not noise.spec.enabled and rci.spec.enabled and rci.spec.scope == "request"
        assert not is_randomized(plain) and is_randomized(noise) and is_randomized(rci)
    with running_server(tiny_checkpoint, **serve_options("plain", 0.0)) as server:
        single = HttpTarget(server.url, items_per_request=128)
        assert torch.allclose(single.predict_proba(xs), from_repository, atol=1e-6)
        single.close()


def test_attack_cli_targets_one_model_of_a_repository_server(tiny_checkpoint, tmp_path):
    """``attack --url --model``: the repository's model by its directory name, checked against --checkpoint by its answers."""
    repo = tmp_path / "repo"
    for name in ("first", "second"):
        (repo / name).mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copyfile(tiny_checkpoint / f, repo / name / f)
    (repo / "first" / "serving.json").write_text(json.dumps({"rci": False}))
    report = tmp_path / "attack.json"
    with local_server(None, model_repository=str(repo), threads=1) as server:
        unnamed = _attack_cli("--checkpoint", str(tiny_checkpoint), "--url", server.url, "--samples", "10")
        named = _attack_cli(
            "--checkpoint",
            str(tiny_checkpoint),
            "--url",
            server.url,
            "--model",
            "second",
            "--attack",
            "fgsm",
            "--threat",
            "transfer",
            "--eps",
            "0.1",
            "--samples",
            "10",
            "--report",
            str(report),
        )
        missing = _attack_cli(
            "--checkpoint", str(tiny_checkpoint), "--url", server.url, "--model", "third", "--samples", "10"
        )
    assert (
        unnamed.returncode == 2 and "pass --checkpoint with the served model" in unnamed.stderr
    )  # the directory name is not the checkpoint's
    assert named.returncode == 0, named.stderr
    data = json.loads(report.read_text())
    assert data["attacker_copy"]["served_as"] == "second" and data["attacker_copy"]["agreement"] == 1.0
    assert missing.returncode == 2 and "serves no model 'third'" in missing.stderr and "Traceback" not in missing.stderr
    alone = _attack_cli("--checkpoint", str(tiny_checkpoint), "--model", "second", "--samples", "10")
    assert alone.returncode == 2 and "give --url too" in alone.stderr
