"""A model repository under a flood: model B's latency while model A is flooded, against B alone, in one run.

One ``codedsmooth serve --model-repository`` server holds two small CNNs ("a" and "b", untrained:
weights do not change the cost) with the server's defaults (RCI on, request scope). One client
sends one-item v1 requests to "b" one at a time on a kept connection:

1. alone: nothing else runs;
2. flood: meanwhile ``--flooders`` clients send ``--flood-items``-item requests to "a" as fast as
   they are answered (so "a" always has a full queue of work);
3. single: the same requests to a ``--checkpoint`` server of "b" alone (no repository), in
   blocks alternating with phase 1: the added latency of the repository's routing per request;
4. separate servers: the same flood on a ``--checkpoint`` server of "a" while timing the server of
   "b" (two single-model servers on one machine, what a repository replaces): what the machine's
   shared cores alone cost "b" under this flood.

The flooding clients run in a process of their own with a body encoded once, so their work does
not hold the timing client's interpreter lock.

Prints the median latency of each, the mean model time of one batch of "a", the ratio flood / alone (the promise: each model has its own
queue and the model thread takes one batch of each busy model in turn, so the ratio is about
1 + (one batch of "a") / (one request of "b"), not the length of "a"'s backlog), repository / separate servers under the flood (the repository's own share of the
slowdown), and repository / single.

With ``--model-threads per-model`` each model runs its batches on a thread of its own (with
``--threads 1`` on CPU, each on its own core), so "b" no longer waits for a batch of "a"; the
ratio is then bounded by the cores the two share, not by "a"'s batch.

Usage: python benchmarks/repository_flood.py [--requests 200] [--flooders 16] [--flood-items 8] [--threads 2] [--a-max-batch-size 8] [--model-threads per-model]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402

from codedsmooth.service.launcher import LocalServer  # noqa: E402

SHAPE = (1, 28, 28)


def body(items: int) -> dict:
    return {"inputs": np.random.default_rng(items).random((items, *SHAPE), dtype=np.float32).tolist()}


def latencies(client: httpx.Client, path: str, n: int) -> list[float]:
    payload, out = body(1), []
    for _ in range(n):
        start = time.perf_counter()
        r = client.post(path, json=payload)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return out


def _flood(url: str, clients: int, payload: bytes, answered, failed, started, stop) -> None:
    """The flooding clients' process: ``clients`` loops posting ``payload`` to ``url`` until ``stop`` is set."""

    async def one(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(url, content=payload, headers={"content-type": "application/json"})
            counter = answered if r.status_code == 200 else failed
            with counter.get_lock():
                counter.value += 1
            started.set()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
            await asyncio.gather(*(one(client) for _ in range(clients)))

    asyncio.run(run())


class Flood:
    """``clients`` loops posting to ``url`` until stopped, in a process of their own (so their work never holds the
    timing client's interpreter lock); counts answers. The body is encoded once: the flood costs the server what
    it costs a server, and the load generator as little as it can."""

    def __init__(self, url: str, clients: int, items: int):
        ctx = multiprocessing.get_context("spawn")
        self._answered, self._failed = ctx.Value("l", 0), ctx.Value("l", 0)
        self._started, self._stop = ctx.Event(), ctx.Event()
        payload = json.dumps(body(items)).encode()
        self._process = ctx.Process(
            target=_flood,
            args=(url, clients, payload, self._answered, self._failed, self._started, self._stop),
            daemon=True,
        )

    @property
    def answered(self) -> int:
        return self._answered.value

    @property
    def failed(self) -> int:
        return self._failed.value

    def __enter__(self):
        self._process.start()
        if not self._started.wait(120):
            raise RuntimeError("the flood got no answer in 120 s")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


def flooded_latencies(client: httpx.Client, path: str, n: int, flood_url: str, args) -> tuple[list[float], float, int]:
    """``n`` timed requests to ``path`` while ``flood_url`` is flooded; with the flooded model's items per second and refusals."""
    with Flood(flood_url, args.flooders, args.flood_items) as flood:
        start, before = time.perf_counter(), flood.answered
        out = latencies(client, path, n)
        rate = (flood.answered - before) * args.flood_items / (time.perf_counter() - start)
        return out, rate, flood.failed


def model_seconds_per_batch(metrics_url: str, model: str) -> float:
    """Mean model time of one device batch of ``model`` (its ``codedsmooth_inference_seconds``)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url + "/metrics").text):
        for s in family.samples:
            if s.name.startswith("codedsmooth_inference_seconds_") and s.labels.get("model") == model:
                values[s.name.rsplit("_", 1)[1]] = s.value
    return values["sum"] / values["count"] if values.get("count") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="timed requests to model b per phase")
    ap.add_argument("--flooders", type=int, default=16, help="concurrent clients flooding model a")
    ap.add_argument("--flood-items", type=int, default=8, help="items per flood request")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument(
        "--a-max-batch-size",
        type=int,
        default=None,
        help="model a's max_batch_size in its serving.json (default: the server's, 32): a smaller one bounds how long b waits",
    )
    ap.add_argument(
        "--model-threads",
        choices=["shared", "per-model"],
        default="shared",
        help="serve --model-threads of the repository server",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        for name in ("a", "b"):
            make_checkpoint(root / name, arch="small_cnn", width=32)
        if args.a_max_batch_size is not None:
            (root / "a" / "serving.json").write_text(json.dumps({"max_batch_size": args.a_max_batch_size}))
        repo = LocalServer(model_repository=root, threads=args.threads, model_threads=args.model_threads)
        single = LocalServer(root / "b", threads=args.threads)
        other = LocalServer(root / "a", threads=args.threads)  # a's own server: the separate-servers baseline
        try:
            for server in (repo, single, other):
                server.wait_ready()
            with (
                httpx.Client(base_url=repo.url, timeout=60) as client,
                httpx.Client(base_url=single.url, timeout=60) as direct,
            ):
                latencies(client, "/v1/models/b/predict", 20)  # warm the connection and the allocator
                latencies(direct, "/v1/predict", 20)
                alone, single_ms = [], []
                for _ in range(10):  # in alternating blocks, so drift hits both alike
                    alone += latencies(client, "/v1/models/b/predict", args.requests // 10)
                    single_ms += latencies(direct, "/v1/predict", args.requests // 10)
                flooded, a_rate, a_failed = flooded_latencies(
                    client, "/v1/models/b/predict", args.requests, repo.url + "/v1/models/a/predict", args
                )
                separate, sep_rate, sep_failed = flooded_latencies(
                    direct, "/v1/predict", args.requests, other.url + "/v1/predict", args
                )
                alone_again = latencies(
                    client, "/v1/models/b/predict", args.requests
                )  # drift check: alone after the floods
            a_batch = model_seconds_per_batch(repo.metrics_url, "a")
        finally:
            for server in (repo, single, other):
                server.terminate()

    med = {
        k: 1000 * statistics.median(v)
        for k, v in (("alone", alone + alone_again), ("flood", flooded), ("single", single_ms), ("separate", separate))
    }
    p95 = {k: 1000 * float(np.percentile(v, 95)) for k, v in (("flood", flooded), ("separate", separate))}
    print(
        f"model b, one item per request, median over {args.requests} requests per phase ({args.threads} torch threads, model threads {args.model_threads}):"
    )
    print(f"  alone (repository server)        {med['alone']:8.2f} ms")
    print(
        f"  during a flood on model a        {med['flood']:8.2f} ms  (p95 {p95['flood']:.2f} ms; model a answered {a_rate:.0f} items/s, {a_failed} refused)"
    )
    print(f"  single-checkpoint server of b    {med['single']:8.2f} ms")
    print("  the same, a flooded on a server of its own on this machine")
    print(
        f"                                   {med['separate']:8.2f} ms  (p95 {p95['separate']:.2f} ms; a answered {sep_rate:.0f} items/s, {sep_failed} refused)"
    )
    print(f"  one device batch of model a      {1000 * a_batch:8.2f} ms  (the most b should wait for a: one batch)")
    print(f"ratio flood / alone:               {med['flood'] / med['alone']:.2f}")
    print(
        f"ratio separate servers: flood / alone {med['separate'] / med['single']:.2f}  (what the machine's shared cores cost b without a repository)"
    )
    print(f"ratio repository / separate servers under the flood: {med['flood'] / med['separate']:.2f}")
    print(
        f"ratio repository / single server:  {med['alone'] / med['single']:.3f}  (added latency per request {med['alone'] - med['single']:+.2f} ms)"
    )


if __name__ == "__main__":
    main()
