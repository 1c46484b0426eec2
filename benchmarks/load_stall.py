"""A model's latency while another model of the repository is loaded, against the same without a load, in one run.

Issue 29, finding 2: a load ran on the one shared model thread (a 39 MB checkpoint stalled every other model for
15.6 s), and a file that blocks on open froze the whole process. Loads now run on a loader thread of their own with
``--load-timeout-s``. One ``codedsmooth serve --model-repository --model-control explicit`` server (the default
``--model-threads shared``) serves "a" (a small CNN, untrained: weights do not change the cost); one client sends
one-item v1 requests to "a" one at a time, each followed by ``GET /health/live``:

1. alone: ``--requests`` requests with no load under way, half before the loads and half after (a drift of the
   machine's load over the run is shared by both sides of the ratio);
2. large: meanwhile ``POST /v2/repository/models/big/load`` loads a PreActResNet-18 (``--big-width``; about 45 MB at
   width 64: read, validated, built and warmed up), timed until its answer;
3. stuck: meanwhile the load of "held" never gets its file (a read from a stalled mount; the double is
   ``tests/slow_load_server.py``, the real server with ``load_checkpoint`` held at a gate), until the load is
   answered 504 at ``--load-timeout-s``; the gate is then opened and the abandoned load's result dropped.

Prints, for each phase, the number of requests, p50 / p99 / max latency of "a", the slowest /health/live, every status
seen, and the ratios large / alone and stuck / alone of p50 and p99 (the promise: every answer in under 1 s, so the
ratios stay small whatever the load takes). JSON to ``benchmarks/results/load_stall.json`` (``--out``).

Usage: python benchmarks/load_stall.py [--requests 200] [--big-width 64] [--load-timeout-s 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402

from codedsmooth.service.launcher import LocalServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "load_stall.json"
HELD_LOAD_SERVER = Path(__file__).resolve().parent.parent / "tests" / "slow_load_server.py"


def requests_while(client: httpx.Client, x: dict, busy) -> dict:
    """One-item requests to "a", each followed by /health/live, while ``busy()`` (at least one): latencies and statuses."""
    predict: list[float] = []
    live: list[float] = []
    statuses: set[int] = set()
    while busy() or not predict:
        t = time.perf_counter()
        r = client.post("/v1/models/a/predict", json=x)
        predict.append(time.perf_counter() - t)
        statuses.add(r.status_code)
        t = time.perf_counter()
        statuses.add(client.get("/health/live").status_code)
        live.append(time.perf_counter() - t)
    return summary(np.array(predict) * 1e3, max(live) * 1e3, statuses)


def counting(n: int):
    """A ``busy`` that is true for ``n`` calls."""
    left = [n]

    def busy() -> bool:
        left[0] -= 1
        return left[0] > 0

    return busy


def merged(*phases: dict) -> dict:
    """Phases' figures as one (their latencies pooled)."""
    ms = np.concatenate([p["_ms"] for p in phases])
    return summary(ms, max(p["live_max_ms"] for p in phases), set().union(*(p["statuses"] for p in phases)))


def summary(ms: np.ndarray, live_max_ms: float, statuses: set) -> dict:
    return {
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "live_max_ms": round(live_max_ms, 2),
        "statuses": sorted(statuses),
        "_ms": ms,
    }


def during_load(client: httpx.Client, x: dict, name: str) -> tuple[dict, dict]:
    """Time "a" while ``name`` is loaded (on a thread of this process); the phase's figures and the load's answer."""
    answer: dict = {}

    def load() -> None:
        t = time.perf_counter()
        r = httpx.post(f"{client.base_url}/v2/repository/models/{name}/load", timeout=600)
        answer.update(status=r.status_code, seconds=round(time.perf_counter() - t, 2), body=r.text[:200])

    thread = threading.Thread(target=load)
    thread.start()
    figures = requests_while(client, x, thread.is_alive)
    thread.join()
    return figures, answer


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=200, help="requests to 'a' with no load under way")
    ap.add_argument("--big-width", type=int, default=64, help="width of the large model's PreActResNet-18")
    ap.add_argument(
        "--load-timeout-s",
        type=float,
        default=20.0,
        help="the server's --load-timeout-s: the large load must finish within it; the stuck load lasts it",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, gate = Path(tmp) / "repo", Path(tmp) / "gate"
        gate.mkdir()
        make_checkpoint(root / "a", arch="small_cnn", width=8, k=8)
        big = make_checkpoint(Path(tmp) / "big", arch="preact_resnet18", width=args.big_width)
        big_mb = sum(f.stat().st_size for f in big.iterdir()) / 1e6
        os.environ.update(SLOW_LOAD_MODEL="held", SLOW_LOAD_GATE=str(gate))  # read by the server we start
        server = LocalServer(
            None,
            program=[sys.executable, str(HELD_LOAD_SERVER)],
            model_repository=root,
            model_control="explicit",
            load_timeout_s=args.load_timeout_s,
            threads=1,
            log_level="error",
        )
        try:
            server.wait_ready(300)
            x = {"inputs": np.random.default_rng(0).random((1, 1, 28, 28)).tolist()}
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for _ in range(20):  # warm-up
                    client.post("/v1/models/a/predict", json=x)
                before = requests_while(client, x, counting(args.requests // 2))
                shutil.copytree(big, root / "big")
                large, large_load = during_load(client, x, "big")
                shutil.copytree(root / "a", root / "held")
                stuck, stuck_load = during_load(client, x, "held")
                (gate / "open").touch()  # the abandoned load ends; its result is dropped
                after = requests_while(client, x, counting(args.requests - args.requests // 2))
                alone = merged(before, after)
        finally:
            (gate / "open").touch()
            server.terminate()
    for figures in (alone, before, after, large, stuck):
        figures.pop("_ms", None)
    result = {
        "big_checkpoint_mb": round(big_mb, 1),
        "load_timeout_s": args.load_timeout_s,
        "alone": alone,
        "alone_before_p50_ms": before["p50_ms"],  # the halves apart: how far the machine drifted over the run
        "alone_after_p50_ms": after["p50_ms"],
        "large_load": {**large, "load": large_load},
        "stuck_load": {**stuck, "load": stuck_load},
        "p50_large_vs_alone": round(large["p50_ms"] / alone["p50_ms"], 2),
        "p99_large_vs_alone": round(large["p99_ms"] / alone["p99_ms"], 2),
        "p50_stuck_vs_alone": round(stuck["p50_ms"] / alone["p50_ms"], 2),
        "p99_stuck_vs_alone": round(stuck["p99_ms"] / alone["p99_ms"], 2),
    }
    for phase, figures, load in (
        ("alone", alone, None),
        (f"large load ({big_mb:.0f} MB)", large, large_load),
        (f"stuck load (--load-timeout-s {args.load_timeout_s:g})", stuck, stuck_load),
    ):
        print(
            f"{phase}: {figures['requests']} requests to 'a', p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
            f"max {figures['max_ms']} ms; /health/live slowest {figures['live_max_ms']} ms; statuses {figures['statuses']}"
            + (f"; the load: HTTP {load['status']} after {load['seconds']} s" if load else "")
        )
    print(f"alone, p50 of the half before the loads {before['p50_ms']} ms, of the half after {after['p50_ms']} ms")
    print(
        f"during the large load / alone: p50 {result['p50_large_vs_alone']}x, p99 {result['p99_large_vs_alone']}x; "
        f"during the stuck load / alone: p50 {result['p50_stuck_vs_alone']}x, p99 {result['p99_stuck_vs_alone']}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
