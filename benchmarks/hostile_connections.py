"""Hostile connections against a real server: memory, health latency and outcome counts per attack.

Each attack runs against a fresh ``codedsmooth serve`` (small CNN, random weights) on 127.0.0.1:

- ``websocket``: WebSocket upgrade requests, each on a new connection the client then closes,
  with ``--max-connections 8``; then health checks. Prints what the upgrades got and what the
  health checks got afterwards.
- ``headers``: one connection sending header lines that never end, as fast as the server reads
  them, for up to ``--seconds``; a probe checks ``/health/live`` meanwhile. Then a complete
  request with 10,000 headers and one with a 1 MiB header value. Prints server RSS before, at
  its peak and after, bytes the server took before it closed the connection, the health latency.
- ``idle``: with ``--max-connections 8``, a keep-alive client makes a request, then 8 sockets
  connect and send nothing (the attacker reopens any the server closes); the keep-alive client
  and fresh clients keep asking. Prints their outcome counts.
- ``deadline``: closed-loop load (``--concurrency`` clients, 32 items per request) with
  ``--timeout-ms 500``. Prints the status counts and the latency the clients saw, by status.

``--ray`` runs the headers attack against ``serve --replicas 1`` and measures Ray Serve's HTTP
proxy, which holds the client connections there.

Usage: python benchmarks/hostile_connections.py [--only websocket headers idle deadline] [--seconds 8] [--ray]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402

from codedsmooth.service.launcher import local_server  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def read_answer(sock: socket.socket, timeout: float = 10.0) -> tuple[int | str, str, bytes]:
    """(status, content-type, body) of one answer; ("closed"/"reset"/"timeout", "", b"") when none came."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed", "", data
            data += chunk
    except TimeoutError:
        return "timeout", "", data
    except OSError:
        return "reset", "", data
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return int(lines[0].split()[1]), headers.get("content-type", ""), body[:120]


class HealthProbe:
    """Asks ``/health/live`` on a fresh connection again and again; records latency and status."""

    def __init__(self, url: str):
        self.url, self.latencies, self.statuses = url, [], Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status = httpx.get(self.url + "/health/live", timeout=15).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            self.latencies.append(time.monotonic() - start)
            self.statuses[status] += 1
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.latencies:
            return "no probe finished"
        lat = sorted(self.latencies)
        return f"/health/live x{len(lat)}: median {statistics.median(lat) * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms, statuses {dict(self.statuses)}"


# ---- attacks ---------------------------------------------------------------------------------------


def websocket_attack(checkpoint: Path, args) -> None:
    with local_server(checkpoint, threads=1, max_connections=8) as srv:
        before = rss_mb(srv.proc.pid)
        answers = Counter()
        for _ in range(args.upgrades):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(
                    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                status, ctype, _ = read_answer(sock)
                answers[f"{status} {ctype.split(';')[0] or '-'}"] += 1
        # the server needs a moment to see the closes; a fixed count of probes, not a wait on state
        health = Counter()
        for _ in range(20):
            try:
                health[httpx.get(srv.url + "/health/live", timeout=10).status_code] += 1
            except httpx.HTTPError as exc:
                health[type(exc).__name__] += 1
        print(
            f"websocket: {args.upgrades} upgrades on closed connections (--max-connections 8) answered {dict(answers)}; "
            f"then /health/live x20: {dict(health)}; RSS {before:.0f} -> {rss_mb(srv.proc.pid):.0f} MB"
        )


def ray_proxy_pid() -> int | None:
    """The process of Ray Serve's HTTP proxy (an actor named ProxyActor), if one runs on this host."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ProxyActor" in cmdline:
                return int(entry.name)
    return None


def header_attack(checkpoint: Path, args) -> None:
    options = {"replicas": 1, "num_cpus": 0.5} if args.ray else {}
    with local_server(checkpoint, threads=1, **options) as srv:
        pid = ray_proxy_pid() if args.ray else srv.proc.pid
        if pid is None:
            raise SystemExit("no Ray Serve proxy process found")
        if args.ray:
            print("under Ray Serve (serve --replicas 1): measuring its HTTP proxy's RSS")
        before = peak = rss_mb(pid)
        line = b"X-Pad: " + b"a" * 55 + b"\r\n"  # 64 bytes a header
        batch = line * 1024
        sent, outcome = 0, "still open"
        with HealthProbe(srv.url) as probe:
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
            start = time.monotonic()
            while time.monotonic() - start < args.seconds:
                readable, writable, _ = select.select([sock], [sock], [], 0.5)
                if readable:
                    status, ctype, body = read_answer(sock, timeout=1)
                    outcome = f"{status} {ctype.split(';')[0]} {body[:60]!r}" if isinstance(status, int) else status
                    break
                if writable:
                    try:
                        sent += sock.send(batch)
                    except OSError as exc:
                        outcome = f"send failed ({type(exc).__name__})"
                        break
                peak = max(peak, rss_mb(pid))
            seconds = time.monotonic() - start
            sock.close()
        after = rss_mb(pid)
        print(
            f"headers (one endless header block): {sent / 1e6:.1f} MB sent in {seconds:.1f} s, outcome: {outcome}; "
            f"server RSS {before:.0f} -> peak {peak:.0f} -> after {after:.0f} MB; {probe.summary()}"
        )
        for name, head in (
            ("10,000 headers", b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))),
            ("one 1 MiB header value", b"X-Big: " + b"a" * (1 << 20) + b"\r\n"),
        ):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                try:
                    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
                except OSError as exc:
                    print(f"  {name}: send failed ({type(exc).__name__})")
                    continue
                status, ctype, body = read_answer(sock)
                print(f"  {name}: {status} {ctype.split(';')[0]} {body[:80]!r}")


def idle_attack(checkpoint: Path, args) -> None:
    limit = 8
    with local_server(checkpoint, threads=1, max_connections=limit, header_timeout_s=args.header_timeout) as srv:
        stop = threading.Event()
        reopened = [0]
        kept = httpx.Client(base_url=srv.url, timeout=15)
        first = kept.get("/health/live").status_code  # the keep-alive client's connection is open before the attack

        def attacker():
            socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(limit)]
            while not stop.is_set():
                readable, _, _ = select.select(socks, [], [], 0.1)
                for s in readable:  # closed by the server: open another one at once
                    try:
                        s.recv(1024)
                    except OSError:
                        pass
                    s.close()
                    socks[socks.index(s)] = socket.create_connection(("127.0.0.1", srv.port))
                    reopened[0] += 1
            for s in socks:
                s.close()

        thread = threading.Thread(target=attacker, daemon=True)
        thread.start()
        time.sleep(0.5)  # the attacker's sockets are connected (benchmark pacing, not a test)
        keep_alive, fresh = Counter(), Counter()
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            for client, counts in ((kept, keep_alive), (None, fresh)):
                try:
                    r = client.get("/health/live") if client else httpx.get(srv.url + "/health/live", timeout=15)
                    counts[r.status_code] += 1
                except httpx.HTTPError as exc:
                    counts[type(exc).__name__] += 1
        stop.set()
        thread.join()
        kept.close()
        print(
            f"idle (--max-connections {limit}, {limit} silent sockets, reopened when closed: {reopened[0]} reopens in {args.seconds:.0f} s): "
            f"keep-alive client before {first}, during {dict(keep_alive)}; fresh clients {dict(fresh)}"
        )


def deadline_attack(checkpoint: Path, args) -> None:
    timeout_ms = 500
    item = [[[0.5] * 28] * 28]
    body = json.dumps({"inputs": [item] * 32}).encode()
    with local_server(checkpoint, threads=1, timeout_ms=timeout_ms, max_queue_size=4096, max_connections=4096) as srv:
        latencies: dict[object, list[float]] = {}

        async def run():
            limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:
                end = time.monotonic() + args.seconds

                async def worker():
                    while time.monotonic() < end:
                        start = time.monotonic()
                        try:
                            status = (
                                await client.post(
                                    "/v1/predict", content=body, headers={"content-type": "application/json"}
                                )
                            ).status_code
                        except httpx.HTTPError as exc:
                            status = type(exc).__name__
                        latencies.setdefault(status, []).append(time.monotonic() - start)

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        asyncio.run(run())
        parts = []
        for status, lat in sorted(latencies.items(), key=lambda kv: str(kv[0])):
            lat.sort()
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            parts.append(
                f"{status}: {len(lat)} (client-observed median {statistics.median(lat) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms)"
            )
        print(
            f"deadline (--timeout-ms {timeout_ms}, {args.concurrency} clients x 32 items, {args.seconds:.0f} s): "
            + "; ".join(parts)
        )


ATTACKS = {"websocket": websocket_attack, "headers": header_attack, "idle": idle_attack, "deadline": deadline_attack}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--only", nargs="+", choices=sorted(ATTACKS), default=list(ATTACKS))
    p.add_argument("--seconds", type=float, default=8.0, help="length of the header, idle and deadline attacks")
    p.add_argument("--upgrades", type=int, default=20, help="WebSocket upgrade requests")
    p.add_argument("--header-timeout", type=float, default=10.0, help="--header-timeout-s of the idle attack's server")
    p.add_argument("--concurrency", type=int, default=128, help="clients of the deadline attack")
    p.add_argument(
        "--ray",
        action="store_true",
        help="headers attack against serve --replicas 1 (Ray Serve's proxy holds the connection)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "cnn", arch="small_cnn", width=32, k=8)
        for name in args.only:
            ATTACKS[name](checkpoint, args)


if __name__ == "__main__":
    main()
