"""SIGTERM to ``codedsmooth serve --replicas 2`` (its own local Ray) under load loses nothing.

How client outcomes are classified (see ``ray_helpers.outcome``):
- 200: answered;
- 503 (JSON error + Retry-After): refused, the replica is draining; the client may retry elsewhere;
- "connect"/"dropped": no HTTP answer, allowed only once the replicas have drained (the proxy
  then stops with Ray), i.e. for requests no replica accepted.
Nothing is lost when every request a replica accepted was answered 200 and reached its client:
the replicas' own counts (returned by their drain, logged by the server) equal the client's 200s.

Each client connection stops at its first refusal, as a well-behaved client would.
Synchronised on state: replica metrics (both replicas serving) and log lines; never on sleeps.
"""

import threading
import time
from collections import Counter

import httpx
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from helpers import wait_until  # noqa: E402
from ray_helpers import RayServer, outcome, served  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_sigterm_under_load_drains_every_replica_and_loses_nothing(tiny_checkpoint, digits):
    t0 = time.monotonic()
    server = RayServer(tiny_checkpoint, replicas=2, rci=False, max_delay_ms=2, num_cpus=1, drain_timeout_s=20)
    try:
        server.wait_ready()
        started, ready = server.startup_seconds()
        print(
            f"\nray: local cluster started by `codedsmooth serve --replicas 2` in {started:.1f}s; ready after {ready:.1f}s ({time.monotonic() - t0:.1f}s after launch)"
        )
        results: Counter = Counter()
        refusals: list[httpx.Response] = []
        body = {"inputs": digits.test_x[:2].tolist()}

        def client_loop():
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while True:
                    code, r = outcome(lambda: client.post("/v1/predict", json=body))
                    results[code] += 1
                    if code != 200:
                        if code == 503:
                            refusals.append(r)
                        return

        threads = [threading.Thread(target=client_loop) for _ in range(6)]
        for t in threads:
            t.start()

        # both replicas are serving this load
        def both_serving():
            m = server.replica_metrics()
            return len(m) == 2 and all(served(s, "/v1/predict") >= 10 for s in m.values())

        wait_until(both_serving, "load reaching both replicas", 120, interval=0.02)
        sigterm = time.monotonic()
        server.proc.terminate()
        for t in threads:
            t.join(120)
        code = server.proc.wait(120)
        exit_s = time.monotonic() - sigterm
        drained = server.drained()
    finally:
        server.terminate(60)
    answered = {d["replica"]: d["answered"].get("/v1/predict", {}) for d in drained}
    replica_200 = sum(a.get("200", 0) for a in answered.values())
    print(
        f"shutdown under load: client outcomes {dict(results)}; replicas answered {answered}; exit {code} {exit_s:.1f}s after SIGTERM"
    )
    assert code == 0
    assert len(drained) == 2 and all(d["finished"] for d in drained), drained
    assert set(results) <= {200, 503, "connect", "dropped"}, dict(results)
    assert results[200] == replica_200, "a request a replica answered 200 did not reach its client"
    assert all(set(a) <= {"200", "503"} for a in answered.values()), answered  # accepted work never failed
    for r in refusals:
        assert r.headers.get("retry-after") and "error" in r.json(), r.text
    assert "Traceback" not in server.output()
