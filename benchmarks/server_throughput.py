"""Server vs in-process model, in one run: throughput, batching gain, latency, price of RCI scopes.

Starts ``codedsmooth serve`` on a PreActResNet-18 checkpoint (32×32 RGB, random
weights: timing only), drives it over HTTP with one-item requests (with wrk when
it is installed, else an httpx client), and prints ratios against the
in-process model measured in the same run. The load generator shares the
machine's cores with the server.

Usage: python benchmarks/server_throughput.py [--width 64] [--seconds 8] [--concurrency 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402
from _timing import median_seconds  # noqa: E402

from codedsmooth.models import build_model, resolve_device  # noqa: E402
from codedsmooth.service.launcher import local_server  # noqa: E402
from codedsmooth.service.settings import cpu_quota  # noqa: E402

JSON_REQUEST = ("/v1/predict", {"content-type": "application/json"})


def v2_binary_request(model: str, x: torch.Tensor) -> tuple[tuple[str, dict], bytes]:
    """An Open Inference Protocol v2 request with the binary tensor extension (what tritonclient sends)."""
    data = x.numpy().astype("float32").tobytes()
    head = json.dumps(
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
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
    return (f"/v2/models/{model}/infer", headers), head + data


async def drive(url: str, body: bytes, concurrency: int, seconds: float, warmup: float, request=JSON_REQUEST) -> dict:
    """Closed-loop load: ``concurrency`` clients each send a request as soon as the last one returns."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.monotonic()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def worker():
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                r = await client.post(request[0], content=body, headers=request[1])
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    latencies.sort()
    ok = codes.get(200, 0)
    return {
        "throughput": ok / seconds,
        "p50": latencies[len(latencies) // 2] if latencies else math.nan,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else math.nan,
        "codes": codes,
    }


def drive_wrk(url: str, body: bytes, concurrency: int, seconds: float, warmup: float, request=JSON_REQUEST) -> dict:
    """The same closed loop with wrk (C), so the load generator takes little of the CPU the server needs."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n')
        for key, value in request[1].items():
            f.write(f'wrk.headers["{key}"] = "{value}"\n')
        f.write('wrk.body = "' + "".join(f"\\{b}" for b in body) + '"\n')  # decimal escapes: binary-safe
        f.write(
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.errors.status,'
            " latency:percentile(50), latency:percentile(99), summary.duration))\nend\n"
        )
        script = f.name
    target = url + request[0]
    subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, int(warmup))}s", "-s", script, target],
        capture_output=True,
        check=True,
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "-s", script, target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests, non2xx, p50, p99, duration_us = map(int, out.split("RESULT")[1].split())
    return {
        "throughput": (requests - non2xx) / (duration_us / 1e6),
        "p50": p50 / 1e6,
        "p99": p99 / 1e6,
        "codes": {"2xx": requests - non2xx, "other": non2xx},
    }


def load(url: str, body, concurrency, seconds, warmup, request=JSON_REQUEST) -> dict:
    """Closed-loop load from wrk when installed (less CPU per request), else from httpx."""
    if shutil.which("wrk"):
        return drive_wrk(url, body, concurrency, seconds, warmup, request)
    return asyncio.run(drive(url, body, concurrency, seconds, warmup, request))


def measure(ckpt, body, concurrency, seconds, warmup, request=JSON_REQUEST, **settings) -> dict:
    with local_server(ckpt, **settings) as server:
        return load(server.url, body, concurrency, seconds, warmup, request)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--request-k", type=int, default=4, help="K for the request-scope run with one-item requests")
    args = ap.parse_args()

    device = resolve_device(args.device)
    threads = cpu_quota()
    torch.set_num_threads(threads)
    mb = args.max_batch
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ck", width=args.width, k=mb)
        model = build_model("preact_resnet18", width=args.width, mean=[0.5] * 3, std=[0.25] * 3).to(device).eval()
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        with torch.inference_mode():
            xb, x1 = torch.rand(mb, 3, 32, 32, device=device), torch.rand(1, 3, 32, 32, device=device)
            t_b = median_seconds(lambda: model(xb), repeats=10, sync=sync)
            t_1 = median_seconds(lambda: model(x1), repeats=30, sync=sync)
        inproc_b, inproc_1 = mb / t_b, 1 / t_1
        x = torch.rand(1, 3, 32, 32)
        body = json.dumps({"inputs": x.tolist()}).encode()
        v2_request, v2_body = v2_binary_request("bench-preact_resnet18", x)
        common = dict(device=str(device), threads=threads, max_queue_size=1024, rci_check_rate=0)
        c, s, w = args.concurrency, args.seconds, args.warmup
        runs = {
            "off b32": measure(ckpt, body, c, s, w, rci=False, max_batch_size=mb, max_delay_ms=5, **common),
            "off b32 v2 binary": measure(
                ckpt, v2_body, c, s, w, request=v2_request, rci=False, max_batch_size=mb, max_delay_ms=5, **common
            ),
            "off b1": measure(ckpt, body, c, s, w, rci=False, max_batch_size=1, max_delay_ms=0, **common),
            "batch N=K": measure(
                ckpt,
                body,
                c,
                s,
                w,
                rci=True,
                rci_scope="batch",
                coded_points=mb,
                max_batch_size=mb,
                max_delay_ms=5,
                **common,
            ),
            "batch N=1.5K": measure(
                ckpt,
                body,
                c,
                s,
                w,
                rci=True,
                rci_scope="batch",
                coded_points=math.ceil(1.5 * mb),
                max_batch_size=mb,
                max_delay_ms=5,
                **common,
            ),
            f"request K={args.request_k} N=K": measure(
                ckpt,
                body,
                c,
                s,
                w,
                rci=True,
                rci_scope="request",
                rci_group_size=args.request_k,
                coded_points=args.request_k,
                max_batch_size=mb,
                max_delay_ms=5,
                **common,
            ),
            f"request K={mb} N=K": measure(
                ckpt,
                body,
                c,
                s,
                w,
                rci=True,
                rci_scope="request",
                rci_group_size=mb,
                coded_points=mb,
                max_batch_size=mb,
                max_delay_ms=5,
                **common,
            ),
            "light load": measure(ckpt, body, 1, s, w, rci=False, max_batch_size=mb, max_delay_ms=5, **common),
        }
    off = runs["off b32"]["throughput"]
    print(
        f"device={device} threads={threads} PreActResNet-18 width {args.width}, 32x32, one-item requests, concurrency {c}, max batch {mb}"
    )
    print(
        f"in-process forward: batch {mb} {inproc_b:.1f} items/s, batch 1 {inproc_1:.1f} items/s (batching gain {inproc_b / inproc_1:.2f}x)"
    )
    for name, r in runs.items():
        print(
            f"  {name:22s} {r['throughput']:8.1f} items/s  p50 {r['p50'] * 1e3:7.1f} ms  p99 {r['p99'] * 1e3:7.1f} ms  codes {r['codes']}"
        )
    server_gain = off / runs["off b1"]["throughput"]
    print(
        f"server saturation / in-process batched forward: {off / inproc_b:.3f} JSON, {runs['off b32 v2 binary']['throughput'] / inproc_b:.3f} v2 binary (goal >= 0.85)"
    )
    print(
        f"server batching gain {server_gain:.2f}x / in-process gain {inproc_b / inproc_1:.2f}x = {server_gain / (inproc_b / inproc_1):.3f} (goal >= 0.9)"
    )
    light = runs["light load"]
    budget = 0.005 + t_1
    print(
        f"light load p50 {light['p50'] * 1e3:.1f} ms, p99 {light['p99'] * 1e3:.1f} ms vs max delay + one forward {budget * 1e3:.1f} ms (p50 ratio {light['p50'] / budget:.2f})"
    )
    print(
        f"RCI batch scope N=K / off: {runs['batch N=K']['throughput'] / off:.3f} (goal >= 0.9); N=1.5K: {runs['batch N=1.5K']['throughput'] / off:.3f}"
    )
    print(
        f"RCI request scope K={args.request_k} N=K / off: {runs[f'request K={args.request_k} N=K']['throughput'] / off:.3f} (goal >= 0.5); K={mb}: {runs[f'request K={mb} N=K']['throughput'] / off:.3f}"
    )


if __name__ == "__main__":
    main()
