"""``audit --surrogate``: the transfer attack from a local model against a real server. The server's verdict on each
sent adversarial is the in-process model's, every confirmation is a counted query (and a request the server saw),
and a surrogate that cannot serve is refused before any query."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from helpers import metric_samples, running_server

from codedsmooth.core import CodingSpec
from codedsmooth.models import load_checkpoint
from codedsmooth.models.card import RobustnessCard
from codedsmooth.probe.audit import AuditConfig, audit_command
from codedsmooth.probe.report.stages import transfer_source
from codedsmooth.probe.samples import balanced_order
from codedsmooth.probe.suite import SuiteConfig
from codedsmooth.probe.targets import RCIModel
from codedsmooth.train import as_float

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "card.schema.json"
SETTINGS = {"data": "digits", "images": 6, "eps": 0.3, "budget": 40, "chunk": 3, "progress": False}


def infer_requests(server) -> float:
    return sum(
        v
        for (name, labels), v in metric_samples(server).items()
        if name == "codedsmooth_requests_total" and "infer" in dict(labels).get("endpoint", "")
    )


def test_transfer_from_a_surrogate_is_confirmed_at_the_server_and_every_query_counted(
    tiny_checkpoint, digits, tmp_path
):
    card_path = tmp_path / "card.json"
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1) as server:
        before = infer_requests(server)
        card = audit_command(
            AuditConfig(
                url=server.url, card=str(card_path), attack=["transfer"], surrogate=str(tiny_checkpoint), **SETTINGS
            )
        )
        seen = infer_requests(server) - before
    body = json.loads(card_path.read_text())
    jsonschema.validate(body, json.loads(SCHEMA.read_text()))
    assert RobustnessCard.model_validate(body) == card
    assert card.audit is not None and card.audit.unfinished == []
    (transfer,) = card.measurements
    assert transfer.threat == "transfer" and "surrogate" in transfer.attack
    assert any("transfer surrogate" in n for n in card.notes)

    # the reference: the same adversarials (chunk by chunk, as the audit crafts them) scored by the plain model
    state = json.loads(card_path.with_name(card_path.name + ".state.json").read_text())
    ck = load_checkpoint(tiny_checkpoint)
    model = RCIModel(ck, CodingSpec.plain())
    idx = balanced_order(digits.test_y, 0)[:6]
    x, y = as_float(digits.test_x[idx]), digits.test_y[idx].long()
    todo = [i for i, c in enumerate(state["clean"]["correct"]) if c]
    broken = []
    for start in range(0, len(todo), SETTINGS["chunk"]):
        part = todo[start : start + SETTINGS["chunk"]]
        x_adv = transfer_source(SuiteConfig(seed=part[0]), ck, x[part], y[part], 0.3)
        with torch.no_grad():
            broken += (model(x_adv).argmax(1) != y[part]).tolist()
    done = state["attacks"]["transfer"]
    assert [done[str(i)]["broken"] for i in todo] == broken
    assert sum(broken) >= len(todo) // 2  # white-box adversarials of the served weights break most images
    # a deterministic server: a break costs its 4 confirmations, a miss the one query that saw the label
    assert [done[str(i)]["queries"] for i in todo] == [4 if b else 1 for b in broken]
    assert transfer.queries == 4 * sum(broken) + (len(todo) - sum(broken))
    assert transfer.robust_accuracy == pytest.approx((len(todo) - sum(broken)) / 6)
    t = card.audit.traffic
    assert t.queries == 2 * 6 + transfer.queries
    assert seen == t.requests == t.queries  # every query was one request the server answered


def test_a_surrogate_that_cannot_be_used_is_refused_before_any_query(tiny_checkpoint, tmp_path):
    given = AuditConfig(url="http://127.0.0.1:9", surrogate=str(tiny_checkpoint), attack=["square"])
    given.validate()
    assert given.attack == ["square", "transfer"]  # --surrogate adds the transfer attack
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1) as server:
        before = infer_requests(server)
        with pytest.raises(ValueError, match="needs --surrogate"):
            audit_command(AuditConfig(url=server.url, card=str(tmp_path / "a.json"), attack=["transfer"], **SETTINGS))
        with pytest.raises(ValueError, match=r"--surrogate .*nowhere"):
            audit_command(
                AuditConfig(
                    url=server.url, card=str(tmp_path / "b.json"), surrogate=str(tmp_path / "nowhere"), **SETTINGS
                )
            )
        assert infer_requests(server) == before
