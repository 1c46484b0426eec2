"""The probe's one HTTP transport: ``attack --url``'s target and the audit's endpoint send through the same
``HttpTransport``, so a rate-limited key's 429s are waited out, counted and sent again for both alike, and a
spent quota stops either at once."""

import time

import numpy as np
import pytest
import torch
from helpers import metric_samples, running_server

from codedsmooth.models import load_checkpoint
from codedsmooth.probe.endpoint import Endpoint, EndpointOptions
from codedsmooth.probe.targets import HttpTarget
from codedsmooth.probe.transport import HttpTransport
from codedsmooth.service.access.keys import add_key
from codedsmooth.train import as_float


def refused(server) -> float:
    return sum(
        v
        for (name, labels), v in metric_samples(server).items()
        if name == "codedsmooth_requests_total" and dict(labels).get("status") == "429"
    )


def test_attack_target_and_audit_endpoint_share_one_transport_and_its_429_handling(tiny_checkpoint, digits, tmp_path):
    keys = tmp_path / "keys.txt"
    attacker = add_key(keys, "attacker", rate="10", quota="none")  # a bucket of a few items: bursts meet 429s
    auditor = add_key(keys, "auditor", rate="10", quota="none")
    spent = add_key(keys, "spent", quota="1")  # one item a day: the second waits hours
    x = as_float(digits.test_x[:12])
    with torch.no_grad():
        want = torch.softmax(load_checkpoint(tiny_checkpoint).model.eval()(x), 1)
    with running_server(
        tiny_checkpoint, rci=False, max_delay_ms=1, api_keys_file=str(keys), max_batch_size=4
    ) as server:
        target = HttpTarget(server.url, api_key=attacker)
        endpoint = Endpoint(EndpointOptions(url=server.url, api_key=auditor, protocol="v2"))
        assert isinstance(target.endpoint.transport, HttpTransport) and isinstance(endpoint.transport, HttpTransport)
        got = {"attack": target.predict_proba(x), "audit": endpoint.predict_proba(x)}
        after = refused(server)
        counted = {
            "attack": target.endpoint.traffic,
            "audit": endpoint.traffic,
        }
        for name, probs in got.items():  # the same answers whichever client asked, 429s or not
            np.testing.assert_allclose(probs.numpy(), want.numpy(), atol=1e-5, err_msg=name)
            t = counted[name]
            assert t.queries == 12 and t.status[429] > 0, (name, t)
            assert t.requests == t.queries + t.status[429] and t.waited_s > 0  # each refusal waited out, sent again
        assert counted["attack"].status[429] + counted["audit"].status[429] == after  # every 429 the server sent
        target.close()
        endpoint.close()
        quota = HttpTarget(server.url, api_key=spent)
        quota.predict_proba(x[:1])
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="Retry-After"):
            quota.predict_proba(x[:1])  # a spent quota is raised at once, not waited out
        assert time.monotonic() - t0 < 10 and quota.endpoint.traffic.status[429] == 1
        quota.close()


@pytest.mark.parametrize("output", ["scores", "labels"])
def test_binary_tensors_read_as_the_json_answers_of_a_scores_and_a_labels_server(tiny_checkpoint, digits, output):
    """``audit --binary``: v2 binary tensors both ways (a labels server's BYTES label tensor included) give the JSON
    answers, which are the checkpoint's."""
    x = as_float(digits.test_x[:10])
    with torch.no_grad():
        want = load_checkpoint(tiny_checkpoint).model.eval()(x).argmax(1)
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1, output=output) as server:
        answers = {}
        for binary in (False, True):
            with Endpoint(EndpointOptions(url=server.url, protocol="v2", binary=binary)) as endpoint:
                answers[binary] = endpoint.predict_proba(x)
                assert endpoint.returns_scores == (output == "scores")
    np.testing.assert_allclose(answers[True].numpy(), answers[False].numpy(), atol=1e-6)
    assert torch.equal(answers[True].argmax(1), want)
