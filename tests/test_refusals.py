"""Refuse before working, refusals the log cannot be flooded with, requests that can never fit, and an empty keys file.

One server in repository mode (two models) with a keys file serves the module; each client plays one
part (its own ``quota=`` keeps the parts apart). The emptied-file test puts the file back and waits
for the reload before it ends. Synchronised on state (metrics, answers, log lines), never on sleeps.
"""

import asyncio
import logging
import socket

import httpx
import numpy as np
import pytest
from helpers import LoggedServer, metric, wait_for_metric
from served import read_response, two_model_repository

from codedsmooth.service.access.control import Access
from codedsmooth.service.access.keys import add_key
from codedsmooth.service.access.limits import CounterKey, Counters, Limits
from codedsmooth.service.access.refusals import OTHERS, RefusalLog
from codedsmooth.service.errors import TooManyRequests
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.settings import ServeSettings

ITEM = np.full((1, 8, 8), 0.5).tolist()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    out = {
        "spent": add_key(path, "spent", quota="1"),  # uses its one item, then floods
        "thrifty": add_key(path, "thrifty", quota="3"),  # holds given back and settled
        "free": add_key(path, "free", quota="none"),  # malformed requests
    }
    return path, out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, keys, tmp_path_factory):
    root = two_model_repository(tmp_path_factory.mktemp("repository") / "models", tiny_checkpoint)
    srv = LoggedServer(
        None,
        model_repository=root,
        default_model="a",
        api_keys_file=keys[0],
        log_level="info",
        rci=False,
        max_delay_ms=1,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.terminate()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- refuse before working ---------------------------------------------------------


def test_an_exhausted_quota_gets_429_while_its_upload_is_still_being_sent(server, keys):
    """The 429 comes back before the client has sent its body: nothing of it was read, let alone decoded."""
    key = keys[1]["spent"]
    assert httpx.post(server.url + "/v1/predict", json={"inputs": [ITEM]}, headers=auth(key)).status_code == 200
    boundary = "flood"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
    length = 4 * 1024 * 1024  # declared; the test sends 64 KiB of it and keeps the rest back
    head = (
        f"POST /v1/predict/image HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + part + b"\x89PNG\r\n\x1a\n" + b"\0" * 65536)
        status, headers, body = read_response(sock)
    assert status == 429, body
    assert headers.get("connection") == "close" and int(headers["retry-after"]) > 0
    assert "quota of 1 items" in body.decode()
    assert metric(server, "codedsmooth_requests_total", endpoint="unmatched", status="408", model="") == 0
    # refused before routing, and still counted under the route it was aimed at
    wait_for_metric(
        server, "codedsmooth_requests_total", lambda v: v >= 1, endpoint="/v1/predict/image", status="429", model=""
    )
    server.wait_line("checked before reading the body")


def test_a_hold_is_given_back_when_the_body_is_refused_and_settled_when_it_is_charged(server, keys):
    key = keys[1]["thrifty"]
    with httpx.Client(base_url=server.url, headers=auth(key), timeout=30) as c:
        for _ in range(4):  # answered before any item is charged: each hold is given back
            assert (
                c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}).status_code
                == 400
            )
            assert c.post("/v1/models/nosuch/predict", json={"inputs": [ITEM]}).status_code == 404
        assert c.post("/v1/predict", json={"inputs": [ITEM, ITEM]}).status_code == 200
        over = c.post(
            "/v2/models/a/infer",
            json={"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 128}]},
        )
        assert (
            over.status_code == 429
            and "(1 left, 2 asked)" in over.json()["error"]
            and int(over.headers["retry-after"]) > 0
        )
        assert c.post("/v1/predict", json={"inputs": [ITEM]}).status_code == 200
        last = c.post("/v1/predict", json={"inputs": [ITEM]})
        assert last.status_code == 429 and "(0 left, 1 asked)" in last.json()["error"]
    assert metric(server, "codedsmooth_client_items_total", client="thrifty") == 3


def test_requests_refused_before_routing_are_counted_under_the_route_their_line_names(server):
    """401s answered on admission, before routing, over more distinct request lines than admission remembers the route
    of (it forgets them all when full): each is counted under the route its line names, an unknown path as unmatched."""
    from codedsmooth.service.http.admission import MAX_REMEMBERED

    def counts() -> tuple[float, float]:
        by_route = metric(
            server, "codedsmooth_requests_total", endpoint="/v1/models/{name}/predict", status="401", model=""
        )
        return by_route, metric(server, "codedsmooth_requests_total", endpoint="unmatched", status="401", model="")

    named, unmatched = counts()
    lines = MAX_REMEMBERED + 20
    with httpx.Client(base_url=server.url, headers=auth("not-a-key"), timeout=30) as c:
        for i in range(lines):
            assert c.post(f"/v1/models/m{i % (lines - 10)}/predict", json={}).status_code == 401
        for i in range(3):
            assert c.post(f"/v1/nowhere/{i}", json={}).status_code == 401
    route = {"endpoint": "/v1/models/{name}/predict", "status": "401", "model": ""}  # counted once answered: wait
    wait_for_metric(server, "codedsmooth_requests_total", lambda v: v >= named + lines, **route)
    wait_for_metric(
        server, "codedsmooth_requests_total", lambda v: v >= unmatched + 3, endpoint="unmatched", status="401", model=""
    )
    assert counts() == (named + lines, unmatched + 3)


# ---- a request that can never fit the rate limit's bucket ---------------------------


def test_a_request_larger_than_the_burst_never_fits_and_gets_no_retry_after(tmp_path):
    limits = Limits(rate=5.0, burst=8, quota=None, window_s=60.0)
    counters = Counters()
    for now in (0.0, 4.0, 3600.0):  # waiting never helps: no Retry-After loop
        decision = counters.charge(CounterKey("c"), 9, limits, now)
        assert not decision.allowed and decision.retry_after_s == 0 and "burst of 8 items" in decision.reason
    assert counters.charge(CounterKey("c"), 8, limits, 3600.0).allowed  # the full burst still fits

    path = tmp_path / "keys.txt"
    add_key(path, "big")
    settings = ServeSettings(api_keys_file=str(path), rate_limit=5.0, max_batch_size=8)
    access = Access(settings, Metrics(), lambda: (set(), set()))
    client = access.keys.table.clients[next(iter(access.keys.table.clients))]
    with pytest.raises(TooManyRequests) as info:
        asyncio.run(access.queue(client, 9, lambda: "queued"))
    assert info.value.status == 429 and "Retry-After" not in info.value.headers
    assert "burst of 8 items" in info.value.message and "do not retry it" in info.value.message
    assert asyncio.run(access.queue(client, 8, lambda: "queued")) == "queued"


# ---- refusals in the log ------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _refusal_log(**kwargs):
    logger = logging.getLogger(f"test.refusals.{id(kwargs)}")
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    clock = Clock()
    return RefusalLog(logger, interval_s=10.0, clock=clock, **kwargs), clock, handler.lines


def test_refusal_log_writes_one_line_per_sender_and_reason_per_interval_with_the_count():
    log, clock, lines = _refusal_log()
    calls = []
    for i in range(1000):
        clock.now = i * 0.01  # 1000 refusals in 10 s
        log.refused("peer 10.0.0.1", "400", lambda: calls.append(1) or "bad body (400)")
    assert (
        lines == ["refused peer 10.0.0.1: bad body (400)"] and len(calls) == 1
    )  # the detail is built for written lines only
    log.refused("peer 10.0.0.1", "431", "head too large (431)")  # another reason: its own line at once
    log.refused("client alice", "400", "bad body (400)")  # another sender: its own line at once
    assert len(lines) == 3
    clock.now = 10.0
    assert log.refused("peer 10.0.0.1", "400", "bad body (400)")
    assert lines[-1] == "refused peer 10.0.0.1: bad body (400); 999 more like it since the last line"
    clock.now = 15.0
    assert not log.refused("peer 10.0.0.1", "400", "bad body (400)")
    clock.now = 100.0
    assert log.refused("peer 10.0.0.1", "400", "bad body (400)")
    assert lines[-1] == "refused peer 10.0.0.1: bad body (400); 1 more like it since the last line"


def test_refusal_log_pools_senders_beyond_its_bound():
    log, clock, lines = _refusal_log(max_tracked=4)
    for i in range(100):  # 100 peers within one interval
        log.refused(f"peer 10.0.0.{i}", "400")
    assert len(lines) == 5 and lines[-1] == f"refused {OTHERS}: 400"  # 4 tracked, then the pool's one line
    assert len(log._pairs) == 5
    clock.now = 10.0  # the first four are quiet now: forgotten to make room
    log.refused("peer 10.0.1.1", "400")
    assert lines[-1] == "refused peer 10.0.1.1: 400" and len(log._pairs) <= 5


def test_300_malformed_requests_write_a_bounded_log(server, keys):
    key = keys[1]["free"]
    before = len(server.lines)
    rejected = {r: metric(server, "codedsmooth_rejected_total", reason=r) for r in ("bad_request", "invalid_input")}
    unmatched = metric(server, "codedsmooth_requests_total", endpoint="unmatched", status="400", model="")
    with httpx.Client(base_url=server.url, headers=auth(key), timeout=30) as c:
        for _ in range(100):
            assert (
                c.post("/v1/models/b/predict", content=b"[[[", headers={"content-type": "application/json"}).status_code
                == 400
            )
            assert (
                c.post(
                    "/v2/models/b/infer",
                    json={"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
                ).status_code
                == 422
            )
    for _ in range(100):  # not HTTP at all: the connection layer answers 400 and closes
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert read_response(sock)[0] == 400
    wait_for_metric(
        server, "codedsmooth_rejected_total", lambda v: v >= rejected["bad_request"] + 100, reason="bad_request"
    )
    wait_for_metric(
        server, "codedsmooth_rejected_total", lambda v: v >= rejected["invalid_input"] + 100, reason="invalid_input"
    )
    wait_for_metric(
        server,
        "codedsmooth_requests_total",
        lambda v: v >= unmatched + 100,
        endpoint="unmatched",
        status="400",
        model="",
    )
    # a last refusal after the 300, to know the log has caught up: its line is due (a reason new to this client)
    assert (
        httpx.post(
            server.url + "/v1/predict", content=b"{}", headers={**auth(key), "content-type": "text/plain"}
        ).status_code
        == 415
    )
    server.wait_line("refused client free: POST '/v1/predict'")
    new = server.lines[before:]
    refusals = [line for line in new if "refused " in line]
    assert len(new) <= 8, new
    assert any("refused client free" in line and "(400)" in line for line in refusals), new
    assert any("refused client free" in line and "(422)" in line for line in refusals), new
    assert any("refused peer 127.0.0.1" in line and "invalid HTTP request" in line for line in refusals), new
    assert not [line for line in new if "Traceback" in line or " ERROR " in line]


# ---- an empty keys file ---------------------------------------------------------------


def test_an_emptied_keys_file_fails_closed_says_so_and_is_logged(server, keys):
    path, out = keys
    original = path.read_text()
    empty = metric(server, "codedsmooth_api_keys_reloads_total", result="empty")
    ok = metric(server, "codedsmooth_api_keys_reloads_total", result="ok")
    path.write_text("# every client removed\n")
    try:
        wait_for_metric(server, "codedsmooth_api_keys_reloads_total", lambda v: v > empty, result="empty")
        r = httpx.get(server.url + "/v1/models", headers=auth(out["free"]))
        assert (
            r.status_code == 401
            and "no API keys loaded" in r.json()["error"]
            and r.headers["www-authenticate"].startswith("Bearer")
        )
        server.wait_line(f"keys file {path} holds no keys")
    finally:
        path.write_text(original)
        wait_for_metric(server, "codedsmooth_api_keys_reloads_total", lambda v: v > ok, result="ok")
    assert httpx.get(server.url + "/v1/models", headers=auth(out["free"])).status_code == 200
