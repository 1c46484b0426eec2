"""Hostile clients against a real server: image bombs, v2 leniencies, 500s, slow and disconnecting
clients (raw sockets), the metrics port; in both serving modes (one checkpoint, a repository of two),
each with one server per module that must log no error or traceback.

Every wait is on state (gauges and counters on the metrics port, the socket closing), never a sleep.
The slow clients pace their own bytes, as a slow client does; the test never sleeps to wait for the server.
"""

import io
import json
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from helpers import wait_for_metric, wait_until
from PIL import Image
from served import MODES, connect, metric_sum, no_500s, read_response, rss_mb, served

GOOD_ITEM = np.full((1, 8, 8), 0.5).tolist()
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 2.0


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height zero pixels: tens of KB on the wire, width*height bytes decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    parts, step = [], 256
    for start in range(0, height, step):
        parts.append(comp.compress(row * min(step, height - start)))
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def png_raising_syntax_error() -> bytes:
    """A PNG whose header is fine but whose second data chunk has an invalid type: Pillow raises SyntaxError on load."""
    z = zlib.compress(b"".join(b"\0" + bytes(range(64)) for _ in range(64)))
    half = len(z) // 2
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", z[:half])
        + _chunk(b"I\x00AT", z[half:])
        + _chunk(b"IEND", b"")
    )


def png(width=8, height=8, value=128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=MODES)
def server(request, tiny_checkpoint, tmp_path_factory):
    settings = dict(body_timeout_s=BODY_TIMEOUT_S, header_timeout_s=HEADER_TIMEOUT_S, max_body_bytes=8 * 1024 * 1024)
    with served(request.param, tiny_checkpoint, tmp_path_factory, **settings) as srv:
        srv.model = httpx.get(srv.url + "/v1/models").json()[0]["name"]
        yield srv


def _status_count(srv, status: int, endpoint: str) -> float:
    return metric_sum(srv, "codedsmooth_requests_total", endpoint=endpoint, status=str(status))


# ---- raw HTTP over a socket ----------------------------------------------------


def _raw_post(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: test",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---- image bombs -----------------------------------------------------------------


def test_image_bombs_are_refused_from_the_header_before_decoding(server):
    bomb = png_bomb(13000, 13000)  # 169 megapixels
    assert len(bomb) < 300_000
    files = [("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(8)]
    before = rss_mb(server.proc.pid)
    result: dict = {}

    def send():
        start = time.monotonic()
        result["response"] = httpx.post(server.url + "/v1/predict/image", files=files, timeout=60)
        result["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=send)
    sender.start()
    live_latencies, peak = [], before
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while sender.is_alive() or not live_latencies:
            start = time.monotonic()
            assert client.get("/health/live").status_code == 200
            live_latencies.append(time.monotonic() - start)
            peak = max(peak, rss_mb(server.proc.pid))
    sender.join()
    r = result["response"]
    print(
        f"8 bombs of 13000x13000: {r.status_code} in {result['seconds']:.2f}s; /health/live max {max(live_latencies) * 1e3:.0f} ms; RSS {before:.0f} -> peak {peak:.0f} MB"
    )
    assert r.status_code == 413, r.text
    assert "pixels" in r.json()["error"]
    assert peak - before < 60  # decoding one of them alone would take 169 MB
    assert max(live_latencies) < 2.0  # the event loop never decodes (it took 2.9 s with 8 bombs before)


def test_an_image_within_the_pixel_limit_is_decoded_off_the_event_loop(server):
    big = png(2048, 2048, 200)  # 4.2 megapixels, the default limit
    r = httpx.post(server.url + "/v1/predict/image", files=[("files", ("big.png", big, "image/png"))], timeout=60)
    assert r.status_code == 200, r.text


def test_broken_images_get_422_never_500(server):
    cases = {
        "SyntaxError inside Pillow": png_raising_syntax_error(),
        "truncated": png()[:40],
        "gif": b"GIF89a" + b"\0" * 20,
        "zero bytes": b"",
        "bmp header": b"BM" + b"\0" * 60,
    }
    for name, data in cases.items():
        r = httpx.post(server.url + "/v1/predict/image", files=[("files", ("x.png", data, "image/png"))], timeout=30)
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert "cannot be decoded" in r.json()["error"], name
    no_500s(server)


def test_more_files_than_max_batch_size_get_413(server):
    for count in (33, 65):  # max batch size 32 caps the files per request
        files = [("files", (f"{i}.png", png(), "image/png")) for i in range(count)]
        r = httpx.post(server.url + "/v1/predict/image", files=files, timeout=30)
        assert r.status_code == 413, (count, r.text)
    files = [("files", (f"{i}.png", png(), "image/png")) for i in range(32)]
    assert httpx.post(server.url + "/v1/predict/image", files=files, timeout=30).status_code == 200


def test_items_per_request_are_capped_at_max_batch_size(server):
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [GOOD_ITEM] * 33}, timeout=30)
    assert r.status_code == 413 and "at most 32" in r.json()["error"]
    r = httpx.post(server.url + "/v1/predict", json={"inputs": [GOOD_ITEM] * 32}, timeout=30)
    assert r.status_code == 200
    # no device batch ever held more than max batch size items
    count = metric_sum(server, "codedsmooth_batch_size_count")
    assert count > 0 and metric_sum(server, "codedsmooth_batch_size_bucket", le="32.0") == count


# ---- v2 leniencies and 500s ------------------------------------------------------------


def _v2_input(shape=(1, 1, 8, 8), name="input", **extra):
    data = [0.5] * int(np.prod(shape)) if "data" not in extra and "parameters" not in extra else extra.pop("data", None)
    body = {"name": name, "shape": list(shape), "datatype": "FP32", **extra}
    if data is not None:
        body["data"] = data
    return body


def _binary_request(trailing: bytes = b"", size_delta: int = 0, header_length: str | None = None):
    payload = np.full(64, 0.5, dtype=np.float32).tobytes()
    head = json.dumps({"inputs": [_v2_input(parameters={"binary_data_size": len(payload) + size_delta})]}).encode()
    return head + payload + trailing, {"inference-header-content-length": header_length or str(len(head))}


V2_REFUSED = [
    ("binary_data_output as string", 422, {"inputs": [_v2_input()], "parameters": {"binary_data_output": "false"}}),
    (
        "binary_data output param as string",
        422,
        {"inputs": [_v2_input()], "outputs": [{"name": "index", "parameters": {"binary_data": "no"}}]},
    ),
    ("wrong input name", 422, {"inputs": [_v2_input(name="images")]}),
    ("boolean in shape", 422, {"inputs": [_v2_input(shape=(True, 1, 8, 8), data=[0.5] * 64)]}),
    ("float in shape", 422, {"inputs": [_v2_input(shape=(1.0, 1, 8, 8), data=[0.5] * 64)]}),
    ("boolean in data", 422, {"inputs": [_v2_input(data=[0.5] * 63 + [True])]}),
    ("all booleans in data", 422, {"inputs": [_v2_input(data=[False] * 64)]}),
    ("shape overflows int64", 422, {"inputs": [_v2_input(shape=(2**32, 2**32, 1, 1), data=[0.5])]}),
    ("shape beyond int64", 422, {"inputs": [_v2_input(shape=(2**70, 1, 8, 8), data=[0.5])]}),
    ("huge item count", 413, {"inputs": [_v2_input(shape=(10**6, 1, 8, 8), data=[0.5])]}),
    ("zero items", 422, {"inputs": [_v2_input(shape=(0, 1, 8, 8), data=[])]}),
]


@pytest.mark.parametrize("name,status,body", V2_REFUSED, ids=[c[0] for c in V2_REFUSED])
def test_v2_refuses_what_the_protocol_does_not_allow(server, name, status, body):
    r = httpx.post(f"{server.url}/v2/models/{server.model}/infer", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("trailing bytes after the declared binary data", {"trailing": b"\0\0\0\0"}),
        ("binary_data_size short of the bytes sent", {"size_delta": -4}),
        ("header length with underscores", {"header_length": "3_0_1"}),
        ("header length with a sign", {"header_length": "+301"}),
        ("header length in hex", {"header_length": "0x12d"}),
        ("header length with spaces inside", {"header_length": "30 1"}),
    ],
)
def test_v2_binary_framing_is_exact(server, name, kwargs):
    body, headers = _binary_request(**kwargs)
    r = httpx.post(f"{server.url}/v2/models/{server.model}/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, (name, r.text)


def test_binary_bytes_without_any_binary_input_are_refused(server):
    head = json.dumps({"inputs": [_v2_input()]}).encode()
    r = httpx.post(
        f"{server.url}/v2/models/{server.model}/infer",
        content=head + b"junk",
        headers={"inference-header-content-length": str(len(head))},
    )
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


def test_binary_data_output_false_is_read_as_false(server):
    body = {"inputs": [_v2_input()], "parameters": {"binary_data_output": False}}
    r = httpx.post(f"{server.url}/v2/models/{server.model}/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert all("data" in o for o in r.json()["outputs"])


def test_a_refused_request_leaves_the_keep_alive_connection_usable(server):
    overflow = json.dumps({"inputs": [_v2_input(shape=(2**32, 2**32, 1, 1), data=[0.5])]}).encode()
    good = json.dumps({"inputs": [GOOD_ITEM]}).encode()
    with connect(server) as sock:
        sock.sendall(_raw_post(f"/v2/models/{server.model}/infer", overflow, {"Content-Type": "application/json"}))
        status, headers, _ = read_response(sock)
        assert status == 422 and headers.get("connection", "").lower() != "close"
        sock.sendall(_raw_post("/v1/predict", good, {"Content-Type": "application/json"}))  # same connection
        status, _, body = read_response(sock)
        assert status == 200, body
    no_500s(server)


# ---- slow and disconnecting clients (raw sockets) -----------------------------------------


def _slow_client(
    srv, results: list, index: int, declared: int, first: int, trickle: int, stop: threading.Event
) -> None:
    """Declares ``declared`` bytes, sends ``first`` at once, then ``trickle`` bytes every 100 ms until answered."""
    sock = connect(srv)
    try:
        head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
        sock.sendall(head + b" " * first)
        sock.settimeout(0.1)  # the client's own pace
        start = time.monotonic()
        while not stop.is_set():
            try:
                data = sock.recv(65536)
                if data:
                    results[index] = (int(data.split()[1]), time.monotonic() - start)
                else:
                    results[index] = ("closed", time.monotonic() - start)
                return
            except TimeoutError:
                if trickle:
                    try:
                        sock.sendall(b" " * trickle)
                    except OSError:
                        results[index] = ("reset", time.monotonic() - start)
                        return
            except OSError:
                results[index] = ("reset", time.monotonic() - start)
                return
    finally:
        sock.close()


def test_slow_clients_get_408_within_the_body_timeout_and_in_flight_returns_to_0(server):
    clients = 16
    results: list = [None] * clients
    stop = threading.Event()
    base_408 = _status_count(server, 408, "/v1/predict")
    baseline = rss_mb(server.proc.pid)
    threads = [
        threading.Thread(target=_slow_client, args=(server, results, i, 8_000_000, 1_000_000, 1024, stop))
        for i in range(clients)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    peak = baseline
    while any(t.is_alive() for t in threads) and time.monotonic() - start < 60:
        peak = max(peak, rss_mb(server.proc.pid))
        threads[0].join(0.05)  # sample memory while the clients run (not a synchronisation)
    stop.set()
    for t in threads:
        t.join()
    wait_for_metric(server, "codedsmooth_requests_in_flight", lambda v: v == 0, timeout=10)
    back_to_zero = time.monotonic() - start
    print(
        f"16 slow clients: answers {sorted(set(r[0] for r in results))}, last after {max(r[1] for r in results):.2f}s; "
        f"in-flight 0 after {back_to_zero:.2f}s; server RSS {baseline:.0f} -> peak {peak:.0f} MB (+{peak - baseline:.0f})"
    )
    assert [r[0] for r in results] == [408] * clients
    assert max(r[1] for r in results) < BODY_TIMEOUT_S + 2
    assert back_to_zero < 10  # within the 10 s request deadline
    assert _status_count(server, 408, "/v1/predict") - base_408 == clients
    no_500s(server)


def test_clients_leaving_mid_upload_are_counted_499_not_500(server):
    clients = 16
    base = _status_count(server, 499, "/v1/predict")
    for _ in range(clients):
        sock = connect(server)
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8000000\r\n\r\n"
            + b" " * 100_000
        )
        sock.close()
    wait_until(lambda: _status_count(server, 499, "/v1/predict") - base == clients, "every upload counted 499", 30)
    wait_for_metric(server, "codedsmooth_requests_in_flight", lambda v: v == 0, timeout=10)
    no_500s(server)


def test_headers_that_never_finish_are_cut_off(server):
    sock = connect(server)
    start = time.monotonic()
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(0.1)
    closed = None
    while time.monotonic() - start < HEADER_TIMEOUT_S + 10:
        try:
            if sock.recv(1024) == b"":
                closed = time.monotonic() - start
                break
        except TimeoutError:
            sock.sendall(b"X")  # a slowloris: one header byte at a time, never the end of the headers
        except OSError:
            closed = time.monotonic() - start
            break
    sock.close()
    print(f"slowloris headers: closed after {closed}s (header timeout {HEADER_TIMEOUT_S}s)")
    assert closed is not None and closed < HEADER_TIMEOUT_S + 2


# ---- metrics port --------------------------------------------------------------------------


def test_metrics_are_on_their_own_port_only(server):
    assert httpx.get(server.url + "/metrics").status_code == 404
    r = httpx.get(server.metrics_url + "/metrics")
    assert r.status_code == 200 and "codedsmooth_requests_total" in r.text
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "/metrics" not in doc["paths"]
