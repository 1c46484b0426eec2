"""Real responses against the server's own /openapi.json: every route, its success and its error answers.

For each answer: the status is documented for that operation; the content type is one the document
lists for that status (or, where it lists none, the body is empty); a JSON body validates against the
documented schema. The 503s (loading/draining) and 504s come from a server whose model is held by the
engine double of tests/slow_server.py.
"""

import gzip
import io
import json
import signal
import socket
import sys
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
from helpers import ServerProcess, running_server, wait_for_metric, write_card
from PIL import Image

GOOD_ITEM = np.full((1, 8, 8), 0.5).tolist()
SLOW_SERVER = [sys.executable, str(Path(__file__).with_name("slow_server.py"))]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buf, format="PNG")
    return buf.getvalue()


def _v2(name="input", shape=(1, 1, 8, 8)):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": "FP32", "data": [0.5] * 64}]}


def _v2_binary():
    payload = np.full(64, 0.5, dtype=np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return {
        "content": head + payload,
        "headers": {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"},
    }


def cases(model: str) -> list[tuple[str, str, str, dict, int]]:
    """(method, documented path, real path, httpx kwargs, expected status)."""
    m = model
    img = lambda n: {"files": [("files", (f"{i}.png", _png(), "image/png")) for i in range(n)]}  # noqa: E731
    return [
        ("get", "/health/live", "/health/live", {}, 200),
        ("get", "/health/ready", "/health/ready", {}, 200),
        ("get", "/v1/models", "/v1/models", {}, 200),
        ("get", "/v1/models/{name}/card", f"/v1/models/{m}/card", {}, 200),
        ("get", "/v1/models/{name}/card", "/v1/models/nope/card", {}, 404),
        ("post", "/v1/predict", "/v1/predict", {"json": {"inputs": [GOOD_ITEM]}}, 200),
        (
            "post",
            "/v1/predict",
            "/v1/predict",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("post", "/v1/predict", "/v1/predict", {"json": {"inputs": [GOOD_ITEM] * 33}}, 413),
        ("post", "/v1/predict", "/v1/predict", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
        (
            "post",
            "/v1/predict",
            "/v1/predict",
            {
                "content": gzip.compress(b'{"inputs": []}'),
                "headers": {"content-type": "application/json", "content-encoding": "gzip"},
            },
            415,
        ),
        (
            "post",
            "/v1/predict",
            "/v1/predict",
            {
                "content": b'{"inputs":[' + b",".join([b"[[[0]]]"] * 5000) + b"]}",
                "headers": {"content-type": "application/json"},
            },
            413,
        ),
        ("post", "/v1/predict", "/v1/predict", {"json": {"inputs": [[[1.5]]]}}, 422),
        ("post", "/v1/predict/image", "/v1/predict/image", img(2), 200),
        ("post", "/v1/predict/image", "/v1/predict/image", img(33), 413),
        ("post", "/v1/predict/image", "/v1/predict/image", {"json": {}}, 415),
        (
            "post",
            "/v1/predict/image",
            "/v1/predict/image",
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
        ),
        (
            "post",
            "/v1/predict/image",
            "/v1/predict/image",
            {"files": [("files", ("x.png", b"garbage", "image/png"))]},
            422,
        ),
        ("get", "/v2", "/v2", {}, 200),
        ("get", "/v2/health/live", "/v2/health/live", {}, 200),
        ("get", "/v2/health/ready", "/v2/health/ready", {}, 200),
        ("get", "/v2/models/{name}", f"/v2/models/{m}", {}, 200),
        ("get", "/v2/models/{name}", "/v2/models/nope", {}, 404),
        ("get", "/v2/models/{name}/versions/{version}", f"/v2/models/{m}/versions/1", {}, 200),
        ("get", "/v2/models/{name}/versions/{version}", f"/v2/models/{m}/versions/7", {}, 404),
        ("get", "/v2/models/{name}/ready", f"/v2/models/{m}/ready", {}, 200),
        ("get", "/v2/models/{name}/ready", "/v2/models/nope/ready", {}, 404),
        ("get", "/v2/models/{name}/versions/{version}/ready", f"/v2/models/{m}/versions/1/ready", {}, 200),
        ("get", "/v2/models/{name}/versions/{version}/ready", f"/v2/models/{m}/versions/2/ready", {}, 404),
        ("post", "/v2/models/{name}/infer", f"/v2/models/{m}/infer", {"json": _v2()}, 200),
        ("post", "/v2/models/{name}/infer", f"/v2/models/{m}/infer", _v2_binary(), 200),
        (
            "post",
            "/v2/models/{name}/infer",
            f"/v2/models/{m}/infer",
            {"json": _v2(), "headers": {"inference-header-content-length": "1_0"}},
            400,
        ),
        ("post", "/v2/models/{name}/infer", "/v2/models/nope/infer", {"json": _v2()}, 404),
        ("post", "/v2/models/{name}/infer", f"/v2/models/{m}/infer", {"json": _v2(shape=(100, 1, 8, 8))}, 413),
        (
            "post",
            "/v2/models/{name}/infer",
            f"/v2/models/{m}/infer",
            {"json": _v2(), "headers": {"content-encoding": "gzip"}},
            415,
        ),
        ("post", "/v2/models/{name}/infer", f"/v2/models/{m}/infer", {"json": _v2(name="x")}, 422),
        (
            "post",
            "/v2/models/{name}/versions/{version}/infer",
            f"/v2/models/{m}/versions/1/infer",
            {"json": _v2()},
            200,
        ),
        (
            "post",
            "/v2/models/{name}/versions/{version}/infer",
            f"/v2/models/{m}/versions/3/infer",
            {"json": _v2()},
            404,
        ),
        ("post", "/v1/models/{name}/predict", f"/v1/models/{m}/predict", {"json": {"inputs": [GOOD_ITEM]}}, 200),
        ("post", "/v1/models/{name}/predict", "/v1/models/nope/predict", {"json": {"inputs": [GOOD_ITEM]}}, 404),
        ("post", "/v1/models/{name}/predict", f"/v1/models/{m}/predict", {"json": {"inputs": [[[1.5]]]}}, 422),
        ("post", "/v1/models/{name}/predict/image", f"/v1/models/{m}/predict/image", img(2), 200),
        ("post", "/v1/models/{name}/predict/image", "/v1/models/nope/predict/image", img(1), 404),
        ("post", "/v2/repository/index", "/v2/repository/index", {}, 200),
        ("post", "/v2/repository/index", "/v2/repository/index", {"json": {"ready": True}}, 200),
        ("post", "/v2/repository/index", "/v2/repository/index", {"json": {"ready": "yes"}}, 422),
        (
            "post",
            "/v2/repository/index",
            "/v2/repository/index",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("post", "/v2/repository/models/{name}/load", f"/v2/repository/models/{m}/load", {}, 403),
        ("post", "/v2/repository/models/{name}/unload", f"/v2/repository/models/{m}/unload", {}, 403),
    ]


def check_against_document(
    doc: dict, method: str, path: str, status: int, content_type: str | None, body: bytes
) -> None:
    operation = doc["paths"][path][method]
    responses = operation["responses"]
    assert str(status) in responses, (
        f"{method.upper()} {path}: {status} not documented (documented: {sorted(responses)})"
    )
    content = responses[str(status)].get("content") or {}
    if not content:
        assert body == b"", f"{method.upper()} {path} {status}: documented without a body, got {body[:100]!r}"
        return
    media = (content_type or "").split(";")[0].strip()
    assert media in content, f"{method.upper()} {path} {status}: content type {media!r} not among {sorted(content)}"
    if media == "application/json":
        schema = content[media].get("schema", {})
        jsonschema.validate(json.loads(body), {**schema, "components": doc["components"]})


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    import shutil

    carded = tmp_path_factory.mktemp("carded") / "tiny"
    shutil.copytree(tiny_checkpoint, carded)
    write_card(carded, "tiny")  # GET /v1/models/{name}/card answers 200 with it
    with running_server(carded, body_timeout_s=1) as srv:
        srv.model = httpx.get(srv.url + "/v1/models").json()[0]["name"]
        srv.doc = httpx.get(srv.url + "/openapi.json").json()
        yield srv


def test_every_route_answers_as_its_openapi_document_says(server):
    doc = server.doc
    covered = set()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, real, kwargs, expected in cases(server.model):
            r = client.request(method.upper(), real, **kwargs)
            assert r.status_code == expected, (method, real, r.status_code, r.text[:300])
            check_against_document(doc, method, path, r.status_code, r.headers.get("content-type"), r.content)
            covered.add((method, path))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == covered, f"routes without a contract case: {documented - covered}"


def test_a_slow_body_gets_the_documented_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    status = int(lines[0].split()[1])
    assert status == 408 and headers.get("connection") == "close"
    check_against_document(server.doc, "post", "/v1/predict", status, headers.get("content-type"), body)


def test_504_and_every_503_while_draining_match_the_document(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SLOW_ENGINE_GATE", str(tmp_path))
    srv = ServerProcess(
        tiny_checkpoint, program=SLOW_SERVER, timeout_ms=1000, max_delay_ms=0, drain_timeout_s=60, rci=False
    )
    try:
        srv.wait_ready()
        model = httpx.get(srv.url + "/v1/models").json()[0]["name"]
        doc = httpx.get(srv.url + "/openapi.json").json()
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            # the first batch is held on the model thread: this request times out, the next one too
            r = client.post("/v1/predict", json={"inputs": [GOOD_ITEM]})
            assert r.status_code == 504
            check_against_document(doc, "post", "/v1/predict", 504, r.headers.get("content-type"), r.content)
            srv.proc.send_signal(signal.SIGTERM)
            wait_for_metric(srv, "codedsmooth_model_ready", lambda v: v == 0)
            seen = set()
            for method, path, real, kwargs, _ in cases(model):
                r = client.request(method.upper(), real, **kwargs)
                check_against_document(doc, method, path, r.status_code, r.headers.get("content-type"), r.content)
                seen.add(r.status_code)
                if r.status_code == 503 and r.content:
                    assert r.headers.get("retry-after")
            assert 503 in seen
        (tmp_path / "open").touch()
        assert srv.proc.wait(30) == 0
    finally:
        (tmp_path / "open").touch()
        srv.terminate()
