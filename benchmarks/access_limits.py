"""What API keys and per-key limits cost per request, in one process and across Ray Serve replicas, and whether the rate holds.

1. End to end, one process: two plain servers side by side (small CNN, RCI off), one open and one
   with ``--api-keys-file --rate-limit --quota`` (limits far above the load, so nothing is
   refused); one client sends one-item v2 binary requests one at a time on a kept connection,
   alternating between the servers in rounds. Prints the median latency of each and the ratio.
2. The charge itself: ``limits.Counters.charge`` in the calling process vs a round trip to the
   shared counters' Ray actor (``shared_limits.LimitsActor``), both timed from inside an async
   Ray actor, as a replica calls it (``--no-ray``: skip).
3. The rate: a key with ``rate=R`` driven by 4 clients as fast as they can for ``--seconds``;
   prints the items answered per second past the burst and its ratio to R (goal: within 10 %).

Usage: python benchmarks/access_limits.py [--requests 300] [--rounds 5] [--rate 50] [--seconds 10] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402

from codedsmooth.service.access.keys import add_key  # noqa: E402
from codedsmooth.service.access.limits import CounterKey, Counters, Limits  # noqa: E402
from codedsmooth.service.launcher import LocalServer  # noqa: E402

LIMITS = Limits(rate=1e9, burst=32, quota=10**12, window_s=86400.0)
ALICE = CounterKey("alice")  # her overall counters, as the server keys them


def v2_request(shape) -> tuple[bytes, dict]:
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.tobytes(), {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


def latencies(client: httpx.Client, path: str, body: bytes, headers: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post(path, content=body, headers=headers)
        out.append(time.perf_counter() - t)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:200]}")
    return out


def end_to_end(ckpt: Path, keys: Path, key: str, requests: int, rounds: int) -> dict:
    common = dict(threads=1, rci=False, max_delay_ms=0, log_level="warning")
    servers = {
        "open": LocalServer(ckpt, **common),
        "keys+limits": LocalServer(ckpt, api_keys_file=keys, rate_limit=1e9, quota=10**12, **common),
    }
    try:
        for s in servers.values():
            s.wait_ready(300)
        auth = {"Authorization": f"Bearer {key}"}
        name = httpx.get(servers["open"].url + "/v1/models").json()[0]["name"]
        body, headers = v2_request((1, 28, 28))
        clients = {
            k: httpx.Client(base_url=s.url, timeout=60, headers=auth if k != "open" else {}) for k, s in servers.items()
        }
        times: dict[str, list[float]] = {k: [] for k in servers}
        for c in clients.values():  # warm-up
            latencies(c, f"/v2/models/{name}/infer", body, headers, 30)
        for _ in range(rounds):
            for k, c in clients.items():
                times[k] += latencies(c, f"/v2/models/{name}/infer", body, headers, requests)
        for c in clients.values():
            c.close()
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        for s in servers.values():
            s.terminate()


def charge_costs(calls: int) -> dict:
    import ray

    from codedsmooth.service.access.shared_limits import start_limits_actor

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = start_limits_actor()

        @ray.remote(num_cpus=0)
        class Probe:  # an async actor, as a Serve replica is
            async def run(self, actor, calls: int) -> dict:
                local = Counters()
                t_local = []
                for _ in range(calls):
                    t = time.perf_counter()
                    local.charge(ALICE, 1, LIMITS, time.monotonic())
                    t_local.append(time.perf_counter() - t)
                for _ in range(20):
                    await actor.charge.remote(ALICE, 1, LIMITS)
                t_actor = []
                for _ in range(calls):
                    t = time.perf_counter()
                    await actor.charge.remote(ALICE, 1, LIMITS)
                    t_actor.append(time.perf_counter() - t)
                return {
                    "in-process": statistics.median(t_local),
                    "ray actor": statistics.median(t_actor),
                    "ray actor p99": float(np.percentile(t_actor, 99)),
                }

        probe = Probe.remote()
        return ray.get(probe.run.remote(actor, calls))
    finally:
        ray.shutdown()


def rate_holds(ckpt: Path, keys: Path, key: str, seconds: float, burst: int, rate: float) -> dict:
    server = LocalServer(
        ckpt, api_keys_file=keys, threads=1, rci=False, max_delay_ms=0, max_batch_size=burst, log_level="error"
    )
    try:
        server.wait_ready(300)
        name = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()[0]["name"]
        body, headers = v2_request((1, 28, 28))
        answered, refused = [0], [0]
        lock = threading.Lock()
        stop = threading.Event()

        def loop():
            with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
                while not stop.is_set():
                    r = c.post(f"/v2/models/{name}/infer", content=body, headers=headers)
                    with lock:
                        (answered if r.status_code == 200 else refused)[0] += 1

        threads = [threading.Thread(target=loop) for _ in range(4)]
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)  # a benchmark's measuring interval, not a synchronisation
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        measured = (answered[0] - burst) / elapsed
        return {
            "answered": answered[0],
            "refused": refused[0],
            "seconds": round(elapsed, 2),
            "items_per_s_past_burst": round(measured, 2),
            "ratio_to_rate": round(measured / rate, 3),
        }
    finally:
        server.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=300, help="requests per server per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000, help="charges timed per variant")
    ap.add_argument("--rate", type=float, default=50.0, help="items/s of the rate check's key")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the rate check")
    ap.add_argument(
        "--ray", action=argparse.BooleanOptionalAction, default=True, help="also time the shared counters' Ray actor"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", arch="small_cnn", width=8, k=8)
        keys = Path(tmp) / "keys.txt"
        key = add_key(keys, "bench")
        rated = add_key(keys, "rated", rate=f"{args.rate:g}", quota="none")
        e2e = end_to_end(ckpt, keys, key, args.requests, args.rounds)
        print(
            f"end to end, one process, one-item v2 binary requests one at a time ({args.rounds} x {args.requests} per server, alternating):"
        )
        print(
            f"  median latency open {e2e['open'] * 1e3:.3f} ms, with keys + limits {e2e['keys+limits'] * 1e3:.3f} ms: "
            f"ratio {e2e['keys+limits'] / e2e['open']:.3f}, added {(e2e['keys+limits'] - e2e['open']) * 1e6:+.0f} us"
        )
        if args.ray:
            costs = charge_costs(args.calls)
            print(
                f"one charge, timed in an async Ray actor ({args.calls} calls, median): in-process {costs['in-process'] * 1e6:.1f} us, "
                f"shared Ray actor {costs['ray actor'] * 1e6:.0f} us (p99 {costs['ray actor p99'] * 1e6:.0f} us): "
                f"ratio {costs['ray actor'] / costs['in-process']:.0f}x; the actor adds {costs['ray actor'] / e2e['open']:.2f} x the open server's median latency"
            )
        burst = 8
        r = rate_holds(ckpt, keys, rated, args.seconds, burst, args.rate)
        print(
            f"rate limit {args.rate:g} items/s, burst {burst}, 4 clients for {r['seconds']} s: {r['answered']} answered, {r['refused']} x 429; "
            f"{r['items_per_s_past_burst']} items/s past the burst = {r['ratio_to_rate']:.3f} x the limit (goal: within 10 %)"
        )


if __name__ == "__main__":
    main()
