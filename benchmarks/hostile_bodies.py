"""Hostile JSON bodies sent back to back to a real server while /health/live is probed.

Each attack body is sent back to back on one connection for ``--seconds`` (at least twice); meanwhile a second client
probes ``GET /health/live`` on its own connection every 20 ms. Printed per attack: the statuses
answered, the time to the answer (median and max), the size of the error body, and the health
probe latency (p50, p99, max) with the number of probes over 2 s (the Docker health check's
timeout). An idle phase first gives the health latency without an attack, for the ratios.

Usage: python benchmarks/hostile_bodies.py [--checkpoint DIR] [--seconds 6]
(default: the embedded default checkpoint, 1×28×28 inputs; the server's default 8 MiB body limit)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time

import httpx

from codedsmooth.service.launcher import local_server

HEALTH_TIMEOUT_S = 2.0  # docker/Dockerfile's HEALTHCHECK --timeout
PROBE_EVERY_S = 0.02


def attacks(model: str, input_shape: list[int]) -> dict[str, tuple[str, bytes]]:
    """name -> (path, body): each body fits in the default 8 MiB limit."""
    item = json.dumps([[[0.5] * input_shape[2]] * input_shape[1]] * input_shape[0]).encode()
    numbers = math.prod(input_shape)
    shape = json.dumps([1, *input_shape]).encode()
    v2 = f"/v2/models/{model}/infer"

    def v2_body(name="input", datatype="FP32", data=None) -> bytes:
        inp = {
            "name": name,
            "shape": [1, *input_shape],
            "datatype": datatype,
            "data": data if data is not None else [0.5] * numbers,
        }
        return json.dumps({"inputs": [inp]}).encode()

    return {
        "v1: 1M tiny items": ("/v1/predict", b'{"inputs":[' + b",".join([b"[[[0]]]"] * 1_000_000) + b"]}"),
        "v1: 600k unknown keys": (
            "/v1/predict",
            b'{"inputs":[' + item + b"]," + b",".join(b'"k%06d":0' % i for i in range(600_000)) + b"}",
        ),
        "v2: 4M numbers in data": (
            v2,
            b'{"inputs":[{"name":"input","shape":'
            + shape
            + b',"datatype":"FP32","data":['
            + b",".join([b"0"] * 4_000_000)
            + b"]}]}",
        ),
        "v2: 7 MB input name": (v2, v2_body(name="A" * 7_000_000)),
        "v2: 7 MB datatype": (v2, v2_body(datatype="B" * 7_000_000)),
    }


class HealthProber(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health/live").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - start)
                self.failures += not ok
                self.stopping.wait(PROBE_EVERY_S)

    def stop(self) -> dict:
        self.stopping.set()
        self.join()
        lat = sorted(self.latencies)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        return {
            "probes": len(lat),
            "p50_ms": p(0.5),
            "p99_ms": p(0.99),
            "max_ms": lat[-1] * 1000,
            "over_2s": sum(t > HEALTH_TIMEOUT_S for t in lat),
            "failed": self.failures,
        }


def run_phase(url: str, path: str | None, body: bytes | None, seconds: float) -> dict:
    prober = HealthProber(url)
    prober.start()
    while not prober.latencies:  # the prober's connection is open before the attack starts
        time.sleep(0.005)
    answers = []
    with httpx.Client(timeout=120) as client:
        end = time.perf_counter() + seconds
        if path is None:
            time.sleep(seconds)  # idle phase: only the prober runs
        while path is not None and (len(answers) < 2 or time.perf_counter() < end):
            start = time.perf_counter()
            r = client.post(url + path, content=body, headers={"content-type": "application/json"})
            answers.append((r.status_code, time.perf_counter() - start, len(r.content)))
    return {"answers": answers, "health": prober.stop()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint directory (default: the embedded default checkpoint)"
    )
    ap.add_argument(
        "--seconds", type=float, default=6.0, help="how long each attack body is sent, back to back (default: 6)"
    )
    args = ap.parse_args()
    with local_server(args.checkpoint, threads=2) as srv:
        info = httpx.get(srv.url + "/v1/models").json()[0]
        bodies = attacks(info["name"], info["input_shape"])
        idle = run_phase(srv.url, None, None, args.seconds)["health"]
        print(
            f"idle: health p50 {idle['p50_ms']:.1f} ms, p99 {idle['p99_ms']:.1f} ms, max {idle['max_ms']:.1f} ms ({idle['probes']} probes)"
        )
        header = f"{'attack':24} {'body':>8} {'status':>8} {'sent':>5} {'answer med':>10} {'answer max':>10} {'error body':>11} {'health p50':>10} {'p99':>9} {'max':>9} {'>2 s':>6} {'p99/idle':>8}"
        print(header)
        for name, (path, body) in bodies.items():
            res = run_phase(srv.url, path, body, args.seconds)
            statuses = sorted({s for s, _, _ in res["answers"]})
            times = [t for _, t, _ in res["answers"]]
            size = max(n for _, _, n in res["answers"])
            h = res["health"]
            print(
                f"{name:24} {len(body) / 1e6:>6.1f}MB {'/'.join(map(str, statuses)):>8} {len(times):>5} {statistics.median(times):>9.2f}s {max(times):>9.2f}s "
                f"{size:>10,}B {h['p50_ms']:>8.1f}ms {h['p99_ms']:>7.1f}ms {h['max_ms']:>7.1f}ms {h['over_2s']:>3}/{h['probes']:<3} {h['p99_ms'] / idle['p99_ms']:>7.1f}x"
            )


if __name__ == "__main__":
    main()
