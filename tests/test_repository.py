"""A model repository on real servers: each model answers as a single-checkpoint server of it (v1, v2 JSON, v2 binary,
tritonclient), per-model queues under a flood, explicit load/unload/reload under load, weighted aliases, per-model
metrics, readiness and limits, and the repository's files refused with the file named.

Synchronised on state (queue-depth gauges, answers), never on sleeps.
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import (
    GOOD_ITEM,
    SLOW_SERVER,
    LoggedServer,
    ServerProcess,
    metric,
    running_server,
    wait_for_metric,
    wait_until,
)

from codedsmooth.service.access.keys import add_key
from codedsmooth.service.access.overrides import INHERIT, NO_OVERRIDE, LimitOverride
from codedsmooth.service.repository.files import RepositoryError, check_model_files, model_settings
from codedsmooth.service.settings import ServeSettings
from codedsmooth.train import TrainConfig, train


@pytest.fixture(scope="module")
def erm_checkpoint(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("ckpt-erm") / "tiny-erm"
    train(
        TrainConfig(
            method="erm", epochs=2, width=8, batch_size=16, out=str(out), progress=False, seed=1, filler_size=32
        ),
        data=digits,
    )
    return out


def make_repository(root, tiny_checkpoint, erm_checkpoint, repository: dict | None = None, serving: dict | None = None):
    """``root`` with the two test checkpoints as models "coded" and "erm" (``serving``: {model: its serving.json})."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_checkpoint, root / "coded")
    shutil.copytree(erm_checkpoint, root / "erm")
    if repository is not None:
        (root / "repository.json").write_text(json.dumps(repository))
    for name, values in (serving or {}).items():
        (root / name / "serving.json").write_text(json.dumps(values))
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_checkpoint, erm_checkpoint):
    return make_repository(tmp_path_factory.mktemp("repo") / "models", tiny_checkpoint, erm_checkpoint)


@pytest.fixture(scope="module")
def repo_server(repo):
    """One server of ``repo`` (RCI off) for the tests that only read from it."""
    with running_server(None, model_repository=repo, rci=False) as server:
        yield server


def v1(url, name, x) -> np.ndarray:
    path = "/v1/predict" if name is None else f"/v1/models/{name}/predict"
    r = httpx.post(url + path, json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)


def v2_json(url, name, x) -> np.ndarray:
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == name
    return np.array(out["outputs"][0]["data"], dtype=np.float32).reshape(out["outputs"][0]["shape"])


def v2_binary(url, name, x) -> np.ndarray:
    data = x.numpy().astype(np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = httpx.post(
        f"{url}/v2/models/{name}/infer",
        content=header + data,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    assert head["model_name"] == name
    return np.frombuffer(r.content[n:], dtype=np.float32).reshape(head["outputs"][0]["shape"])


def triton(url, name, x) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert client.is_model_ready(name)
        assert client.get_model_metadata(name)["inputs"][0]["shape"] == [-1, *x.shape[1:]]
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy(), binary_data=True)
        return client.infer(
            name, [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True)]
        ).as_numpy("probabilities")
    finally:
        client.close()


def test_each_model_answers_exactly_as_a_single_checkpoint_server_of_it(
    repo_server, tiny_checkpoint, erm_checkpoint, digits
):
    x = digits.test_x[:5]
    server = repo_server
    got = {name: [f(server.url, name, x) for f in (v1, v2_json, v2_binary, triton)] for name in ("coded", "erm")}
    listed = httpx.get(server.url + "/v1/models").json()
    index = httpx.post(server.url + "/v2/repository/index").json()
    assert [m["name"] for m in listed] == ["coded", "erm"]
    assert index == [
        {"name": "coded", "version": "1", "state": "READY"},
        {"name": "erm", "version": "1", "state": "READY"},
    ]
    for name, checkpoint in (("coded", tiny_checkpoint), ("erm", erm_checkpoint)):
        with running_server(checkpoint, rci=False) as single:
            (info,) = httpx.get(single.url + "/v1/models").json()
            own = info["name"]
            expected = [
                v1(single.url, None, x),
                v2_json(single.url, own, x),
                v2_binary(single.url, own, x),
                triton(single.url, own, x),
            ]
        for protocol, a, b in zip(("v1", "v2 JSON", "v2 binary", "tritonclient"), got[name], expected):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} over {protocol}")
    # the two models are different models: the test would see a mix-up
    assert np.abs(got["coded"][0] - got["erm"][0]).max() > 1e-3


def test_unknown_models_get_404_with_the_json_body_and_no_default_means_naming_one(repo_server, digits):
    item = {"inputs": digits.test_x[:1].tolist()}
    server = repo_server
    for method, path in (
        ("POST", "/v1/models/nope/predict"),
        ("POST", "/v2/models/nope/infer"),
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
    ):
        r = httpx.request(method, server.url + path, json=item)
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"], (path, r.text)
    r = httpx.post(server.url + "/v1/predict", json=item)
    assert r.status_code == 404 and "--default-model" in r.json()["error"]
    r = httpx.post(server.url + "/v2/repository/models/erm/unload")
    assert r.status_code == 403 and "--model-control explicit" in r.json()["error"]
    assert httpx.get(server.url + "/v2/models/erm/versions/2").status_code == 404
    assert httpx.get(server.url + "/v2/models/erm/versions/1/ready").status_code == 200


async def _flood(url, name, n, x):
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *[client.post(f"{url}/v1/models/{name}/predict", json={"inputs": x}) for _ in range(n)]
        )


def test_a_flood_on_one_model_does_not_starve_the_other(tmp_path, tiny_checkpoint, erm_checkpoint, digits, monkeypatch):
    """Model "coded" holds a backlog (one item per batch, each batch slowed); a request to "erm" is answered while that backlog is still there."""
    root = make_repository(
        tmp_path / "repo", tiny_checkpoint, erm_checkpoint, serving={"coded": {"max_batch_size": 1, "max_delay_ms": 0}}
    )
    monkeypatch.setenv("SLOW_BATCH_S", "0.05")
    monkeypatch.delenv("SLOW_ENGINE_GATE", raising=False)
    server = ServerProcess(None, program=SLOW_SERVER, model_repository=root, rci=False, timeout_ms=60000)
    x = digits.test_x[:1].tolist()
    try:
        server.wait_ready()

        async def scenario():
            flood = asyncio.ensure_future(_flood(server.url, "coded", 60, x))
            await asyncio.to_thread(
                wait_for_metric, server, "codedsmooth_queue_depth", lambda v: v >= 30, model="coded"
            )
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(f"{server.url}/v1/models/erm/predict", json={"inputs": x})
            backlog = await asyncio.to_thread(metric, server, "codedsmooth_queue_depth", model="coded")
            return r, backlog, await flood

        r, backlog, flooded = asyncio.run(scenario())
        assert r.status_code == 200 and r.json()["model"] == "erm"
        # one shared queue would have answered "erm" after the whole backlog; its own queue answers it after at most one "coded" batch
        assert backlog >= 20, f"'coded' still had {backlog} requests queued when 'erm' was answered"
        assert all(f.status_code == 200 for f in flooded)
        assert (
            metric(server, "codedsmooth_batch_size_count", model="coded") >= 60
        )  # one item per batch: its own max_batch_size
    finally:
        server.terminate()


async def _traffic(url, name, stop: asyncio.Event, x) -> list:
    out = []
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            r = await client.post(f"{url}/v1/models/{name}/predict", json={"inputs": x})
            out.append((r.status_code, r.json().get("model")))
    return out


def test_explicit_load_unload_and_reload_under_load(tmp_path, tiny_checkpoint, erm_checkpoint, digits):
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint, repository={"required": ["erm"]})
    x = digits.test_x[:2].tolist()
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        url = server.url

        async def reloads():
            stop = asyncio.Event()
            workers = [asyncio.ensure_future(_traffic(url, name, stop, x)) for name in ("coded", "coded", "erm", "erm")]
            async with httpx.AsyncClient(timeout=60) as client:
                await asyncio.to_thread(
                    wait_for_metric,
                    server,
                    "codedsmooth_requests_total",
                    lambda v: v >= 10,
                    endpoint="/v1/models/{name}/predict",
                    status="200",
                    model="erm",
                )
                answers = [await client.post(f"{url}/v2/repository/models/erm/load") for _ in range(2)]
                (root / "erm" / "serving.json").write_text(
                    '{"max_batch_size": 0}'
                )  # a broken new version: refused, the old one stays
                broken = await client.post(f"{url}/v2/repository/models/erm/load")
                (root / "erm" / "serving.json").unlink()
                before = metric(
                    server,
                    "codedsmooth_requests_total",
                    endpoint="/v1/models/{name}/predict",
                    status="200",
                    model="erm",
                )
                await asyncio.to_thread(
                    wait_for_metric,
                    server,
                    "codedsmooth_requests_total",
                    lambda v: v >= before + 10,
                    endpoint="/v1/models/{name}/predict",
                    status="200",
                    model="erm",
                )
            stop.set()
            return answers, broken, await asyncio.gather(*workers)

        answers, broken, traffic = asyncio.run(reloads())
        assert [a.status_code for a in answers] == [200, 200] and [a.json()["version"] for a in answers] == ["2", "3"]
        assert (
            broken.status_code == 400
            and "serving.json" in broken.json()["error"]
            and "max_batch_size" in broken.json()["error"]
        )
        for answers_of_one in traffic:
            assert answers_of_one and all(status == 200 for status, _ in answers_of_one), [
                a for a in answers_of_one if a[0] != 200
            ][:3]
        assert httpx.get(url + "/v2/models/erm").json()["versions"] == ["3"]

        # unload "erm" while "coded" is under load: "coded" loses nothing; "erm" is then 404, the server unready (it is required)
        async def unload():
            stop = asyncio.Event()
            workers = [asyncio.ensure_future(_traffic(url, "coded", stop, x)) for _ in range(2)]
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(f"{url}/v2/repository/models/erm/unload")
                gone = await client.post(f"{url}/v1/models/erm/predict", json={"inputs": x})
            stop.set()
            return r, gone, await asyncio.gather(*workers)

        r, gone, traffic = asyncio.run(unload())
        assert r.status_code == 200 and r.json()["state"] == "UNAVAILABLE"
        assert gone.status_code == 404 and "not loaded" in gone.json()["error"]
        assert all(status == 200 for w in traffic for status, _ in w)
        assert httpx.get(url + "/health/ready").status_code == 503 and metric(server, "codedsmooth_model_ready") == 0
        assert metric(server, "codedsmooth_model_loaded", model="erm") == 0

        # a broken checkpoint is refused with the file named; the others keep serving
        shutil.copytree(erm_checkpoint, root / "broken")
        (root / "broken" / "config.json").write_text("{not json")
        r = httpx.post(url + "/v2/repository/models/broken/load")
        assert (
            r.status_code == 400
            and "broken/config.json: not valid JSON" in r.json()["error"]
            and str(root) not in r.text
        )  # no server paths
        index = {e["name"]: e for e in httpx.post(url + "/v2/repository/index").json()}
        assert index["broken"]["state"] == "UNAVAILABLE" and "config.json" in index["broken"]["reason"]
        assert httpx.post(url + "/v2/repository/models/elsewhere/load").status_code == 404
        v1(url, "coded", digits.test_x[:1])

        assert httpx.post(url + "/v2/repository/models/erm/load").json() == {
            "name": "erm",
            "version": "4",
            "state": "READY",
        }
        assert httpx.get(url + "/health/ready").status_code == 200 and metric(server, "codedsmooth_model_ready") == 1


def test_a_weighted_alias_routes_by_its_weights_and_every_answer_names_its_model(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits
):
    root = make_repository(
        tmp_path / "repo", tiny_checkpoint, erm_checkpoint, repository={"aliases": {"ab": {"coded": 0.9, "erm": 0.1}}}
    )
    x = digits.test_x[:1].tolist()
    with running_server(None, model_repository=root, default_model="ab", rci=False) as server:

        async def many(n):
            async with httpx.AsyncClient(timeout=60) as client:
                sem = asyncio.Semaphore(16)

                async def one():
                    async with sem:
                        return await client.post(server.url + "/v1/predict", json={"inputs": x})

                return await asyncio.gather(*[one() for _ in range(n)])

        answers = asyncio.run(many(1000))
        assert all(a.status_code == 200 for a in answers)
        names = [a.json()["model"] for a in answers]
        share = names.count("coded") / len(names)
        assert abs(share - 0.9) <= 0.05, f"{share:.3f} of 1000 requests went to 'coded' (weight 0.9)"
        assert set(names) == {"coded", "erm"}
        # the metrics count per model, as the answers say
        for name in ("coded", "erm"):
            assert metric(
                server, "codedsmooth_requests_total", endpoint="/v1/predict", status="200", model=name
            ) == names.count(name)
        # each answer is the named model's own: the alias's answers equal that model's direct answers (batched with
        # others, so BLAS may sum in another order: float32 rounding only; the two models differ by far more)
        direct = {name: v1(server.url, name, digits.test_x[:1]) for name in ("coded", "erm")}
        assert np.abs(direct["coded"] - direct["erm"]).max() > 1e-3
        for a in answers[:50]:
            np.testing.assert_allclose(
                np.array([a.json()["predictions"][0]["probabilities"]], dtype=np.float32),
                direct[a.json()["model"]],
                rtol=0,
                atol=1e-6,
            )
        v2_names = {v2_json_model_name(server.url, "ab", digits.test_x[:1]) for _ in range(40)}
        assert v2_names == {"coded", "erm"} or v2_names == {"coded"}  # 40 draws at 10 %: "erm" is likely, not certain
        assert httpx.get(server.url + "/v2/models/ab/ready").status_code == 200


def v2_json_model_name(url, name, x) -> str:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["model_name"]


def test_a_models_own_settings_and_per_key_quota(tmp_path, tiny_checkpoint, erm_checkpoint, digits):
    keys = tmp_path / "keys.txt"
    key = add_key(keys, "alice")
    root = make_repository(
        tmp_path / "repo",
        tiny_checkpoint,
        erm_checkpoint,
        serving={"erm": {"quota": 3, "rci": False, "max_batch_size": 4}},
    )
    auth = {"Authorization": f"Bearer {key}"}
    x = digits.test_x[:1].tolist()
    with running_server(None, model_repository=root, api_keys_file=keys) as server:
        listed = {m["name"]: m for m in httpx.get(server.url + "/v1/models", headers=auth).json()}
        assert (
            listed["erm"]["rci"]["enabled"] is False and listed["coded"]["rci"]["enabled"] is True
        )  # each its own spec
        r = httpx.post(server.url + "/v1/models/erm/predict", json={"inputs": digits.test_x[:5].tolist()}, headers=auth)
        assert r.status_code == 413  # its max_batch_size of 4 bounds its requests
        for _ in range(3):
            assert (
                httpx.post(server.url + "/v1/models/erm/predict", json={"inputs": x}, headers=auth).status_code == 200
            )
        r = httpx.post(server.url + "/v1/models/erm/predict", json={"inputs": x}, headers=auth)
        assert r.status_code == 429 and "on model 'erm'" in r.json()["error"]
        for _ in range(5):  # the quota is the model's: the other model is not limited
            assert (
                httpx.post(server.url + "/v1/models/coded/predict", json={"inputs": x}, headers=auth).status_code == 200
            )


def test_a_clients_own_limits_on_a_model_override_the_models(tmp_path, tiny_checkpoint, erm_checkpoint, digits):
    """erm sets quota 2 per key in its serving.json; batch lifts it for itself (quota@erm=none); capped gets a quota of 1
    on coded, which sets none; alice keeps the model's. Overrides naming no model (a typo, an alias) are warned of,
    at start and when the file is reloaded."""
    keys = tmp_path / "keys.txt"
    key = {name: add_key(keys, name) for name in ("alice", "batch", "capped")}
    own = {"alice": " quota@emr=3 rate@ab=2", "batch": " quota@erm=none", "capped": " quota@coded=1"}
    keys.write_text("".join(line + own[line.split()[0]] + "\n" for line in keys.read_text().splitlines()))
    root = make_repository(
        tmp_path / "repo",
        tiny_checkpoint,
        erm_checkpoint,
        repository={"aliases": {"ab": {"coded": 0.5, "erm": 0.5}}},
        serving={"erm": {"quota": 2, "rci": False}},
    )
    x = {"inputs": digits.test_x[:1].tolist()}

    def answers(name: str, model: str, n: int) -> list[int]:
        return [
            httpx.post(
                f"{server.url}/v1/models/{model}/predict", json=x, headers={"Authorization": f"Bearer {key[name]}"}
            ).status_code
            for _ in range(n)
        ]

    server = LoggedServer(None, model_repository=root, api_keys_file=keys)
    try:
        server.wait_ready()
        assert (
            "client 'alice': quota@emr names no model of this server (coded, erm); it limits nothing"
            in server.wait_line("quota@emr")
        )
        assert "rate@ab names an alias" in server.wait_line("rate@ab")
        assert answers("alice", "erm", 3) == [200, 200, 429]
        assert answers("batch", "erm", 5) == [200] * 5
        assert answers("capped", "erm", 3) == [200, 200, 429]  # erm's quota of 2, not its own 1 on coded
        assert answers("capped", "coded", 2) == [200, 429]
        assert answers("alice", "coded", 4) == [200] * 4
        with keys.open("a") as f:  # a client added while the server runs: its typo is warned of on the reload
            f.write(f"late {'ab' * 32} quota@cdoed=1\n")
        assert "client 'late': quota@cdoed names no model" in server.wait_line("quota@cdoed")
    finally:
        server.terminate()


def test_with_api_keys_only_a_client_with_manage_yes_loads_and_unloads(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits
):
    keys = tmp_path / "keys.txt"
    reader, ops = add_key(keys, "reader"), add_key(keys, "ops", manage=True)
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    x = {"inputs": digits.test_x[:1].tolist()}
    as_reader, as_ops = {"Authorization": f"Bearer {reader}"}, {"Authorization": f"Bearer {ops}"}
    with running_server(None, model_repository=root, model_control="explicit", api_keys_file=keys, rci=False) as server:
        for action in ("unload", "load"):
            r = httpx.post(f"{server.url}/v2/repository/models/erm/{action}", headers=as_reader)
            assert (
                r.status_code == 403
                and "'reader' may not load or unload models" in r.json()["error"]
                and "manage=yes" in r.json()["error"]
            ), r.text
        assert httpx.post(f"{server.url}/v2/repository/models/erm/unload").status_code == 401  # no key at all
        states = {
            e["name"]: e["state"] for e in httpx.post(server.url + "/v2/repository/index", headers=as_reader).json()
        }
        assert states == {
            "coded": "READY",
            "erm": "READY",
        }  # the refused calls changed nothing; the index is every client's
        assert httpx.post(server.url + "/v1/models/erm/predict", json=x, headers=as_reader).status_code == 200
        r = httpx.post(f"{server.url}/v2/repository/models/erm/unload", headers=as_ops)
        assert r.status_code == 200 and r.json()["state"] == "UNAVAILABLE", r.text
        assert httpx.post(server.url + "/v1/models/erm/predict", json=x, headers=as_reader).status_code == 404
        r = httpx.post(f"{server.url}/v2/repository/models/erm/load", headers=as_ops)
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        assert httpx.post(server.url + "/v1/models/erm/predict", json=x, headers=as_reader).status_code == 200


def test_model_settings_files_are_validated_with_the_file_named(tmp_path):
    base = ServeSettings()
    (tmp_path / "serving.json").write_text('{"max_batch_size": 8, "rci_scope": "batch"}')
    settings, limits = model_settings(base, tmp_path)
    assert (settings.max_batch_size, settings.max_items_per_request, settings.rci_scope, limits) == (
        8,
        8,
        "batch",
        NO_OVERRIDE,
    )
    assert settings.max_delay_ms == base.max_delay_ms  # the server's flags are the defaults
    keyed = ServeSettings(api_keys_file="keys", rate_limit=50.0, quota=1000)
    (tmp_path / "serving.json").write_text('{"quota": 5, "rate_limit": null}')
    settings, limits = model_settings(keyed, tmp_path)
    assert limits == LimitOverride(rate=None, quota=5)  # null: no per-key rate on this model; unset: INHERIT
    assert (settings.rate_limit, settings.quota) == (50.0, 1000)  # the server's stay the keys' overall limits
    (tmp_path / "serving.json").write_text('{"quota": 5}')
    assert model_settings(keyed, tmp_path)[1] == LimitOverride(rate=INHERIT, quota=5)
    for text, problem in (
        ('{"max_batch_sise": 8}', "unknown setting"),
        ('{"max_delay_ms": -1}', "max_delay_ms"),
        ('{"rci_scope": "everything"}', "rci_scope"),
        ('{"quota": 5}', "need api_keys_file"),
        ("[1, 2]", "JSON object"),
        ("{", "not valid JSON"),
    ):
        (tmp_path / "serving.json").write_text(text)
        with pytest.raises(RepositoryError, match=problem) as err:
            model_settings(base, tmp_path)
        assert str(tmp_path / "serving.json") in str(err.value)


def serve_error(*args) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "codedsmooth.cli", "serve", "--port", "0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    return r.stderr


def test_the_cli_refuses_bad_repositories_with_the_file_named(tmp_path, tiny_checkpoint, erm_checkpoint):
    root = make_repository(
        tmp_path / "repo", tiny_checkpoint, erm_checkpoint, repository={"aliases": {"ab": {"coded": 1, "gone": 1}}}
    )
    error = serve_error("--model-repository", str(root))
    assert "ab" in error and "'gone' is no model of the repository" in error
    (root / "repository.json").unlink()
    assert "not both" in serve_error("--model-repository", str(root), "--checkpoint", str(tiny_checkpoint))
    assert "neither a model nor an alias" in serve_error("--model-repository", str(root), "--default-model", "nope")
    (root / "erm" / "model.safetensors").unlink()
    assert str(root / "erm" / "model.safetensors") in serve_error("--model-repository", str(root))


def test_explicit_load_takes_only_the_repositorys_own_model_directories(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits
):
    """'..' (percent-encoded, as a client can send it), '.' and hidden directories are no models: 404, nothing loaded."""
    root = make_repository(tmp_path / "parent" / "repo", tiny_checkpoint, erm_checkpoint)
    for f in tiny_checkpoint.iterdir():  # a valid checkpoint one level above the repository
        shutil.copy(f, tmp_path / "parent" / f.name)
    shutil.copytree(
        erm_checkpoint, root / ".staging"
    )  # a hidden directory (as save_checkpoint writes): skipped at start
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        for name in ("%2E%2E", "%2E", ".staging"):
            r = httpx.post(f"{server.url}/v2/repository/models/{name}/load")
            assert r.status_code == 404 and "unknown model" in r.json()["error"], (name, r.status_code, r.text)
            r = httpx.post(f"{server.url}/v1/models/{name}/predict", json={"inputs": digits.test_x[:1].tolist()})
            assert r.status_code == 404, (name, r.text)
        assert [e["name"] for e in httpx.post(server.url + "/v2/repository/index").json()] == ["coded", "erm"]
        assert [m["name"] for m in httpx.get(server.url + "/v1/models").json()] == ["coded", "erm"]


def test_unloading_a_model_whose_directory_is_gone_answers_its_state(tmp_path, tiny_checkpoint, erm_checkpoint):
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        shutil.rmtree(root / "erm")  # the operator removes a model's files, then unloads it
        r = httpx.post(server.url + "/v2/repository/models/erm/unload")
        assert r.status_code == 200 and r.json() == {"name": "erm", "state": "UNAVAILABLE", "reason": "unloaded"}, (
            r.text
        )
        assert [e["name"] for e in httpx.post(server.url + "/v2/repository/index").json()] == ["coded"]


def test_a_model_first_loaded_explicitly_is_version_1(tmp_path, tiny_checkpoint, erm_checkpoint):
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        shutil.copytree(tiny_checkpoint, root / "added")  # a model added to the repository after start
        assert httpx.post(server.url + "/v2/repository/models/added/load").json() == {
            "name": "added",
            "version": "1",
            "state": "READY",
        }
        assert httpx.get(server.url + "/v2/models/added").json()["versions"] == ["1"]
        assert (
            httpx.post(server.url + "/v2/repository/models/added/load").json()["version"] == "2"
        )  # a reload: the next version


def test_explicit_load_refuses_a_directory_named_as_an_alias(tmp_path, tiny_checkpoint, erm_checkpoint, digits):
    root = make_repository(
        tmp_path / "repo", tiny_checkpoint, erm_checkpoint, repository={"aliases": {"ab": {"coded": 1, "erm": 1}}}
    )
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        shutil.copytree(tiny_checkpoint, root / "ab")  # would shadow the alias: refused, as at start-up
        r = httpx.post(server.url + "/v2/repository/models/ab/load")
        assert (
            r.status_code == 400
            and "repository.json: alias" in r.json()["error"]
            and str(root) not in r.text
            and "alias 'ab'" in r.json()["error"]
        ), r.text
        names = {
            httpx.post(server.url + "/v1/models/ab/predict", json={"inputs": digits.test_x[:1].tolist()}).json()[
                "model"
            ]
            for _ in range(20)
        }
        assert names <= {"coded", "erm"} and names, names  # the alias still routes to its models


def test_a_request_still_held_when_its_model_is_unloaded_is_told_so(tmp_path, tiny_checkpoint, erm_checkpoint):
    """Past the drain timeout an unload answers what is left 503: the message says the model was unloaded, not that the server stops."""
    import socket

    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    body = json.dumps({"inputs": [GOOD_ITEM]}).encode()
    with running_server(
        None, model_repository=root, model_control="explicit", rci=False, drain_timeout_s=0.2, body_timeout_s=60
    ) as server:
        with socket.create_connection(
            ("127.0.0.1", server.port), timeout=60
        ) as slow:  # routed to "erm", its body still coming
            slow.sendall(
                b"POST /v1/models/erm/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body[:5])
            )
            wait_for_metric(server, "codedsmooth_requests_in_flight", lambda v: v == 1)
            assert httpx.post(server.url + "/v2/repository/models/erm/unload", timeout=60).status_code == 200
            slow.sendall(body[5:])
            answer = b""
            while b"}" not in answer:
                answer += slow.recv(4096)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and "model 'erm' was unloaded" in json.loads(payload)["error"], answer
        assert httpx.get(server.url + "/health/live").json()["status"] == "ok"  # the server is not shutting down


def test_with_a_thread_per_model_a_held_batch_holds_only_its_own_model(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits, monkeypatch
):
    """Model "coded"'s first batch is held on its thread (a gate the test opens only after the other answer came);
    meanwhile a request to "erm" is answered. On the one shared thread (the default) it would wait behind the held
    batch, the gate would open only at the engine's own 60 s limit, and "coded" would answer first."""
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("SLOW_ENGINE_GATE", str(gate))
    monkeypatch.setenv("SLOW_ENGINE_METHOD", "coded")
    server = ServerProcess(
        None,
        program=SLOW_SERVER,
        model_repository=root,
        model_threads="per-model",
        threads=1,
        rci=False,
        max_delay_ms=0,
        timeout_ms=90000,
    )
    x = digits.test_x[:1].tolist()
    try:
        server.wait_ready()

        async def scenario():
            async with httpx.AsyncClient(timeout=90) as client:
                held = asyncio.ensure_future(client.post(f"{server.url}/v1/models/coded/predict", json={"inputs": x}))
                await asyncio.to_thread(
                    wait_until, lambda: (gate / "entered").exists(), "the held batch on the model thread", 60
                )
                other = asyncio.ensure_future(client.post(f"{server.url}/v1/models/erm/predict", json={"inputs": x}))
                done, _ = await asyncio.wait({held, other}, return_when=asyncio.FIRST_COMPLETED)
                first = "erm" if other in done else "coded"
                (gate / "open").touch()
                return first, await held, await other

        first, held, other = asyncio.run(scenario())
        assert held.status_code == 200 and other.status_code == 200 and other.json()["model"] == "erm"
        assert first == "erm"
    finally:
        server.terminate()


# ---- loads never stall serving; clients see no server paths (issue 29, items 2 and 5) ----------------------------

SLOW_LOAD_SERVER = [sys.executable, str(Path(__file__).with_name("slow_load_server.py"))]


async def _answers_while(url: str, name: str, x, metrics_url: str, busy) -> list[tuple[str, int, float]]:
    """Requests to ``name``, /health/live and /metrics, one after another, until ``busy()`` is false: (what, status, seconds)."""
    seen = []
    async with httpx.AsyncClient(timeout=10) as client:
        while busy() or not seen:
            for what, call in (
                ("predict", client.post(f"{url}/v1/models/{name}/predict", json=x)),
                ("live", client.get(url + "/health/live")),
                ("metrics", client.get(metrics_url + "/metrics")),
            ):
                t0 = time.monotonic()
                r = await call
                seen.append((what, r.status_code, time.monotonic() - t0))
    return seen


def _load_in_background(url: str, name: str) -> tuple[threading.Thread, list]:
    answer: list = []
    thread = threading.Thread(
        target=lambda: answer.append(httpx.post(f"{url}/v2/repository/models/{name}/load", timeout=60)), daemon=True
    )
    thread.start()
    return thread, answer


@pytest.mark.alone  # bounds another model's latency during the load
def test_a_fifo_in_a_model_directory_is_refused_at_once_while_another_model_answers(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits
):
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    x = {"inputs": digits.test_x[:1].tolist()}
    with running_server(None, model_repository=root, model_control="explicit", rci=False) as server:
        shutil.copytree(erm_checkpoint, root / "piped")
        (root / "piped" / "model.safetensors").unlink()
        os.mkfifo(root / "piped" / "model.safetensors")  # opening it would block until a writer comes
        assert (
            httpx.post(f"{server.url}/v1/models/coded/predict", json=x).status_code == 200
        )  # a first request, as before any load
        thread, answer = _load_in_background(server.url, "piped")
        seen = asyncio.run(_answers_while(server.url, "coded", x, server.metrics_url, thread.is_alive))
        thread.join()
        r = answer[0]
        assert (
            r.status_code == 400
            and "piped/model.safetensors: a FIFO; only regular files are loaded" in r.json()["error"]
        ), r.text
        assert r.elapsed.total_seconds() < 5
        assert all(status == 200 for _, status, _ in seen), seen
        print(
            f"\nduring a FIFO load: {len(seen)} answers of another model, /health/live and /metrics, slowest {max(s for *_, s in seen) * 1000:.0f} ms"
        )
        assert max(s for *_, s in seen) < 1.0
        index = {e["name"]: e for e in httpx.post(server.url + "/v2/repository/index").json()}
        assert index["piped"]["state"] == "UNAVAILABLE" and "FIFO" in index["piped"]["reason"]


@pytest.mark.alone  # bounds another model's latency during the load
def test_a_stuck_load_fails_at_its_timeout_while_the_shared_model_thread_serves(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits, monkeypatch
):
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("SLOW_LOAD_MODEL", "stuck")
    monkeypatch.setenv("SLOW_LOAD_GATE", str(gate))
    x = {"inputs": digits.test_x[:1].tolist()}
    server = ServerProcess(
        None, program=SLOW_LOAD_SERVER, model_repository=root, model_control="explicit", rci=False, load_timeout_s=3
    )
    try:
        server.wait_ready()
        shutil.copytree(erm_checkpoint, root / "stuck")
        thread, answer = _load_in_background(server.url, "stuck")
        wait_until(lambda: (gate / "entered").exists(), "the load to be held")
        seen = asyncio.run(_answers_while(server.url, "coded", x, server.metrics_url, thread.is_alive))
        thread.join()
        r = answer[0]
        assert (
            r.status_code == 504 and "stuck: the load did not finish within 3 s (--load-timeout-s)" in r.json()["error"]
        ), r.text
        assert str(root) not in r.text
        assert all(status == 200 for _, status, _ in seen), seen
        print(
            f"\nduring a stuck load (3 s timeout): {len(seen)} answers, slowest {max(s for *_, s in seen) * 1000:.0f} ms"
        )
        assert max(s for *_, s in seen) < 1.0
        index = {e["name"]: e for e in httpx.post(server.url + "/v2/repository/index").json()}
        assert index["stuck"]["state"] == "UNAVAILABLE" and "did not finish" in index["stuck"]["reason"]
        (gate / "open").touch()  # the abandoned load ends; its result is dropped
        r = httpx.post(f"{server.url}/v2/repository/models/coded/load", timeout=60)
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
    finally:
        (gate / "open").touch()
        server.terminate()


def test_a_failed_loads_reason_shows_server_paths_only_to_management_clients(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits
):
    keys = tmp_path / "keys.txt"
    reader, ops = add_key(keys, "reader"), add_key(keys, "ops", manage=True)
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    as_reader, as_ops = {"Authorization": f"Bearer {reader}"}, {"Authorization": f"Bearer {ops}"}
    server = LoggedServer(
        None, model_repository=root, model_control="explicit", api_keys_file=keys, rci=False, log_level="info"
    )
    try:
        server.wait_ready()
        shutil.copytree(erm_checkpoint, root / "broken")
        config = json.loads((root / "broken" / "config.json").read_text())
        config["format_version"] = None
        (root / "broken" / "config.json").write_text(json.dumps(config))
        r = httpx.post(f"{server.url}/v2/repository/models/broken/load", headers=as_ops)
        assert r.status_code == 400 and "broken/config.json: format_version None, expected 1" in r.json()["error"], (
            r.text
        )
        full = str(root / "broken" / "config.json")
        assert full not in r.text
        assert full in server.wait_line("load of broken refused")  # the operator's log has the path
        for headers in (as_reader, as_ops):
            r = httpx.post(
                f"{server.url}/v1/models/broken/predict", json={"inputs": digits.test_x[:1].tolist()}, headers=headers
            )
            assert (
                r.status_code == 404
                and "broken/config.json: format_version None" in r.json()["error"]
                and str(root) not in r.text
            ), r.text
        reasons = {
            who: {
                e["name"]: e.get("reason") for e in httpx.post(server.url + "/v2/repository/index", headers=h).json()
            }["broken"]
            for who, h in (("reader", as_reader), ("ops", as_ops))
        }
        assert reasons["reader"] == "broken/config.json: format_version None, expected 1", reasons
        assert reasons["ops"] == f"{full}: format_version None, expected 1", reasons
    finally:
        server.terminate()


def test_model_files_are_regular_and_inside_the_repository(tmp_path, tiny_checkpoint):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(tiny_checkpoint, root / "ok")
    check_model_files(root, "ok")
    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint, outside)
    (root / "linked").mkdir()
    (root / "linked" / "config.json").symlink_to(outside / "config.json")
    (root / "linked" / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(RepositoryError, match="linked/config.json: a symlink that leads outside the model repository"):
        check_model_files(root, "linked")
    check_model_files(root, "linked", allow_external=True)
    (root / "whole").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RepositoryError, match="whole: a symlink that leads outside"):
        check_model_files(root, "whole")
    (root / "inner").mkdir()
    (root / "inner" / "config.json").symlink_to(root / "ok" / "config.json")  # inside: allowed
    check_model_files(root, "inner")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "ok" / "sock"))
        with pytest.raises(RepositoryError, match="ok/sock: a socket; only regular files are loaded"):
            check_model_files(root, "ok")


def test_a_file_swapped_for_a_fifo_after_the_check_is_refused_when_it_is_opened(
    tmp_path, tiny_checkpoint, erm_checkpoint, digits, monkeypatch
):
    """Each load of "raced" is held (tests/slow_load_server.py) after ``check_model_files`` found regular files and
    before the checkpoint is read; meanwhile the test swaps one of its files for a FIFO, then lets the load go on.
    The read opens without blocking and refuses the FIFO at once (400 naming it); a blocking open would wait for a
    writer until the load timeout (504)."""
    root = make_repository(tmp_path / "repo", tiny_checkpoint, erm_checkpoint)
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("SLOW_LOAD_MODEL", "raced")
    monkeypatch.setenv("SLOW_LOAD_GATE", str(gate))
    x = {"inputs": digits.test_x[:1].tolist()}
    server = ServerProcess(
        None, program=SLOW_LOAD_SERVER, model_repository=root, model_control="explicit", rci=False, load_timeout_s=20
    )
    try:
        server.wait_ready()
        shutil.copytree(erm_checkpoint, root / "raced")
        for swapped in ("model.safetensors", "config.json", "robustness.json"):
            path = root / "raced" / swapped
            for signal in ("entered", "open"):
                (gate / signal).unlink(missing_ok=True)
            thread, answer = _load_in_background(server.url, "raced")
            wait_until(lambda: (gate / "entered").exists(), "the load to be held after its check")
            path.unlink(missing_ok=True)
            os.mkfifo(path)
            (gate / "open").touch()
            thread.join()
            assert answer, f"{swapped}: no answer to the load within 60 s (a read blocked on the FIFO)"
            r = answer[0]
            assert (
                r.status_code == 400 and f"raced/{swapped}: a FIFO; only regular files are loaded" in r.json()["error"]
            ), r.text
            path.unlink()
            if (erm_checkpoint / swapped).exists():
                shutil.copy(erm_checkpoint / swapped, path)
        r = httpx.post(f"{server.url}/v2/repository/models/raced/load", timeout=60)  # its files regular again
        assert r.status_code == 200 and r.json()["state"] == "READY", r.text
        for name in ("raced", "coded"):
            assert httpx.post(f"{server.url}/v1/models/{name}/predict", json=x).status_code == 200
    finally:
        (gate / "open").touch()
        server.terminate()


def test_a_fifo_read_as_a_model_setting_file_is_refused_without_waiting_for_a_writer(tmp_path, tiny_checkpoint):
    """``model_settings`` reads serving.json without ``check_model_files`` before it: the read itself refuses a FIFO.
    (The timer only releases a blocked open, so that a regression fails here instead of hanging.)"""
    shutil.copytree(tiny_checkpoint, tmp_path / "m")
    fifo = tmp_path / "m" / "serving.json"
    os.mkfifo(fifo)

    def release() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader is blocked in open
        except OSError:
            pass

    watchdog = threading.Timer(10, release)
    watchdog.start()
    try:
        with pytest.raises(RepositoryError, match="m/serving.json: a FIFO; only regular files are loaded"):
            model_settings(ServeSettings(), tmp_path / "m")
    finally:
        watchdog.cancel()
