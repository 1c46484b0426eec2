"""Ray Serve replicas vs one replica vs the plain server, in one run: throughput and latency.

Starts, one after the other on the same machine, with the same checkpoint (a small
PreActResNet-18, random weights: timing only), RCI off and the same batching settings:
- the plain server (``codedsmooth serve``, one process, torch threads = the CPU quota);
- ``codedsmooth serve --replicas 1`` on a local Ray (the replica reserves all CPUs, same threads);
- ``codedsmooth serve --replicas R`` (default 2; the CPUs split evenly, threads = CPUs per replica);
- the plain server with the threads of one of those replicas (is a gain Ray's, or fewer threads'?);
and drives each with the same closed-loop one-item requests (wrk when installed, else httpx).
The load generator, Ray's HTTP proxy and the replicas share the machine's cores.

Usage: python benchmarks/ray_throughput.py [--width 16] [--seconds 8] [--concurrency 32] [--replicas 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_throughput import load, make_checkpoint  # noqa: E402

from codedsmooth.service.launcher import LocalServer  # noqa: E402
from codedsmooth.service.settings import cpu_quota  # noqa: E402


def measure(ckpt, body, concurrency, seconds, warmup, **settings) -> dict:
    t0 = time.monotonic()
    server = LocalServer(ckpt, **settings)
    try:
        server.wait_ready(300)
        start_s = time.monotonic() - t0
        result = load(server.url, body, concurrency, seconds, warmup)
        result["start_s"] = start_s
        return result
    finally:
        server.terminate(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPUs each replica reserves (default: 0 on cpu; on cuda 1 for one replica, 1/R each for R replicas)",
    )
    args = ap.parse_args()

    cpus = cpu_quota()
    R = args.replicas
    per = max(1, cpus // R)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ck", width=args.width, k=args.max_batch)
        body = json.dumps({"inputs": torch.rand(1, 3, 32, 32).tolist()}).encode()
        common = dict(
            rci=False,
            max_batch_size=args.max_batch,
            max_delay_ms=5,
            max_queue_size=1024,
            device=args.device,
            log_level="warning",
        )
        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (0.0 if args.device == "cpu" else None)
        c, s, w = args.concurrency, args.seconds, args.warmup
        configs = {
            "plain server": dict(threads=cpus),
            f"plain, {per} thread(s)": dict(threads=per),
            "ray, 1 replica": dict(replicas=1, num_cpus=cpus, threads=cpus, num_gpus=1.0 if gpus is None else gpus),
            f"ray, {R} replicas": dict(
                replicas=R, num_cpus=per, threads=per, num_gpus=1.0 / R if gpus is None else gpus
            ),
        }
        # Rounds in alternation, so drift in what else the machine runs hits every configuration alike.
        results: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, extra in configs.items():
                results[name].append(measure(ckpt, body, c, s, w, **extra, **common))
    runs = {name: _median(rs) for name, rs in results.items()}
    plain, one, many = runs["plain server"], runs["ray, 1 replica"], runs[f"ray, {R} replicas"]
    print(
        f"{cpus} CPUs, device {args.device}; PreActResNet-18 width {args.width}, 32x32, one-item JSON requests, concurrency {c}, max batch {args.max_batch}, RCI off; median of {args.rounds} alternating rounds"
    )
    for name, r in runs.items():
        each = ", ".join(f"{x['throughput']:.1f}" for x in results[name])
        print(
            f"  {name:20s} {r['throughput']:8.1f} items/s (rounds: {each})  p50 {r['p50'] * 1e3:7.1f} ms  p99 {r['p99'] * 1e3:7.1f} ms  ready after {r['start_s']:5.1f} s"
        )
    print(f"{R} replicas / 1 replica: {many['throughput'] / one['throughput']:.2f}x")
    print(f"{R} replicas / plain server: {many['throughput'] / plain['throughput']:.2f}x")
    print(f"1 replica / plain server: {one['throughput'] / plain['throughput']:.2f}x (Ray's proxy hop, same threads)")
    print(
        f"{R} replicas / plain server with {per} thread(s): {many['throughput'] / runs[f'plain, {per} thread(s)']['throughput']:.2f}x (the same threads per process)"
    )
    print(
        f"plain server with {per} thread(s) / plain server: {runs[f'plain, {per} thread(s)']['throughput'] / plain['throughput']:.2f}x (threads alone, no Ray)"
    )


def _median(rs: list[dict]) -> dict:
    rs = sorted(rs, key=lambda r: r["throughput"])
    return rs[len(rs) // 2]


if __name__ == "__main__":
    main()
