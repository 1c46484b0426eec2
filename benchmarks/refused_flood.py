"""A key with a used-up quota floods image uploads: does it slow another client down, and how fast is it refused?

Reruns the red team's flood (issue 29, finding 1): one server (small CNN, RCI off) with a keys file;
``flood`` has ``quota=1`` and uses its item first; ``victim`` is unlimited. Then:

1. alone: ``victim`` sends one-image uploads (a 28x28 PNG) one at a time; median latency;
2. flood: ``--connections`` clients of ``flood`` (processes of their own) send 32 x 2048x2048 PNG uploads (one multipart
   body of about 270 kB, solid images) as fast as they are answered, while ``victim`` sends as many uploads again;
   the victim's median latency, and the flood's answers: statuses and the median latency of its 429s; and the
   server's CPU time over the phase (its share of one core, and per flood answer: what a refused request costs the
   server, the victim's requests included).

The two phases alternate in ``--rounds`` turns (the flooders wait between turns), ``--requests`` victim uploads
each in all, so a drift of the host's load over the run is shared by both sides of the ratio; the host's load
average is recorded. ``--flood-nice 19`` runs the flooders at the lowest CPU priority: on a host of few cores they
then stand in for clients on other machines, whose CPU is not the server's.

Prints both and writes JSON to ``benchmarks/results/refused_flood.json`` (``--out``).
Usage: python benchmarks/refused_flood.py [--requests 40] [--rounds 4] [--connections 3] [--flood-nice 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402

from codedsmooth.service.access.keys import add_key  # noqa: E402
from codedsmooth.service.launcher import LocalServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "refused_flood.json"


def png(side: int, value: int = 100) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), value).save(buf, format="PNG")
    return buf.getvalue()


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the server process has used so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def victim_latencies(url: str, key: str, path: str, n: int) -> list[float]:
    files = [("files", ("one.png", png(28), "image/png"))]
    out = []
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post(path, files=files)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"victim: HTTP {r.status_code}: {r.text[:200]}")
    return out


def flood(url: str, key: str, path: str, images: int, side: int, stop, go, sending, answers, nice: int = 0) -> None:
    """Send the flood's uploads while ``go`` is set, until ``stop``; put (status or an error's name, seconds) for each on
    ``answers``; ``sending``: how many flooders have a request out.

    Runs in a process of its own, so the flooder's own Python work (building 32-file multipart
    bodies) does not share the victim's interpreter lock: what the victim sees is the server.
    """
    if nice:
        os.nice(nice)
    big = png(side)
    body = [("files", (f"{i}.png", big, "image/png")) for i in range(images)]
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            with sending.get_lock():
                sending.value += 1
            t = time.perf_counter()
            try:
                status: int | str = c.post(path, files=body).status_code
            except httpx.HTTPError as exc:  # the server may close a refused upload's connection early
                status = type(exc).__name__
            answers.put((status, time.perf_counter() - t))
            with sending.get_lock():
                sending.value -= 1


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=40, help="victim requests alone and as many flooded")
    ap.add_argument(
        "--rounds", type=int, default=4, help="turns of alone and flooded the victim's requests are split in"
    )
    ap.add_argument("--connections", type=int, default=3, help="flooding clients")
    ap.add_argument("--images", type=int, default=32, help="images per flood request")
    ap.add_argument("--side", type=int, default=2048, help="width and height of the flood's images")
    ap.add_argument(
        "--flood-nice",
        type=int,
        default=0,
        help="CPU niceness of the flooding processes (e.g. 19 on a host of few cores: they then stand in for clients on "
        "other machines, whose CPU is not the server's)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    big = png(args.side)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", arch="small_cnn", width=8, k=8)
        keys = Path(tmp) / "keys.txt"
        flood_key = add_key(keys, "flood", quota="1")
        victim_key = add_key(keys, "victim", quota="none")
        server = LocalServer(ckpt, api_keys_file=keys, threads=1, rci=False, max_delay_ms=0, log_level="error")
        try:
            server.wait_ready(300)
            path = "/v1/predict/image"
            r = httpx.post(
                server.url + path,
                files=[("files", ("one.png", png(28), "image/png"))],
                headers={"Authorization": f"Bearer {flood_key}"},
            )
            assert r.status_code == 200, r.text  # the flood key's one item: its quota is used up from here on
            victim_latencies(server.url, victim_key, path, 5)  # warm-up
            ctx = multiprocessing.get_context("spawn")
            stop, go, sending, queue = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
            procs = [
                ctx.Process(
                    target=flood,
                    args=(
                        server.url,
                        flood_key,
                        path,
                        args.images,
                        args.side,
                        stop,
                        go,
                        sending,
                        queue,
                        args.flood_nice,
                    ),
                )
                for _ in range(args.connections)
            ]
            for p in procs:
                p.start()
            alone: list[float] = []
            during: list[float] = []
            answers: list = []
            cpu_s = wall_s = 0.0
            load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
            per_round = math.ceil(args.requests / args.rounds)
            for _ in range(args.rounds):  # alone and flooded in turns: a drift of the host's load is shared by both
                go.clear()
                while sending.value:  # the flood's last requests are answered (a benchmark's poll, not a sync)
                    time.sleep(0.005)
                alone += victim_latencies(server.url, victim_key, path, per_round)
                go.set()
                answers.append(queue.get(timeout=300))  # the flood is under way
                cpu_start, wall_start = server_cpu_s(server.proc.pid), time.perf_counter()
                during += victim_latencies(server.url, victim_key, path, per_round)
                cpu_s += server_cpu_s(server.proc.pid) - cpu_start
                wall_s += time.perf_counter() - wall_start
            stop.set()
            while any(p.is_alive() for p in procs) or not queue.empty():
                try:
                    answers.append(queue.get(timeout=1))
                except Exception:  # noqa: BLE001 - queue.Empty: the flooders are finishing
                    pass
            for p in procs:
                p.join()
        finally:
            server.terminate()
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    refused = [s for status, s in answers if status == 429]
    result = {
        "flood": {
            "connections": args.connections,
            "images": args.images,
            "side": args.side,
            "body_bytes": len(big) * args.images,
            "nice": args.flood_nice,
        },
        "victim_median_ms_alone": round(statistics.median(alone) * 1e3, 2),
        "victim_median_ms_during_flood": round(statistics.median(during) * 1e3, 2),
        "flood_answers": statuses,
        "flood_429_median_ms": round(statistics.median(refused) * 1e3, 2) if refused else None,
        "flood_429_max_ms": round(max(refused) * 1e3, 2) if refused else None,
        "victim_requests": len(alone),
        "rounds": args.rounds,
        "server_cpu_share_during_flood": round(cpu_s / wall_s, 3),
        "server_cpu_ms_per_flood_answer": round(cpu_s * 1e3 / max(1, len(answers)), 3),
        # the host's 1-minute load average when the flood began, and its cores: the flooders, the victim and the server
        # share them, so on a busy host the victim's slowdown is the host's as much as the server's
        "host_load_average": round(load_average, 2),
        "host_cpus": os.cpu_count(),
    }
    print(
        f"flood: {args.connections} connections of a key with a used-up quota, {args.images} x {args.side}x{args.side} PNG per request "
        f"({result['flood']['body_bytes']:,} bytes); answers {statuses}"
    )
    print(
        f"victim one-image latency, median of {len(alone)} each: alone {result['victim_median_ms_alone']} ms, "
        f"during the flood {result['victim_median_ms_during_flood']} ms ({statistics.median(during) / statistics.median(alone):.2f}x)"
    )
    print(f"flood's 429s: median {result['flood_429_median_ms']} ms, max {result['flood_429_max_ms']} ms")
    print(
        f"server CPU during the flood: {result['server_cpu_share_during_flood']:.0%} of one core, "
        f"{result['server_cpu_ms_per_flood_answer']} ms per flood answer (the victim's requests included); "
        f"host load average {result['host_load_average']} on {result['host_cpus']} cores"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
