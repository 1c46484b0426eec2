"""Per-key limits across Ray Serve replicas: ``codedsmooth serve --replicas 2 --quota 50`` (its own local Ray)
answers one key at most 50 items in all, whichever replica Ray's router picks.

Synchronised on state: the replicas' metrics and the answers; never on sleeps.
"""

import asyncio
import sqlite3
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from helpers import wait_until  # noqa: E402
from ray_helpers import RayServer, served  # noqa: E402

from codedsmooth.service.access.keys import add_key  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUOTA = 50


def _per_replica(samples: dict, name: str, **labels) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


def test_two_replicas_hold_one_quota_per_key(tiny_checkpoint, digits, tmp_path):
    keys = tmp_path / "keys.txt"
    alice, bob = add_key(keys, "alice"), add_key(keys, "bob")
    t0 = time.monotonic()
    server = RayServer(
        tiny_checkpoint, replicas=2, api_keys_file=keys, quota=QUOTA, rci=False, max_delay_ms=2, num_cpus=1
    )
    try:
        server.wait_ready()
        server.wait_line(r"Ray Serve ready: 2 replicas")  # the application is running: both replicas are up

        def both_ready():
            m = server.replica_metrics()
            return len(m) == 2 and all(_per_replica(s, "codedsmooth_model_ready") == 1 for s in m.values())

        wait_until(both_ready, "both replicas ready", 120, interval=0.05)
        print(f"\nray serve with keys: 2 replicas ready {time.monotonic() - t0:.1f}s after launch")
        body = {"inputs": digits.test_x[:1].tolist()}
        assert httpx.post(server.url + "/v1/predict", json=body).status_code == 401  # through Ray's proxy too

        async def burst(key: str, n: int):
            async with httpx.AsyncClient(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
            ) as client:
                return await asyncio.gather(*[client.post("/v1/predict", json=body) for _ in range(n)])

        answers = asyncio.run(burst(alice, 80))
        codes = [r.status_code for r in answers]
        print(
            f"80 concurrent one-item requests of one key across 2 replicas: {codes.count(200)} x 200, {codes.count(429)} x 429"
        )
        assert codes.count(200) == QUOTA and codes.count(429) == 80 - QUOTA, (
            sorted(set(codes)),
            server.output()[-3000:],
        )
        assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)
        # both replicas took part: each answered some of alice's requests (200 or 429), and their counts add up
        replicas = server.replica_metrics()
        assert len(replicas) == 2, sorted(replicas)
        got = {r: (served(s, "/v1/predict", "200"), served(s, "/v1/predict", "429")) for r, s in replicas.items()}
        print(f"per replica (200, 429): {got}")
        assert all(ok + refused > 0 for ok, refused in got.values()), got
        assert sum(ok for ok, _ in got.values()) == QUOTA and sum(refused for _, refused in got.values()) == 80 - QUOTA
        assert (
            sum(_per_replica(s, "codedsmooth_client_items_total", client="alice") for s in replicas.values()) == QUOTA
        )
        # the second key is still answered
        assert [r.status_code for r in asyncio.run(burst(bob, 4))] == [200] * 4
        # the actor keeps the quota windows in SQLite beside the keys file, as one server does
        state = keys.with_name(keys.name + ".quota.sqlite")

        def kept() -> dict:
            try:
                with sqlite3.connect(state) as db:
                    return dict(db.execute("SELECT client, used FROM quota_windows WHERE model = ''").fetchall())
            except sqlite3.Error:  # not created yet
                return {}

        wait_until(
            lambda: kept() == {"alice": QUOTA, "bob": 4},
            "the shared quota windows written to SQLite",
            30,
            interval=0.05,
        )
    finally:
        server.terminate(60)
