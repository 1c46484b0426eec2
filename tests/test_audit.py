"""``codedsmooth audit`` against real servers on free ports: the card validates against the published schema with
RCI off and on, clean accuracy matches an in-process evaluation on the same indices, mismatched requests stop
before any attack, 429 + Retry-After is waited out and counted, ``--resume`` queries nothing twice, and the
label-only RayS breaks a plain model over HTTP."""

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers import metric_samples, running_server

from codedsmooth.cli import main
from codedsmooth.models import load_checkpoint
from codedsmooth.models.card import RobustnessCard
from codedsmooth.probe.audit import AuditConfig, audit_command
from codedsmooth.probe.audit.run import write_checkpoint_card
from codedsmooth.probe.samples import balanced_order
from codedsmooth.service.access.keys import add_key
from codedsmooth.train import as_float

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "card.schema.json"
SMALL = {"data": "digits", "images": 6, "eps": 0.3, "budget": 40, "chunk": 3, "progress": False}


@pytest.fixture(scope="module")
def plain_server(tiny_checkpoint):
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1) as server:
        yield server


def infer_requests(server) -> float:
    """Inference requests the server has answered (v2 infer, any status), read from its metrics."""
    return sum(
        v
        for (name, labels), v in metric_samples(server).items()
        if name == "codedsmooth_requests_total" and "infer" in dict(labels).get("endpoint", "")
    )


def validated(path: Path) -> RobustnessCard:
    body = json.loads(path.read_text())
    jsonschema.validate(body, json.loads(SCHEMA.read_text()))
    return RobustnessCard.model_validate(body)


def traffic(card: RobustnessCard):
    assert card.audit is not None
    return card.audit.traffic


def measured(card: RobustnessCard, name: str):
    """The card's measurement of the audit's attack ``name`` (None when it has none)."""
    return next((m for m in card.measurements if m.attack.startswith(name + ":")), None)


@pytest.mark.parametrize("rci", [False, True])
def test_audit_writes_a_valid_card_and_its_clean_accuracy_is_the_checkpoints(
    tiny_checkpoint, digits, tmp_path, rci, request
):
    def run(server):
        return audit_command(
            AuditConfig(url=server.url, card=str(tmp_path / "card.json"), **SMALL), "codedsmooth audit (test)"
        )

    if rci:
        with running_server(tiny_checkpoint, rci=True, max_delay_ms=1) as server:
            card = run(server)
    else:
        card = run(request.getfixturevalue("plain_server"))

    written = validated(tmp_path / "card.json")
    assert written == card and (tmp_path / "card.md").read_text().startswith("# Robustness audit")
    idx = balanced_order(digits.test_y, 0)[:6]
    assert card.source == "audit" and card.samples == {"audit": idx.tolist()} and card.eps == [0.3]
    assert (
        card.model.randomized == rci
        and card.output == "scores"
        and (card.model.url or "").startswith("http://127.0.0.1:")
    )
    assert card.audit is not None and card.audit.unfinished == []
    attacks = [m.attack for m in card.measurements]
    assert attacks[0].startswith("square: ") and attacks[1].startswith("decision: ")
    assert attacks[2] == "worst case per image of: square, decision"
    assert [m.threat for m in card.measurements] == ["score-based", "decision-based", "score-based"]
    assert card.clean_accuracy is not None
    clean = round(card.clean_accuracy * 6)
    for m in card.measurements[:2]:
        assert m.n == 6 and m.robust_accuracy <= clean / 6 and m.interval[0] <= m.robust_accuracy <= m.interval[1]
        assert m.queries is not None and m.queries <= SMALL["budget"] * clean
    worst = card.measurements[2]
    assert worst.robust_accuracy <= min(m.robust_accuracy for m in card.measurements[:2])
    assert traffic(card).queries == 2 * 6 + sum(
        m.queries or 0 for m in card.measurements[:2]
    )  # two clean draws, then the attacks
    if not rci:  # the served function is the checkpoint's: the same answers on the same indices
        with torch.no_grad():
            mine = load_checkpoint(tiny_checkpoint).model.eval()(as_float(digits.test_x[idx])).argmax(1)
        assert clean == int((mine == digits.test_y[idx]).sum())


def test_a_wrong_pixel_scale_is_refused_with_a_message_naming_it(plain_server, tmp_path):
    with pytest.raises(ValueError, match=r"refused.*--pixel-scale \(sent pixels in \[0, 255\]\)"):
        audit_command(AuditConfig(url=plain_server.url, card=str(tmp_path / "c.json"), pixel_scale=255.0, **SMALL))
    assert not (tmp_path / "c.json").exists()


def test_a_wrong_layout_is_refused_with_a_message_naming_it(plain_server, tmp_path):
    with pytest.raises(ValueError, match=r"refused.*--layout \(sent flat"):
        audit_command(AuditConfig(url=plain_server.url, card=str(tmp_path / "c.json"), layout="flat", **SMALL))


def test_a_wrong_class_order_is_near_chance_and_named(plain_server, tmp_path):
    settings = {**SMALL, "images": 20}
    before = infer_requests(plain_server)
    with pytest.raises(ValueError, match=r"near chance.*class order is the likely mismatch"):
        audit_command(
            AuditConfig(
                url=plain_server.url,
                card=str(tmp_path / "c.json"),
                class_order=[(i + 1) % 10 for i in range(10)],
                **settings,
            )
        )
    assert infer_requests(plain_server) - before == 2 * 20  # the clean pass only: no attack ran


def test_the_cli_reports_a_mismatch_as_an_error_not_a_traceback(plain_server, tmp_path, capsys):
    code = main(
        [
            "audit",
            "--url",
            plain_server.url,
            "--data",
            "digits",
            "--images",
            "4",
            "--pixel-scale",
            "255",
            "--no-progress",
            "--card",
            str(tmp_path / "c.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("codedsmooth audit: error: the endpoint refused") and "Traceback" not in err


def test_429_with_retry_after_is_waited_out_counted_and_reported(tiny_checkpoint, tmp_path):
    keys = tmp_path / "keys.txt"
    key = add_key(
        keys, "auditor", rate="10", quota="none"
    )  # a bucket of 4 items: the 8 concurrent clean queries meet 429s
    with running_server(
        tiny_checkpoint, rci=False, max_delay_ms=1, api_keys_file=str(keys), max_batch_size=4
    ) as server:
        card = audit_command(
            AuditConfig(
                url=server.url,
                api_key=key,
                card=str(tmp_path / "card.json"),
                attack=["decision"],
                **{**SMALL, "images": 4, "budget": 20},
            )
        )
        refused = sum(
            v
            for (name, labels), v in metric_samples(server).items()
            if name == "codedsmooth_requests_total" and dict(labels).get("status") == "429"
        )
    validated(tmp_path / "card.json")
    t = traffic(card)
    assert t.status_429 > 0 and t.status_429 == refused  # every 429 the server sent was met and counted
    assert card.rate_limited == t.status_429 + t.status_503
    assert t.waited_s > 0 and measured(card, "decision") is not None
    assert t.requests == t.queries + t.status_429  # each refused request was sent again


def test_resume_continues_after_the_cap_and_recomputes_nothing(plain_server, tmp_path):
    settings = {**SMALL, "url": plain_server.url, "card": str(tmp_path / "card.json")}
    first = audit_command(AuditConfig(max_queries=60, **settings))
    assert first.audit is not None and first.measurements == []
    (square, decision) = first.audit.unfinished  # the cap stops the audit: no attack has a number
    assert square.status == "incomplete" and "--max-queries" in square.reason and traffic(first).queries <= 60
    assert decision.status == "incomplete" and decision.attacked == 0
    validated(tmp_path / "card.json")
    with pytest.raises(ValueError, match="--resume"):  # an earlier audit's state is never overwritten silently
        audit_command(AuditConfig(**settings))
    with pytest.raises(ValueError, match="budget differ"):
        audit_command(AuditConfig(resume=True, **{**settings, "budget": 41}))
    second = audit_command(AuditConfig(resume=True, **settings))
    assert second.audit is not None and second.audit.unfinished == [] and len(second.measurements) == 3
    before = infer_requests(plain_server)
    third = audit_command(AuditConfig(resume=True, **settings))
    assert infer_requests(plain_server) == before  # nothing queried again
    assert traffic(third).queries == traffic(second).queries and third.measurements == second.measurements


def test_rays_over_http_breaks_a_plain_model_at_eps_0_3(plain_erm_checkpoint, tmp_path):
    """The label-only attack's validation: an ERM model behind the server falls to about 0 % at ε = 0.3."""
    with running_server(plain_erm_checkpoint, rci=False, max_delay_ms=1) as server:
        card = audit_command(
            AuditConfig(
                url=server.url,
                card=str(tmp_path / "card.json"),
                attack=["decision"],
                output="label",
                **{**SMALL, "images": 10, "budget": 200},
            )
        )
    rays = measured(card, "decision")
    assert card.output == "labels" and card.clean_accuracy is not None and card.clean_accuracy >= 0.8
    assert rays is not None and rays.threat == "decision-based" and rays.robust_accuracy <= 0.1


def test_write_card_puts_a_valid_card_into_a_checkpoint_that_a_server_then_serves(
    plain_server, tiny_checkpoint, tmp_path
):
    import shutil

    import httpx

    target = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, target)
    settings = {**SMALL, "images": 4, "budget": 20, "attack": ["decision"], "url": plain_server.url}
    before = infer_requests(plain_server)
    with pytest.raises(ValueError, match=r"--write-card .*not a checkpoint directory"):
        audit_command(AuditConfig(card=str(tmp_path / "x.json"), write_card=str(tmp_path), **settings))
    assert infer_requests(plain_server) == before  # refused before any query
    card = audit_command(AuditConfig(card=str(tmp_path / "card.json"), write_card=str(target), **settings))
    written = validated(target / "robustness.json")
    assert written == card and written.source == "audit"
    assert card.model.sha256 == hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    with open(other / "model.safetensors", "ab") as f:
        f.write(b" ")  # other weights: a card never goes into a checkpoint it did not measure
    with pytest.raises(ValueError, match="describes other weights"):
        write_checkpoint_card(card, other)
    assert not (other / "robustness.json").exists()
    with running_server(target, rci=False, max_delay_ms=1) as server:
        (info,) = httpx.get(server.url + "/v1/models").json()
        r = httpx.get(f"{server.url}/v1/models/{info['name']}/card")
        assert r.status_code == 200 and RobustnessCard.model_validate(r.json()) == card
        assert info["card"]["source"] == "audit" and info["card"]["worst_case"][0]["eps"] == 0.3


def test_the_cli_writes_the_card_its_markdown_and_plot_and_prints_a_summary(plain_server, tmp_path, capsys):
    argv = ["audit", "--url", plain_server.url, "--data", "digits", "--images", "4", "--budget", "20"]
    argv += [
        "--attack",
        "decision",
        "--no-progress",
        "--card",
        str(tmp_path / "c.json"),
        "--plot",
        str(tmp_path / "c.png"),
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    card = validated(tmp_path / "c.json")
    assert summary["clean_accuracy"] == card.clean_accuracy and summary["queries"] == traffic(card).queries
    assert list(summary["attacks"]) == [m.attack for m in card.measurements]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "c.md").read_text()
    assert card.measurements[0].attack in md and card.command.startswith("codedsmooth audit --url")
