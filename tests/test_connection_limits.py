"""The connection layer against a real server, over raw sockets: connection slots, header bounds,
the protocol's own answers, early 413s, and deadlines that count from a request's first byte.

Waits are on state (the open-connection gauge and counters on the metrics port, a socket closing),
never sleeps; every loop is bounded. Every test runs in both serving modes (one checkpoint, a repository
of two), one server per mode, which must log no error or traceback.
"""

import json
import select
import time

import httpx
import pytest
from helpers import metric, wait_for_metric
from served import MODES, closed_by_server, connect, is_json_error, metric_sum, read_response, rss_mb, served

LIMIT = 4
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 40
TIMEOUT_MS = 1500
HEADER_TIMEOUT_S = 5
ITEM = [[[0.5] * 8] * 8]
WEBSOCKET = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.fixture(scope="module", params=MODES)
def server(request, tiny_checkpoint, tmp_path_factory):
    with served(
        request.param,
        tiny_checkpoint,
        tmp_path_factory,
        max_connections=LIMIT,
        max_header_bytes=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
        timeout_ms=TIMEOUT_MS,
        header_timeout_s=HEADER_TIMEOUT_S,
        max_body_bytes=1024 * 1024,
    ) as srv:
        yield srv


def _connect(srv):
    return connect(srv, timeout=10)


def _all_closed(srv) -> None:
    wait_for_metric(srv, "codedsmooth_open_connections", lambda v: v == 0, timeout=20)


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


# ---- protocol upgrades and the protocol's own answers ----------------------------------------


def test_upgrade_requests_are_answered_as_http_and_hold_no_slot_after_closing(server):
    for _ in range(3 * LIMIT):  # more than the slots: each must be released when its socket closes
        with _connect(server) as sock:
            sock.sendall(_get("/ws", WEBSOCKET))
            status, headers, body = read_response(sock)
            assert status == 404 and is_json_error(headers, body), (status, headers, body)
            assert headers.get("connection", "").lower() == "close"
            assert closed_by_server(sock)
    with _connect(server) as sock:  # a route that exists: answered as plain HTTP/1.1, then closed
        sock.sendall(_get("/health/live", WEBSOCKET))
        status, headers, body = read_response(sock)
        assert status == 200 and json.loads(body) and headers.get("connection", "").lower() == "close"
        assert closed_by_server(sock)
    _all_closed(server)
    assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200


def test_malformed_http_gets_the_json_error_body(server):
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"GET /\x01 HTTP/1.1\r\n\r\n"):
        with _connect(server) as sock:
            sock.sendall(raw)
            status, headers, body = read_response(sock)
            assert status == 400 and is_json_error(headers, body), (raw, status, headers, body)
            assert closed_by_server(sock)
    assert metric_sum(server, "codedsmooth_requests_total", endpoint="unmatched", status="400") >= 3


def test_answers_do_not_name_the_server_software(server):
    r = httpx.get(server.url + "/health/live", timeout=10)
    assert r.status_code == 200 and "server" not in r.headers and "date" in r.headers


# ---- header bounds ----------------------------------------------------------------------------


def test_a_head_over_the_byte_limit_gets_431_before_it_ends(server):
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"  # fewer fields than the limit: the bytes run out first
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + line * (
        MAX_HEADER_BYTES // len(line) + 1
    )  # no blank line: unfinished
    with _connect(server) as sock:
        sock.sendall(head)
        status, headers, body = read_response(sock)
        assert status == 431 and is_json_error(headers, body) and "bytes" in json.loads(body)["error"]
        assert headers.get("connection", "").lower() == "close"
        assert closed_by_server(sock)


def test_an_endless_header_block_is_cut_off_with_memory_flat(server):
    pid = server.proc.pid
    before = rss_mb(pid)
    batch = (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 64  # 64 KiB of header lines a send
    sent, answer = 0, None
    with _connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        while sent < 64 * 1024 * 1024 and answer is None:  # what the attacker would send; the server must stop it first
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                answer = read_response(sock)
            elif writable:
                try:
                    sent += sock.send(batch)
                except OSError:  # closed by the server: its answer is in the receive buffer
                    answer = read_response(sock)
    grown = rss_mb(pid) - before
    print(
        f"endless headers: answered {answer[0] if answer else None} after {sent / 1e6:.1f} MB sent (socket buffers included); RSS +{grown:.0f} MB"
    )
    assert answer is not None and answer[0] == 431, sent
    assert grown < 30


def test_too_many_header_fields_get_431(server):
    fields = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS - 1))  # with Host: exactly the limit
    with _connect(server) as sock:
        sock.sendall(_get("/health/live", fields))
        status, _, _ = read_response(sock)
        assert status == 200
        sock.sendall(_get("/health/live", fields + "X-One-More: v\r\n"))  # same connection
        status, headers, body = read_response(sock)
        assert status == 431 and is_json_error(headers, body) and "header fields" in json.loads(body)["error"]
        assert closed_by_server(sock)
    assert metric_sum(server, "codedsmooth_requests_total", endpoint="unmatched", status="431") >= 1


def test_ten_thousand_header_fields_get_431(server):
    fields = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    with _connect(server) as sock:
        try:
            sock.sendall(_get("/health/live", fields))
        except OSError:
            pass  # the server closed after answering; the answer is in the receive buffer
        status, headers, body = read_response(sock)
        assert status == 431 and is_json_error(headers, body)
        assert closed_by_server(sock)


def test_one_huge_header_value_gets_431(server):
    with _connect(server) as sock:
        try:
            sock.sendall(_get("/health/live", "X-Big: " + "a" * (1 << 20) + "\r\n"))
        except OSError:
            pass  # the server closed after answering; the answer is in the receive buffer
        status, headers, body = read_response(sock)
        assert status == 431 and is_json_error(headers, body)


# ---- connection slots -------------------------------------------------------------------------


def test_idle_connections_give_way_and_an_admitted_connection_keeps_its_slot(server):
    _all_closed(server)
    evicted = metric(server, "codedsmooth_idle_connections_closed_total")
    keep = _connect(server)
    silent = []
    try:
        keep.sendall(_get("/health/live"))
        assert read_response(keep)[0] == 200  # a keep-alive client, admitted
        silent = [_connect(server) for _ in range(LIMIT)]  # sockets that send nothing: the last one gets no slot
        wait_for_metric(server, "codedsmooth_open_connections", lambda v: v == LIMIT + 1)
        assert metric(server, "codedsmooth_idle_connections_closed_total") == evicted  # silent sockets displace nobody
        keep.sendall(_get("/health/live"))
        status, headers, _ = read_response(keep)
        assert status == 200 and headers.get("connection", "").lower() != "close"  # the admitted client kept its slot
        for _ in range(2 * LIMIT):  # fresh clients get in, each in the slot of the longest-idle silent socket
            assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
        assert metric(server, "codedsmooth_idle_connections_closed_total") - evicted >= 1
        assert closed_by_server(silent[0])
    finally:
        keep.close()
        for s in silent:
            s.close()
    _all_closed(server)


def test_silent_sockets_at_the_hard_limit_make_room_for_fresh_clients(server):
    """At 2 N + 16 open sockets a newcomer closes the oldest silent one instead of being refused."""
    _all_closed(server)
    hard = 2 * LIMIT + 16
    silent = [_connect(server) for _ in range(hard)]
    try:
        wait_for_metric(server, "codedsmooth_open_connections", lambda v: v == hard)
        for _ in range(3):  # fresh clients and health checks still get in
            assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
        assert closed_by_server(silent[0])  # the oldest silent socket made room
    finally:
        for s in silent:
            s.close()
    _all_closed(server)


def test_a_new_connection_gets_503_when_every_slot_has_a_request_in_the_app(server):
    _all_closed(server)
    refused = metric(server, "codedsmooth_rejected_total", reason="connections")
    busy = []
    try:
        for _ in range(LIMIT):  # requests waiting for their bodies: in the app, their connections are not idle
            s = _connect(server)
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            busy.append(s)
        wait_for_metric(server, "codedsmooth_requests_in_flight", lambda v: v == LIMIT)
        r = httpx.get(server.url + "/health/live", timeout=10)
        assert r.status_code == 503 and r.headers.get("retry-after") and "connections" in r.json()["error"]
        assert r.headers.get("connection", "").lower() == "close"
        assert metric(server, "codedsmooth_rejected_total", reason="connections") - refused == 1
    finally:
        for s in busy:
            s.close()
    _all_closed(server)
    assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200


# ---- bodies over the limit -------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_413_closes_the_connection_and_the_rest_is_not_read(server, framing):
    limit = 1024 * 1024
    with _connect(server) as sock:
        if framing == "content-length":
            sock.sendall(
                f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {8 * limit}\r\n\r\n".encode()
                + b" " * 1000
            )
        else:
            chunk = b" " * 65536
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(limit // len(chunk) + 2):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, headers, body = read_response(sock)
        assert status == 413 and is_json_error(headers, body)
        assert headers.get("connection", "").lower() == "close"
        assert closed_by_server(sock, timeout=3)  # not after the body or header timeout


# ---- deadlines ---------------------------------------------------------------------------------


def test_the_deadline_counts_from_the_requests_first_byte(server):
    """A request whose headers took longer than --timeout-ms is past its deadline when it reaches the app."""
    body = json.dumps({"inputs": [ITEM]}).encode()
    with _connect(server) as sock, _connect(server) as clock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        first_byte = time.monotonic()
        # The server's own clock: a request begun after this one's first byte, whose body never comes, is answered 408 once
        # its deadline has passed; by then this request's earlier deadline has passed too.
        clock.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        clock_status, _, _ = read_response(clock)
        paused = time.monotonic() - first_byte
        assert clock_status == 408, clock_status
        sock.sendall(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status, headers, answer = read_response(sock)
    assert TIMEOUT_MS / 1000 < paused < HEADER_TIMEOUT_S, paused
    assert status == 408 and is_json_error(headers, answer), (status, answer)
    # the same request sent at once is answered
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [ITEM]}, timeout=10)
    assert r.status_code == 200, r.text
