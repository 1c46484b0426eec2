"""``codedsmooth audit`` against real servers on free ports: the card validates against the published schema with
RCI off and on, clean accuracy matches an in-process evaluation on the same indices, mismatched requests stop
before any attack, 429 + Retry-After is waited out and counted, ``--resume`` queries nothing twice, and the
label-only RayS breaks a plain model over HTTP."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers import metric_samples, running_server

from codedsmooth.cli import main
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.audit import AuditCard, AuditConfig, audit_command, card_schema
from codedsmooth.probe.samples import balanced_order
from codedsmooth.service.access.keys import add_key
from codedsmooth.train import TrainConfig, as_float, train

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "audit-card.schema.json"
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


def validated(path: Path) -> AuditCard:
    body = json.loads(path.read_text())
    jsonschema.validate(body, json.loads(SCHEMA.read_text()))
    return AuditCard.model_validate(body)


def test_the_published_schema_is_the_card_models():
    assert json.loads(SCHEMA.read_text()) == card_schema()


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
    assert card.sample.indices == idx.tolist() and card.sample.labels == digits.test_y[idx].tolist()
    assert card.endpoint.randomized == rci and card.endpoint.returns == "scores"
    assert [a.name for a in card.attacks] == ["square", "decision"] and all(
        a.status == "complete" for a in card.attacks
    )
    clean = card.clean_accuracy.successes
    for a in card.attacks:
        assert a.attacked == clean and a.robust_accuracy is not None and a.robust_accuracy.successes + a.broken == clean
        assert a.queries_per_broken_image is not None and a.queries_per_broken_image.total <= SMALL["budget"] * clean
    assert card.traffic.queries == 2 * 6 + sum(
        a.queries_per_broken_image.total for a in card.attacks
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
    assert (
        card.traffic.status_429 > 0 and card.traffic.status_429 == refused
    )  # every 429 the server sent was met and counted
    assert card.traffic.waited_s > 0 and card.attacks[0].status == "complete"
    assert (
        card.traffic.requests == card.traffic.queries + card.traffic.status_429
    )  # each refused request was sent again


def test_resume_continues_after_the_cap_and_recomputes_nothing(plain_server, tmp_path):
    settings = {**SMALL, "url": plain_server.url, "card": str(tmp_path / "card.json")}
    first = audit_command(AuditConfig(max_queries=60, **settings))
    assert (
        first.attacks[0].status == "incomplete"
        and "--max-queries" in (first.attacks[0].reason or "")
        and first.traffic.queries <= 60
    )
    with pytest.raises(ValueError, match="--resume"):  # an earlier audit's state is never overwritten silently
        audit_command(AuditConfig(**settings))
    with pytest.raises(ValueError, match="budget differ"):
        audit_command(AuditConfig(resume=True, **{**settings, "budget": 41}))
    second = audit_command(AuditConfig(resume=True, **settings))
    assert all(a.status == "complete" for a in second.attacks)
    before = infer_requests(plain_server)
    third = audit_command(AuditConfig(resume=True, **settings))
    assert infer_requests(plain_server) == before  # nothing queried again
    assert third.traffic.queries == second.traffic.queries and third.attacks == second.attacks


def test_rays_over_http_breaks_a_plain_model_at_eps_0_3(digits, tmp_path):
    """The label-only attack's validation: an ERM model behind the server falls to about 0 % at ε = 0.3."""
    train(
        TrainConfig(method="erm", epochs=3, width=8, batch_size=16, out=str(tmp_path / "erm"), progress=False, seed=0),
        data=digits,
    )
    with running_server(tmp_path / "erm", rci=False, max_delay_ms=1) as server:
        card = audit_command(
            AuditConfig(
                url=server.url,
                card=str(tmp_path / "card.json"),
                attack=["decision"],
                output="label",
                **{**SMALL, "images": 10, "budget": 200},
            )
        )
    rays = card.attacks[0]
    assert card.endpoint.returns == "labels" and card.clean_accuracy.successes >= 8
    assert rays.status == "complete" and rays.robust_accuracy is not None and rays.robust_accuracy.successes <= 1
