"""API keys and per-key limits on a real server: 401s, the open paths, every protocol with a key, tritonclient,
quota and rate limits counted in items, live reloads of the keys file, the client's key, and the limits' arithmetic.

One server serves the module, with a keys file whose clients each play one part (their own
``rate=``/``quota=`` overrides keep the parts apart). Synchronised on state: metrics, log lines
read from the server's output, answers; never on sleeps.
"""

import base64
import hashlib
import json
import math
import os
import random
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import LoggedServer, metric, running_server, wait_for_metric, wait_until

from codedsmooth.service.access.keys import KeysFileError, add_key, read_keys
from codedsmooth.service.access.limits import CounterKey, Counters, Limits

QUOTA = 50
BATCH = 8
RATE = 20.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    out = {
        "alice": add_key(path, "alice"),  # the server's limits: quota 50
        "bob": add_key(path, "bob"),  # the server's limits: the second key of the quota test
        "carol": add_key(path, "carol", quota="none"),  # unlimited: protocols and auth
        "dave": add_key(path, "dave", quota="none"),  # removed from the file while the server runs
        "erin": add_key(path, "erin", rate=str(RATE), quota="none"),  # the rate limit
        "heidi": add_key(path, "heidi", quota="1"),  # the client's used-up quota
    }
    return path, out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, keys):
    path, _ = keys
    srv = LoggedServer(
        tiny_checkpoint, api_keys_file=path, quota=QUOTA, max_batch_size=BATCH, rci=False, max_delay_ms=1
    )
    try:
        srv.wait_ready()
        srv.model = None
        yield srv
    finally:
        srv.terminate()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def model_name(server, key) -> str:
    return httpx.get(server.url + "/v1/models", headers=auth(key)).json()[0]["name"]


def item(digits, i=0):
    return digits.test_x[i : i + 1].tolist()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buf, format="PNG")
    return buf.getvalue()


def routes(model: str, digits) -> list[tuple[str, str, dict]]:
    """Every route that needs a key, with a body it would answer 200."""
    x = digits.test_x[:2].numpy()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    return [
        ("GET", "/v1/models", {}),
        ("POST", "/v1/predict", {"json": {"inputs": x.tolist()}}),
        ("POST", "/v1/predict/image", {"files": [("files", ("a.png", _png(), "image/png"))]}),
        ("GET", "/v2", {}),
        ("GET", f"/v2/models/{model}", {}),
        ("GET", f"/v2/models/{model}/ready", {}),
        (
            "POST",
            f"/v2/models/{model}/infer",
            {
                "json": {
                    "inputs": [
                        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
                    ]
                }
            },
        ),
        (
            "POST",
            f"/v2/models/{model}/infer",
            {"content": head + x.tobytes(), "headers": {"inference-header-content-length": str(len(head))}},
        ),
    ]


# ---- the keys file and the command that writes it ------------------------------------------------


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """The real CLI's ``main`` in this process (exit code, stdout, stderr)."""
    from codedsmooth.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_keys_add_prints_a_256_bit_key_once_and_stores_only_its_digest(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    run = lambda *a: cli(capsys, "keys", "add", *a)  # noqa: E731
    r = run("ops", "--file", str(path))
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert len(base64.urlsafe_b64decode(key + "=")) == 32  # 256 bits
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key not in path.read_text()
    assert path.read_text() == f"ops {hashlib.sha256(key.encode()).hexdigest()}\n"
    assert read_keys(path).find(key).name == "ops" and read_keys(path).find(key + "x") is None
    second = run("batch-job", "--file", str(path), "--rate", "5", "--quota", "none")
    assert second.returncode == 0 and second.stdout.strip() != key
    assert path.read_text().splitlines()[1].endswith(" rate=5 quota=none")
    third = run("ops-admin", "--file", str(path), "--manage")
    assert third.returncode == 0 and path.read_text().splitlines()[2].endswith(" manage=yes")
    assert read_keys(path).find(third.stdout.strip()).manage and not read_keys(path).find(key).manage
    again = run("ops", "--file", str(path))
    assert again.returncode == 2 and "'ops' already has a key" in again.stderr and again.stdout == ""
    assert len(path.read_text().splitlines()) == 3  # nothing written


def test_a_bad_keys_file_is_one_error_naming_file_and_line(tmp_path, capsys):
    path = tmp_path / "keys.txt"
    digest = "ab" * 32
    for body, expected in (
        (f"# ops\n\nalice {digest}\nbob\n", "line 4: expected '<client-name>"),
        (f"alice {digest[:-1]}\n", "line 1: expected the SHA-256"),
        (f"alice {digest}\nalice {'cd' * 32}\n", "line 2: client 'alice' is already on line 1"),
        (f"alice {digest}\nbob {digest}\n", "line 2: the same key as client 'alice'"),
        (f"alice {digest} rate=0\n", "line 1: rate must be a number > 0"),
        (f"alice {digest} quota=1.5\n", "line 1: quota must be an integer >= 0"),
        (f"alice {digest} burst=3\n", "line 1: unknown option 'burst=3'"),
        (f"alice {digest} manage=maybe\n", "line 1: manage must be 'yes' or 'no'"),
        (f"alice {digest} quota@erm=-1\n", "line 1: quota@erm must be an integer >= 0"),
        (f"alice {digest} quota@=5\n", "line 1: 'quota@=5': MODEL in quota@MODEL must be a model's name"),
        (f"alice {digest} quota@a@b=5\n", "line 1: 'quota@a@b=5': MODEL in quota@MODEL must be a model's name"),
        (f"alice {digest} manage@erm=yes\n", "line 1: unknown option 'manage@erm=yes'"),
        (f"alice {digest} rate@erm=2 rate@erm=3\n", "line 1: rate@erm given twice"),
        (f"unknown {digest}\n", "line 1: the client name 'unknown' is reserved"),
    ):
        path.write_text(body)
        with pytest.raises(KeysFileError, match=expected):
            read_keys(path)
        r = cli(capsys, "serve", "--api-keys-file", str(path), "--port", "0")  # refused before anything binds or loads
        assert r.returncode == 2 and f"{path}, {expected}" in r.stderr, r.stderr
    r = cli(capsys, "serve", "--quota", "5", "--port", "0")
    assert r.returncode == 2 and "need api_keys_file" in r.stderr


# ---- authentication ---------------------------------------------------------------------------


def test_no_key_or_a_wrong_key_gets_401_with_www_authenticate_on_every_route(server, keys, digits):
    _, k = keys
    model = model_name(server, k["carol"])
    before = metric(server, "codedsmooth_client_refused_total", client="unknown", status="401")
    refused = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, kwargs in routes(model, digits) + [("GET", "/no/such/path", {})]:
            extra = kwargs.pop("headers", {})
            for headers in (
                {},
                auth("not-a-key"),
                auth(k["carol"] + "x"),
                {"Authorization": f"Basic {k['carol']}"},
                {"Authorization": "Bearer"},
            ):
                r = client.request(method, path, headers={**extra, **headers}, **kwargs)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
                assert r.headers["www-authenticate"].startswith('Bearer realm="codedsmooth"')
                assert ("invalid_token" in r.headers["www-authenticate"]) == bool(headers)
                assert r.headers["content-type"] == "application/json" and r.json()["error"]
                refused += 1
            kwargs["headers"] = extra
    assert metric(server, "codedsmooth_client_refused_total", client="unknown", status="401") - before == refused
    # refusals are logged by client name, naming no key, at most one line per client per interval
    server.wait_line("refused client unknown: ")
    assert 1 <= sum("(401)" in line for line in server.lines) < refused
    assert not any(key in line for line in server.lines for key in k.values())


def test_health_and_the_api_description_stay_open(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert doc["paths"]["/v1/predict"]["post"]["security"] == [{"apiKey": []}]
    assert {"401", "429"} <= set(doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"])
    assert (
        "401" in doc["paths"]["/v1/models"]["get"]["responses"]
        and "429" not in doc["paths"]["/v1/models"]["get"]["responses"]
    )
    assert "security" not in doc["paths"]["/health/ready"]["get"]


def test_the_right_key_is_answered_on_v1_v2_json_binary_and_images(server, keys, digits):
    _, k = keys
    model = model_name(server, k["carol"])
    with httpx.Client(base_url=server.url, timeout=30, headers=auth(k["carol"])) as client:
        for method, path, kwargs in routes(model, digits):
            r = client.request(method, path, **kwargs)
            assert r.status_code == 200, (method, path, r.text[:200])
    assert metric(server, "codedsmooth_client_requests_total", client="carol") >= len(routes(model, digits))


def test_tritonclient_passes_the_key_as_a_header(server, keys, tiny_checkpoint, digits):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from codedsmooth.models import load_checkpoint

    _, k = keys
    ck = load_checkpoint(tiny_checkpoint)
    x = digits.test_x[:4].numpy()
    triton = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert triton.is_server_live() and triton.is_server_ready()  # health: no key
        with pytest.raises(InferenceServerException):
            triton.get_model_metadata(ck.name)
        headers = auth(k["carol"])
        assert triton.is_model_ready(ck.name, headers=headers)
        assert triton.get_model_metadata(ck.name, headers=headers)["name"] == ck.name
        for binary in (True, False):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            # a fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given
            result = triton.infer(
                ck.name,
                [inp],
                outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)],
                headers=auth(k["carol"]),
            )
            assert result.as_numpy("probabilities").shape == (4, len(ck.classes))
        with pytest.raises(InferenceServerException, match="unknown API key"):
            triton.infer(ck.name, [inp], headers=auth("wrong"))
    finally:
        triton.close()


# ---- limits -----------------------------------------------------------------------------------


def test_quota_of_50_items_answers_exactly_50_of_80_one_item_requests(server, keys, digits):
    _, k = keys
    model = model_name(server, k["alice"])
    x = digits.test_x[:1].numpy()

    def one(i):
        # v1 and v2 alike: the same charge
        if i % 2:
            return httpx.post(
                server.url + "/v1/predict", json={"inputs": item(digits, i % 10)}, headers=auth(k["alice"]), timeout=30
            )
        body = {
            "inputs": [
                {"name": "input", "shape": [1, *x.shape[1:]], "datatype": "FP32", "data": x.reshape(-1).tolist()}
            ]
        }
        return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, headers=auth(k["alice"]), timeout=30)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(80)))
    codes = [r.status_code for r in answers]
    assert codes.count(200) == QUOTA and codes.count(429) == 30, sorted(set(codes))
    window = 86400
    for r in answers:
        if r.status_code == 429:
            retry = int(r.headers["retry-after"])
            assert 1 <= retry <= window and "quota of 50 items" in r.json()["error"]
    assert metric(server, "codedsmooth_client_items_total", client="alice") == QUOTA
    assert metric(server, "codedsmooth_client_refused_total", client="alice", status="429") == 30
    # a second key is still answered; a request of several items is charged several
    r = httpx.post(
        server.url + "/v1/predict", json={"inputs": digits.test_x[:3].tolist()}, headers=auth(k["bob"]), timeout=30
    )
    assert r.status_code == 200
    assert metric(server, "codedsmooth_client_items_total", client="bob") == 3
    # metadata uses no items and is still answered for the exhausted key
    assert httpx.get(server.url + "/v1/models", headers=auth(k["alice"])).status_code == 200
    server.wait_line("refused client alice: quota of 50 items per 86400 s used (0 left, 1 asked)")


def test_rate_limit_never_passes_its_bucket_and_keeps_near_its_rate(server, keys, digits):
    """Over ~3 s of clients sending as fast as they can: answered items <= burst + rate x time (exact,
    the token bucket cannot pass it) and >= half of rate x time (generous: a loaded machine still
    serves 20 items/s). The precise rate over 10 s is measured by benchmarks/access_limits.py."""
    _, k = keys
    body = {"inputs": item(digits)}
    answered, refused, retry_afters = [], [], set()
    stop = threading.Event()

    def loop():
        with httpx.Client(base_url=server.url, timeout=30, headers=auth(k["erin"])) as client:
            while not stop.is_set():
                r = client.post("/v1/predict", json=body)
                (answered if r.status_code == 200 else refused).append(r.status_code)
                if r.status_code == 429:
                    retry_afters.add(r.headers["retry-after"])

    threads = [threading.Thread(target=loop) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    wait_until(
        lambda: time.monotonic() - start >= 3.0 and len(refused) > 0, "3 s of load past the rate", 60, interval=0.05
    )
    stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    print(
        f"rate limit {RATE:g}/s, burst {BATCH}: {len(answered)} answered, {len(refused)} refused in {elapsed:.2f}s "
        f"({(len(answered) - BATCH) / elapsed:.1f} items/s past the burst)"
    )
    assert set(refused) == {429} and retry_afters == {"1"}
    assert len(answered) <= BATCH + RATE * elapsed + 1e-6
    assert len(answered) >= 0.5 * RATE * elapsed


def test_a_keys_line_reads_back_as_it_is_written():
    from codedsmooth.service.access.keys import format_line, parse_line
    from codedsmooth.service.access.overrides import INHERIT, NO_OVERRIDE, LimitOverride

    digest = "cd" * 32
    line = f"batch {digest} rate=5 quota=none rate@erm=2.5 quota@erm=7 quota@coded=none manage=yes"
    client = parse_line(line, "here")
    assert format_line(client) == line
    # a model's options written apart are read as one override, written together in the order the models came
    assert (
        parse_line(f"batch {digest} rate=5 quota=none rate@erm=2.5 quota@coded=none quota@erm=7 manage=yes", "here")
        == client
    )
    for rate in (
        "1234567",
        "0.1234567",
        "1e-07",
        "3.3333333333333335",
    ):  # every digit of a rate survives the round trip
        again = parse_line(format_line(parse_line(f"b {digest} rate={rate} rate@erm={rate}", "here")), "there")
        assert again.limits.rate == float(rate) and again.on_model("erm").rate == float(rate)
    assert client.limits == LimitOverride(rate=5.0, quota=None)
    assert client.on_model("erm") == LimitOverride(rate=2.5, quota=7)
    assert client.on_model("coded") == LimitOverride(rate=INHERIT, quota=None)
    assert client.on_model("other") == NO_OVERRIDE


def test_limits_arithmetic_against_its_definition():
    """Random charges on a simulated clock: within any span the bucket passes at most burst + rate x span; every
    refusal's Retry-After is when that request would fit, and no earlier whole second; a quota window passes at most Q."""
    rng = random.Random(0)
    for trial in range(60):
        limits = Limits(
            rate=rng.choice([None, 0.5, 3.0, 20.0]),
            burst=rng.choice([1, 4, 8]),
            quota=rng.choice([None, 0, 5, 40]),
            window_s=rng.choice([10.0, 60.0]),
        )
        c, now, passed = Counters(), 0.0, []
        for _ in range(300):
            now += rng.expovariate(5.0)
            n = rng.randint(1, limits.burst)
            d = c.charge(CounterKey("x"), n, limits, now)
            if d.allowed:
                passed.append((now, n))
                continue
            assert d.reason
            if limits.quota is not None and n > limits.quota:  # can never fit: no Retry-After
                assert d.retry_after_s == 0 and ("never fit" in d.reason or "no items" in d.reason)
                continue
            assert d.retry_after_s >= 1

            # the same request fits at now + Retry-After, and not one whole second earlier (unless that is now)
            def later(dt, c=c, n=n, limits=limits, now=now):
                return Counters.charge(_copy(c), CounterKey("x"), n, limits, now + dt).allowed

            assert later(d.retry_after_s), (trial, limits, n, d)
            if d.retry_after_s > 1:
                assert not later(d.retry_after_s - 1), (trial, limits, n, d)
        if limits.rate is not None:
            for i, (t0, _) in enumerate(passed):
                for j in range(i, len(passed)):
                    span = passed[j][0] - t0
                    assert sum(m for _, m in passed[i : j + 1]) <= limits.burst + limits.rate * span + 1e-5
        if limits.quota is not None:
            starts = [t for t, _ in passed]
            for (
                t0
            ) in starts:  # a window starts at a passed charge; what passed in [t0, t0 + W) fits Q, or spans two windows
                inside = sum(m for t, m in passed if t0 <= t < t0 + limits.window_s)
                assert inside <= 2 * limits.quota
            # from the first charge, windows are back to back: each holds at most Q
            w0, used = passed[0][0] if passed else 0.0, 0
            for t, m in passed:
                if t >= w0 + limits.window_s:
                    w0, used = t, 0
                used += m
                assert used <= limits.quota


def _copy(c: Counters) -> Counters:
    out = Counters()
    out.buckets = {k: list(v) for k, v in c.buckets.items()}
    out.windows = {k: list(v) for k, v in c.windows.items()}
    return out


# ---- the keys file changes while the server runs -------------------------------------------------


def test_a_removed_key_is_refused_without_a_restart_and_a_broken_file_keeps_the_last_table(server, keys, digits):
    path, k = keys
    body = {"inputs": item(digits)}
    post = lambda key: httpx.post(server.url + "/v1/predict", json=body, headers=auth(key), timeout=30)  # noqa: E731
    assert post(k["dave"]).status_code == 200
    original = path.read_text()
    ok = metric(server, "codedsmooth_api_keys_reloads_total", result="ok")
    errors = metric(server, "codedsmooth_api_keys_reloads_total", result="error")
    try:
        # a broken line: the last good table stays in force (dave still answered), an error is logged and counted
        path.write_text(original + "frank not-a-digest\n")
        wait_for_metric(server, "codedsmooth_api_keys_reloads_total", lambda v: v == errors + 1, 30, result="error")
        server.wait_line(
            f"{path}, line 7: expected the SHA-256 of the key as 64 hex digits after the name (keys are never stored in clear); keeping the last good table (6 clients)"
        )
        assert post(k["dave"]).status_code == 200 and metric(server, "codedsmooth_api_keys_clients") == 6
        # dave's line removed (replaced by a rename, as editors do): refused from the reload on, the others answered
        t0 = time.monotonic()
        tmp = path.with_suffix(".new")
        tmp.write_text("".join(line + "\n" for line in original.splitlines() if not line.startswith("dave ")))
        os.replace(tmp, path)
        wait_for_metric(server, "codedsmooth_api_keys_reloads_total", lambda v: v == ok + 1, 30, result="ok")
        print(f"removed key refused after a reload {time.monotonic() - t0:.2f}s after the edit")
        assert metric(server, "codedsmooth_api_keys_clients") == 5
        r = post(k["dave"])
        assert r.status_code == 401 and r.json() == {"error": "unknown API key"}
        assert post(k["carol"]).status_code == 200
        # a new client is answered after the next reload
        new_key = add_key(path, "grace", quota="none")
        wait_for_metric(server, "codedsmooth_api_keys_reloads_total", lambda v: v == ok + 2, 30, result="ok")
        assert post(new_key).status_code == 200
    finally:
        path.write_text(original)


# ---- the client -------------------------------------------------------------------------------


def test_the_attack_client_sends_its_key_from_the_argument_or_the_environment(
    server, keys, digits, monkeypatch, tiny_checkpoint
):
    from codedsmooth.probe.targets import HttpTarget
    from codedsmooth.service.client import API_KEY_ENV, CodedSmoothClient
    from codedsmooth.service.errors import ServiceError

    _, k = keys
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ServiceError, match="HTTP 401") as exc:
        CodedSmoothClient(server.url).models()
    assert exc.value.status == 401
    target = HttpTarget(server.url, api_key=k["carol"])
    probs = target.predict_proba(digits.test_x[:3])
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1).numpy(), 1, atol=1e-5)
    target.close()
    monkeypatch.setenv(API_KEY_ENV, k["carol"])
    with CodedSmoothClient(server.url, protocol="v1") as client:
        assert client.predict(digits.test_x[:2].numpy()).shape == (2, 10)
    # a used-up quota (Retry-After of hours) is raised at once, not waited out
    with CodedSmoothClient(server.url, api_key=k["heidi"]) as client:
        assert client.predict(digits.test_x[:1].numpy()).shape == (1, 10)  # heidi's quota: one item
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match="HTTP 429"):
            client.predict(digits.test_x[:1].numpy())
        assert time.monotonic() - t0 < 10
    # the CLI's --api-key reaches the server (the environment holds no key here): the attack's queries are counted for that key's client
    monkeypatch.delenv(API_KEY_ENV)
    before = metric(server, "codedsmooth_client_items_total", client="carol")
    attack = [
        sys.executable,
        "-m",
        "codedsmooth",
        "attack",
        "--checkpoint",
        str(tiny_checkpoint),
        "--url",
        server.url,
        "--attack",
        "fgsm",
        "--threat",
        "transfer",
        "--eps",
        "0.1",
        "--samples",
        "10",
        "--api-key",
        k["carol"],
    ]
    keyed = subprocess.run(attack, capture_output=True, text=True, timeout=300)
    assert keyed.returncode == 0, keyed.stderr[-3000:]
    assert metric(server, "codedsmooth_client_items_total", client="carol") - before >= 10


# ---- safe defaults ------------------------------------------------------------------------------


def test_without_keys_a_server_reachable_from_other_hosts_warns():
    from codedsmooth.service.http.server import startup_warnings
    from codedsmooth.service.settings import ServeSettings

    open_warning = "without --api-keys-file anyone who reaches it may query"
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example"):
        warnings = startup_warnings(ServeSettings(host=host))
        assert sum(open_warning in w for w in warnings) == 1, (host, warnings)
        assert not any(open_warning in w for w in startup_warnings(ServeSettings(host=host, api_keys_file="keys.txt")))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert not any(open_warning in w for w in startup_warnings(ServeSettings(host=host))), host
    assert math.isclose(ServeSettings().quota_window_s, 86400)


def test_retry_after_stays_a_bounded_whole_number_for_extreme_limits():
    from codedsmooth.service.access.limits import MAX_RETRY_AFTER_S

    c = Counters()
    slow = Limits(rate=1e-300, burst=2, quota=None, window_s=60.0)
    assert c.charge(CounterKey("x"), 2, slow, 0.0).allowed
    refused = c.charge(CounterKey("x"), 1, slow, 1.0)
    assert not refused.allowed and 1 <= refused.retry_after_s <= MAX_RETRY_AFTER_S


def test_non_finite_limits_are_refused_by_the_settings():
    from pydantic import ValidationError

    from codedsmooth.service.settings import ServeSettings

    for field in ("quota_window_s", "rate_limit"):
        with pytest.raises(ValidationError, match="finite"):
            ServeSettings(api_keys_file="keys", quota=1, **{field: float("inf")})


def test_a_refused_request_with_a_body_closes_its_connection_unread(server):
    """No key, a declared 1 GB body: 401 at once, the connection closed, the body never read."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, "closed before an answer"
            head += chunk
        assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
        sent, closed = 0, False
        try:
            for _ in range(2000):  # at most 2 GB offered; the server must close long before
                sent += sock.send(b"0" * 1_000_000)
        except OSError:
            closed = True
        if not closed:
            sock.settimeout(10)
            closed = sock.recv(65536) == b""
        assert closed and sent < 1_000_000_000


def test_a_key_with_non_ascii_characters_matches_its_utf8_digest(tmp_path, tiny_checkpoint):
    import hashlib

    key = "clé-secrète"
    path = tmp_path / "keys"
    path.write_text(f"zoe {hashlib.sha256(key.encode()).hexdigest()} quota=none\n")
    path.chmod(0o600)
    import socket

    with (
        running_server(tiny_checkpoint, api_keys_file=path, rci=False) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock,
    ):
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_resolve_layers_each_override_over_what_it_inherits(tmp_path):
    """Access.resolve: a line's rate=/quota= over the server's flags; its rate@MODEL=/quota@MODEL= over the model's
    serving.json limits over none; INHERIT falls through a layer, None lifts the limit."""
    from types import SimpleNamespace

    from codedsmooth.service.access.control import Access
    from codedsmooth.service.access.keys import add_key
    from codedsmooth.service.access.overrides import NO_OVERRIDE, LimitOverride
    from codedsmooth.service.metrics import Metrics
    from codedsmooth.service.settings import ServeSettings

    path = tmp_path / "keys"
    keys = {name: add_key(path, name) for name in ("plain", "lifted")}
    with path.open("a") as f:
        f.write(f"own {'ab' * 32} quota=5 rate@m=none quota@m=3 rate@n=4\n")
    settings = ServeSettings(api_keys_file=str(path), rate_limit=10.0, quota=100, max_batch_size=8)
    access = Access(settings, Metrics(), lambda: ({"m", "n"}, set()))
    table = access.keys.table
    plain, own = table.find(keys["plain"]), next(c for c in table.clients.values() if c.name == "own")
    m = SimpleNamespace(name="m", key_limits=LimitOverride(rate=2.0), settings=ServeSettings(max_batch_size=4))
    n = SimpleNamespace(name="n", key_limits=NO_OVERRIDE, settings=ServeSettings(max_batch_size=4))

    def limits(client, model=None):
        return [(key, (lim.rate, lim.quota, lim.burst)) for key, lim in access.resolve(client, model)]

    assert limits(plain) == [(CounterKey("plain"), (10.0, 100, 8))]
    assert limits(plain, n) == [(CounterKey("plain"), (10.0, 100, 8))]  # no limit on n: no counters of its own
    assert limits(plain, m) == [(CounterKey("plain"), (10.0, 100, 8)), (CounterKey("plain", "m"), (2.0, None, 4))]
    assert limits(own, m) == [(CounterKey("own"), (10.0, 5, 8)), (CounterKey("own", "m"), (None, 3, 4))]
    assert limits(own, n) == [(CounterKey("own"), (10.0, 5, 8)), (CounterKey("own", "n"), (4.0, None, 4))]


# ---- quotas survive a restart (issue 29, item 3) ------------------------------------------------------------------


def _used(db_path) -> float | None:
    """Items used in the kept quota windows (None: nothing written yet); read as an outside reader would."""
    import sqlite3

    if not db_path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT sum(used) FROM quota_windows").fetchone()[0]
    except sqlite3.Error:  # the schema not written yet
        return None


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
def test_a_quota_used_up_before_a_restart_stays_used_up_after_it(tmp_path, tiny_checkpoint, digits, stop):
    import signal

    from helpers import ServerProcess

    keys = tmp_path / "keys.txt"
    dave = {"Authorization": f"Bearer {add_key(keys, 'dave', quota='5')}"}
    x = {"inputs": digits.test_x[:1].tolist()}
    state = tmp_path / "keys.txt.quota.sqlite"  # the default place: beside the keys file
    server = ServerProcess(tiny_checkpoint, api_keys_file=keys, rci=False)
    try:
        server.wait_ready()
        assert [httpx.post(server.url + "/v1/predict", json=x, headers=dave).status_code for _ in range(5)] == [200] * 5
        if stop == "kill -9":  # within the documented bound: once the writer has written the 5 (--quota-flush-ms)
            wait_until(lambda: _used(state) == 5, "the 5 items written to the quota state", 10)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(30)
        else:
            assert server.terminate() == 0
            assert _used(state) == 5  # a graceful stop writes what is left
    finally:
        server.terminate()
    again = ServerProcess(tiny_checkpoint, api_keys_file=keys, rci=False)
    try:
        again.wait_ready()
        r = httpx.post(again.url + "/v1/predict", json=x, headers=dave)
        assert r.status_code == 429 and "quota of 5 items per 86400 s used (0 left, 1 asked)" in r.json()["error"], (
            r.text
        )
    finally:
        again.terminate()
    fresh = ServerProcess(
        tiny_checkpoint, api_keys_file=keys, rci=False, quota_state="none"
    )  # in memory: today's fresh quota
    try:
        fresh.wait_ready()
        assert httpx.post(fresh.url + "/v1/predict", json=x, headers=dave).status_code == 200
    finally:
        fresh.terminate()


def test_persistent_counters_keep_each_keys_window_in_sqlite(tmp_path):
    from codedsmooth.service.access.quota_state import PersistentCounters, QuotaStore, quota_state_path

    assert quota_state_path(None, "/k/keys.txt") == __import__("pathlib").Path("/k/keys.txt.quota.sqlite")
    assert quota_state_path("none", "/k/keys.txt") is None and quota_state_path(None, None) is None
    limits = Limits(rate=None, burst=8, quota=10, window_s=60.0)
    store = QuotaStore(tmp_path / "q.sqlite", flush_s=3600.0)  # written only on close
    counters = PersistentCounters(store)
    now = time.monotonic()
    for key, items in ((CounterKey("a"), 4), (CounterKey("a", "erm"), 7), (CounterKey("b"), 10)):
        assert counters.charge(key, items, limits, now).allowed
    counters.refund(CounterKey("a"), 1, limits, now)
    store.close()
    reopened = PersistentCounters(QuotaStore(tmp_path / "q.sqlite", flush_s=3600.0))
    assert {k: v[1] for k, v in reopened.windows.items()} == {
        CounterKey("a"): 3,
        CounterKey("a", "erm"): 7,
        CounterKey("b"): 10,
    }
    assert not reopened.charge(CounterKey("b"), 1, limits, time.monotonic()).allowed
    assert reopened.charge(CounterKey("a"), 7, limits, time.monotonic()).allowed
    assert abs(reopened.windows[CounterKey("a")][0] - now) < 1.0  # the window's start survives, in this process's clock
    reopened.store.close()


def test_a_quota_state_that_cannot_be_written_is_one_cli_error(tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    add_key(keys, "dave", quota="5")
    where = tmp_path / "no-such-dir" / "q.sqlite"
    r = cli(capsys, "serve", "--api-keys-file", str(keys), "--quota-state", str(where), "--port", "0")
    assert (
        r.returncode == 2
        and f"{where}: cannot keep the quota counters there" in r.stderr
        and "--quota-state none" in r.stderr
    ), r.stderr
