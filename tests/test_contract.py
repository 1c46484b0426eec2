"""The documented contract against a real server: hostile JSON bodies, short error bodies in the
service's own words, exact paths, 415 for compressed bodies, 400 for broken multipart, what
``/v1/models`` tells a stranger; and the CLI's errors (no abbreviations, env vars named as such).

Waits are on state (the server's peak memory in /proc, its log after it stopped), never sleeps.
"""

import gzip
import hashlib
import json
import logging

import httpx
import numpy as np
import pytest
import torch
from helpers import ServerProcess, running_server

from codedsmooth.cli import build_parser, main
from codedsmooth.models import load_checkpoint
from codedsmooth.service.api.schemas import RciInfo
from codedsmooth.service.engine import InferenceEngine, resolve_spec
from codedsmooth.service.errors import MAX_ERROR_CHARS
from codedsmooth.service.settings import ServeSettings

GOOD_ITEM = np.full((1, 8, 8), 0.5).tolist()
JSON = {"content-type": "application/json"}
MILLION_TINY_ITEMS = b'{"inputs":[' + b",".join([b"[[[0]]]"] * 1_000_000) + b"]}"  # 8 MB: the red team's body
SHORT_ERROR_BYTES = MAX_ERROR_CHARS + 100  # the JSON around a message cut to MAX_ERROR_CHARS
LIBRARY_PHRASES = (
    "maximum number of dimension",
    "inhomogeneous",
    "unexpected character",
    "char ",
    "setting an array element",
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_body_bytes=8 * 1024 * 1024) as srv:
        srv.model = httpx.get(srv.url + "/v1/models").json()[0]["name"]
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            srv.client = client
            yield srv


def _v2(name="input", datatype="FP32", shape=(1, 1, 8, 8), data=None) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": list(shape), "datatype": datatype, "data": [0.5] * 64 if data is None else data}
        ]
    }


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc")


# ---- item 4: large JSON bodies ------------------------------------------------


def test_a_million_tiny_items_are_refused_before_python_objects_are_built(server):
    """Parsing the body would build ~3 million lists (hundreds of MB, seconds on the event loop); counting refuses it first."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _rss_mb(pid)
    for _ in range(2):
        r = server.client.post("/v1/predict", content=MILLION_TINY_ITEMS, headers=JSON)
        assert r.status_code == 413, r.text
        assert "JSON values" in r.json()["error"] and "at most 32 items" in r.json()["error"]
    grew = _peak_rss_mb(pid) - before
    assert grew < 80, (
        f"peak RSS grew {grew:.0f} MB answering an 8 MB body"
    )  # the body itself and its copies, no objects
    v2 = (
        b'{"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":['
        + b",".join([b"0"] * 3_000_000)
        + b"]}]}"
    )
    r = server.client.post(f"/v2/models/{server.model}/infer", content=v2, headers=JSON)
    assert r.status_code == 413 and "JSON values" in r.json()["error"]
    assert _peak_rss_mb(pid) - before < 80
    # the largest request the model takes is still served, and health answers
    assert server.client.post("/v1/predict", json={"inputs": [GOOD_ITEM] * 32}).status_code == 200
    assert server.client.get("/health/live").status_code == 200


# ---- item 5: error bodies do not echo the request -----------------------------


def test_error_bodies_stay_short_whatever_the_request_held(server):
    c, v2 = server.client, f"/v2/models/{server.model}/infer"
    unknown = {"inputs": [GOOD_ITEM], **{f"k{i:03d}" + "x" * 20_000: 0 for i in range(200)}}  # 4 MB of key names
    answers = {
        "200 unknown keys": c.post("/v1/predict", content=json.dumps(unknown), headers=JSON),
        "7 MB input name": c.post(v2, json=_v2(name="A" * 7_000_000)),
        "7 MB datatype": c.post(v2, json=_v2(datatype="B" * 7_000_000)),
        "1 MB output name": c.post(v2, json={**_v2(), "outputs": [{"name": "o" * 1_000_000}]}),
        "long shape": c.post(v2, json=_v2(shape=[1] * 2000)),
        "8 KB content type": c.post("/v1/predict", content=b"{}", headers={"content-type": "text/" + "x" * 8000}),
        "long version": c.post(f"/v2/models/{server.model}/versions/{'9' * 4000}/infer", json=_v2()),
    }
    for name, r in answers.items():
        assert 400 <= r.status_code < 500, (name, r.status_code)
        assert len(r.content) < SHORT_ERROR_BYTES, (name, len(r.content))
        assert "..." in r.json()["error"], (name, r.json())
    assert (
        answers["200 unknown keys"].status_code == 422
        and "200 unknown field(s)" in answers["200 unknown keys"].json()["error"]
    )
    assert "7,000,000 characters" in answers["7 MB input name"].json()["error"]


def test_error_texts_say_what_is_wrong_in_the_services_words(server):
    c = server.client
    deep = "[" * 70 + "0.5" + "]" * 70
    answers = {
        "deeper than numpy": (
            c.post("/v1/predict", content='{"inputs": ' + deep + "}", headers=JSON),
            422,
            "nested too deeply",
        ),
        "v2 data deeper than numpy": (
            c.post(
                f"/v2/models/{server.model}/infer",
                content=json.dumps(_v2(data=json.loads(deep)), allow_nan=True),
                headers=JSON,
            ),
            422,
            "nested too deeply",
        ),
        "ragged": (c.post("/v1/predict", json={"inputs": [[[[0.5] * 8] * 7 + [[0.5] * 3]]]}), 422, "ragged"),
        "not JSON": (
            c.post("/v1/predict", content=b'{"inputs": [1,, 2]}', headers=JSON),
            400,
            "line 1, column 15",
        ),  # the second comma
        "cut short": (c.post("/v1/predict", content=b'{"inputs": [1', headers=JSON), 400, "ends too early"),
        "not UTF-8": (c.post("/v1/predict", content=b'{"inputs": "\xff\xfe"}', headers=JSON), 400, "UTF-8"),
        "over 1024 levels": (
            c.post("/v1/predict", content=b"[" * 1100 + b"]" * 1100, headers=JSON),
            400,
            "nested too deeply",
        ),
    }
    for name, (r, status, words) in answers.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        message = r.json()["error"]
        assert words in message, (name, message)
        assert not any(p in message for p in LIBRARY_PHRASES), (name, message)


# ---- item 7: the documented contract --------------------------------------------


def test_a_trailing_slash_is_a_404_json_never_a_redirect_to_the_clients_host(server):
    for method, path in (
        ("GET", "/v1/models/"),
        ("POST", "/v1/predict/"),
        ("GET", "/health/live/"),
        ("GET", f"/v2/models/{server.model}/"),
    ):
        r = server.client.request(
            method, path, headers={"host": "evil.example"}, json={"inputs": [GOOD_ITEM]} if method == "POST" else None
        )
        assert r.status_code == 404, (path, r.status_code, r.headers)
        assert "location" not in r.headers
        assert r.headers["content-type"] == "application/json" and "trailing slash" in r.json()["error"]
    assert server.client.get("/nothing-here").json()["error"] == "no route '/nothing-here'"


def test_v1_refuses_compressed_bodies_with_415(server):
    body = gzip.compress(json.dumps({"inputs": [GOOD_ITEM]}).encode())
    r = server.client.post("/v1/predict", content=body, headers={**JSON, "content-encoding": "gzip"})
    assert r.status_code == 415 and "compressed" in r.json()["error"]
    files = {"files": ("a.png", b"\x89PNG", "image/png")}
    r = server.client.post("/v1/predict/image", files=files, headers={"content-encoding": "deflate"})
    assert r.status_code == 415
    r = server.client.post("/v1/predict", json={"inputs": [GOOD_ITEM]}, headers={"content-encoding": "identity"})
    assert r.status_code == 200


def test_broken_multipart_is_400(server):
    bodies = {
        "no boundary": ("multipart/form-data", b"--abc\r\n"),
        "part without a name": (
            "multipart/form-data; boundary=abc",
            b"--abc\r\nContent-Disposition: form-data\r\n\r\nx\r\n--abc--\r\n",
        ),
        "header line without a colon": (
            "multipart/form-data; boundary=abc",
            b"--abc\r\nno colon here\r\n\r\nx\r\n--abc--\r\n",
        ),
    }
    for name, (ctype, body) in bodies.items():
        r = server.client.post("/v1/predict/image", content=body, headers={"content-type": ctype})
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert "multipart" in r.json()["error"]


# ---- item 8: what the server tells strangers -----------------------------------


def test_models_shows_what_a_client_needs_and_the_rci_spec(server, tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    (info,) = server.client.get("/v1/models").json()
    assert set(info) == {
        "name",
        "input_shape",
        "classes",
        "rci",
        "output",
        "card",
        "checkpoint_sha256",
    }  # output, card and checkpoint_sha256: issue 31 (labels only, robustness cards, the exact weights served)
    assert info["checkpoint_sha256"] == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert info["output"] == "scores" and info["card"] == {
        "available": False,
        "note": f"model {ck.name!r} has no robustness card",
    }
    assert info["name"] == ck.name and info["input_shape"] == list(ck.input_shape) and info["classes"] == ck.classes
    assert set(info["rci"]) == set(RciInfo.model_fields)  # the whole spec: the attack client builds its model from it
    spec = resolve_spec(ck, ServeSettings())
    assert RciInfo.model_validate(info["rci"]).to_spec() == spec
    body = server.client.post("/v1/predict", json={"inputs": [GOOD_ITEM]}).json()
    assert body["rci"] == {"enabled": True, "scope": spec.scope}


def test_model_details_are_opt_in_and_batch_scope_below_exact_decode_warns(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    k = ck.trained_coding.k
    srv = ServerProcess(tiny_checkpoint, expose_model_details=True, rci_scope="batch", coded_points=k)
    try:
        srv.wait_ready()
        (info,) = httpx.get(srv.url + "/v1/models").json()
        details = {
            "method": ck.config.method,
            "dataset": ck.config.dataset,
            "test_accuracy": ck.config.test_accuracy,
            "target_block": ck.target_block,
        }
        assert info["details"] == {k: v for k, v in details.items() if v is not None}
        assert info["rci"]["scope"] == "batch" and info["rci"]["coded_points"] == k
    finally:
        srv.terminate()
    log = srv.proc.stdout.read()
    assert "batch scope" in log and f"N = {k} coded points, below 1.5 K" in log, log


def test_no_warning_where_batch_scope_decodes_exactly_or_requests_are_coded_alone(tiny_checkpoint, caplog):
    ck = load_checkpoint(tiny_checkpoint)
    k = ck.trained_coding.k
    with caplog.at_level(logging.WARNING, logger="codedsmooth.engine"):
        InferenceEngine(ck, ServeSettings(rci_scope="batch", coded_points=k * 3 // 2), torch.device("cpu"))
        InferenceEngine(ck, ServeSettings(rci_scope="request", coded_points=k), torch.device("cpu"))
        assert not [r for r in caplog.records if "batch scope" in r.getMessage()]
        InferenceEngine(ck, ServeSettings(rci_scope="batch", coded_points=k * 3 // 2 - 1), torch.device("cpu"))
        assert [r for r in caplog.records if "batch scope" in r.getMessage()]


# ---- the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epoch", "1"],
        ["serve", "--max-batch", "4"],
        ["attack", "--sample", "3"],
        ["--log-lev", "debug", "serve"],
    ],
)
def test_cli_refuses_abbreviated_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(
            argv
        )  # parse only: an accepted abbreviation must not start a server or a training run
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "invalid choice: 'debug'" in err, err


def test_a_bad_env_var_is_named_as_the_env_var_and_a_bad_flag_as_the_flag(monkeypatch, capsys):
    monkeypatch.setenv("CODEDSMOOTH_MAX_BATCH_SIZE", "3O")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "CODEDSMOOTH_MAX_BATCH_SIZE='3O'" in err and "--max-batch-size" not in err
    assert main(["serve", "--max-batch-size", "0"]) == 2  # the flag wins over the env var, and is named
    err = capsys.readouterr().err
    assert "--max-batch-size" in err and "CODEDSMOOTH_MAX_BATCH_SIZE" not in err


def test_a_config_json_path_is_told_to_give_the_checkpoint_directory(tiny_checkpoint, capsys):
    assert main(["serve", "--checkpoint", str(tiny_checkpoint / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "give the checkpoint directory" in err and str(tiny_checkpoint) in err
    assert "pickle" not in err and "header" not in err
