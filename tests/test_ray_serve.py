"""Ray Serve replicas on a real local Ray (2 CPUs) started by this module: answers, spread, a killed replica.

The module starts Ray in the test process (``ray.init``, so it can read ``serve.status()`` and kill
a replica actor) and runs ``codedsmooth serve --replicas 2 --ray-address ADDR`` as a child
process, i.e. the attach-to-a-cluster path. Synchronised on state only: ``serve.status()``, the
replica actors Ray lists, the replicas' metrics and the server's log lines.
"""

import asyncio
import os
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from helpers import wait_until  # noqa: E402
from ray_helpers import RayServer, outcome, served  # noqa: E402

from codedsmooth.models import load_checkpoint  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPLICA_ACTOR = "SERVE_REPLICA::codedsmooth#CodedSmooth#"


@pytest.fixture(scope="module")
def ray_address():
    from codedsmooth.service.ray.serve import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    old = os.environ.get(PROXY_CALLBACK_ENV)
    os.environ[PROXY_CALLBACK_ENV] = (
        PROXY_CALLBACK  # the cluster's proxy inherits it (see docs/scale-out.md: attaching to a cluster)
    )
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"\nray: local cluster (2 CPUs) started in {time.monotonic() - t0:.1f}s")
    if old is None:
        os.environ.pop(PROXY_CALLBACK_ENV)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(ray_address, tiny_checkpoint):
    t0 = time.monotonic()
    server = RayServer(tiny_checkpoint, replicas=2, ray_address=ray_address, rci=False, max_delay_ms=2, num_cpus=1)
    try:
        server.wait_ready()
        joined, ready = server.startup_seconds()
        print(
            f"ray serve: 2 replicas ready {time.monotonic() - t0:.1f}s after launch (joined in {joined:.1f}s, ready after {ready:.1f}s)"
        )
        yield server
    finally:
        server.terminate(60)


def _replica_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(REPLICA_ACTOR)}


def _running_replicas() -> int:
    app = serve.status().applications.get("codedsmooth")
    if app is None or app.status != "RUNNING":
        return 0
    return app.deployments["CodedSmooth"].replica_states.get("RUNNING", 0)


def _wait(predicate, what: str, timeout: float = 120.0):
    return wait_until(predicate, what, timeout, interval=0.05)


def test_two_replicas_answer_like_in_process_inference_v1_v2_and_errors(ray_server, tiny_checkpoint, digits):
    import tritonclient.http as httpclient

    assert _running_replicas() == 2
    ck = load_checkpoint(tiny_checkpoint)
    x = digits.test_x[:40]
    with torch.no_grad():
        expected = torch.softmax(ck.model(x), 1).numpy()
    with httpx.Client(base_url=ray_server.url, timeout=30) as client:
        for i in range(0, 40, 4):  # several requests: both replicas answer some
            r = client.post("/v1/predict", json={"inputs": x[i : i + 4].tolist()})
            assert r.status_code == 200, r.text
            body = r.json()
            got = np.array([p["probabilities"] for p in body["predictions"]], dtype=np.float32)
            np.testing.assert_allclose(got, expected[i : i + 4], rtol=1e-5, atol=1e-6)
            assert [p["label"] for p in body["predictions"]] == [ck.classes[j] for j in expected[i : i + 4].argmax(1)]
            assert body["model"] == ck.name and body["rci"]["enabled"] is False
        # errors and health are the plain server's
        bad = client.post("/v1/predict", json={"inputs": [1]})
        assert bad.status_code == 422 and "error" in bad.json()
        assert client.get("/health/ready").json() == {"status": "ok"}
        assert client.get("/v2/models/nope").status_code == 404
        assert [m["name"] for m in client.get("/v1/models").json()] == [ck.name]

    triton = httpclient.InferenceServerClient(url=ray_server.url.removeprefix("http://"))
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(ck.name)
    xs = x[:8].numpy()
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(xs.shape), "FP32")
        inp.set_data_from_numpy(xs, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("index", binary_data=binary),
        ]
        result = triton.infer(ck.name, [inp], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected[:8], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("index"), expected[:8].argmax(1))
    triton.close()

    # the attack client's HTTP target, unchanged
    from codedsmooth.probe.targets import HttpTarget

    target = HttpTarget(ray_server.url, concurrency=8)
    assert target.info["name"] == ck.name and not target.info["rci"]["enabled"]
    np.testing.assert_allclose(target.predict_proba(x[:16]).numpy(), expected[:16], rtol=1e-5, atol=1e-6)


def test_requests_spread_over_both_replicas_as_their_metrics_show(ray_server, digits):
    before = {r: served(s, "/v1/predict") for r, s in ray_server.replica_metrics().items()}
    assert len(before) == 2, f"expected 2 replica metrics listeners, found {sorted(before)}"

    async def burst():
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as client:
            return await asyncio.gather(
                *[client.post("/v1/predict", json={"inputs": digits.test_x[i : i + 1].tolist()}) for i in range(60)]
            )

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 60
    after = {r: served(s, "/v1/predict") for r, s in ray_server.replica_metrics().items()}
    per_replica = {r: after[r] - before.get(r, 0) for r in after}
    print(f"spread of 60 concurrent requests over replicas: {per_replica}")
    assert sum(per_replica.values()) == 60
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica.values()), per_replica


def test_killed_replica_is_replaced_and_clients_see_only_200_or_503(ray_server, digits):
    """Load on 4 connections; one replica actor is killed; Ray starts a new one, which then serves.

    Ray's proxy stays up throughout, so every request must get an HTTP answer: 200, or 503 +
    Retry-After for a request on the killed replica. A connection error counts as a failure.
    """
    old = _replica_actors()
    assert len(old) == 2
    results: Counter = Counter()
    bad: list[str] = []
    stop = threading.Event()
    body = {"inputs": digits.test_x[:2].tolist()}

    def client_loop():
        with httpx.Client(base_url=ray_server.url, timeout=30) as client:
            while not stop.is_set():
                code, r = outcome(lambda: client.post("/v1/predict", json=body))
                results[code] += 1
                if code == 503 and not (r.headers.get("retry-after") and "error" in r.json()):
                    bad.append(r.text)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: results[200] >= 20, "load running")
        victim = sorted(old)[0]
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        _wait(lambda: victim not in _replica_actors(), "killed replica gone")
        new = _wait(
            lambda: (_replica_actors() - old) if len(_replica_actors()) == 2 else None, "a replacement replica actor"
        )
        _wait(lambda: _running_replicas() == 2, "2 running replicas again")
        replaced_s = time.monotonic() - t_kill
        new_id = next(iter(new)).rsplit("#", 1)[1]
        # the replacement serves: its own metrics count answered requests
        _wait(
            lambda: served(ray_server.replica_metrics().get(new_id, {}), "/v1/predict") > 0, "the new replica serving"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    print(f"killed replica replaced in {replaced_s:.1f}s; client outcomes under load: {dict(results)}")
    assert set(results) <= {200, 503}, dict(results)
    assert not bad, bad[:3]


def test_deployment_options_from_settings():
    """Fixed replicas or an autoscaling range, resources per replica, Ray's graceful shutdown from the drain timeout."""
    from codedsmooth.service.ray.serve import CodedSmoothReplica, deployment_options, replica_settings
    from codedsmooth.service.settings import ServeSettings

    fixed = deployment_options(
        ServeSettings(replicas=3, num_cpus=2, num_gpus=0.5, drain_timeout_s=10, max_queue_size=64)
    )
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert fixed["graceful_shutdown_timeout_s"] == 15.0 and fixed["max_ongoing_requests"] == 64
    auto = deployment_options(ServeSettings(replicas=2, min_replicas=1, max_replicas=6, max_batch_size=16))
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 16,
    }
    serve.deployment(CodedSmoothReplica).options(**auto)  # Ray accepts them
    serve.deployment(CodedSmoothReplica).options(**fixed)
    assert replica_settings(ServeSettings(replicas=2, num_cpus=3)).threads == 3
    assert replica_settings(ServeSettings(replicas=2, num_cpus=0.5)).threads == 1
    assert replica_settings(ServeSettings(replicas=2, num_cpus=4, threads=2)).threads == 2
