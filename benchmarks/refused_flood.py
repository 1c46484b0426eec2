"""A key with a used-up quota floods image uploads: does it slow another client down, and how fast is it refused?

Reruns the red team's flood (issue 29, finding 1): one server (small CNN, RCI off) with a keys file;
``flood`` has ``quota=1`` and uses its item first; ``victim`` is unlimited. Then:

1. alone: ``victim`` sends ``--requests`` one-image uploads (a 28x28 PNG) one at a time; median latency;
2. flood: ``--connections`` clients of ``flood`` (processes of their own) send 32 x 2048x2048 PNG uploads (one multipart
   body of about 130 kB, solid images) as fast as they are answered, while ``victim`` sends its
   ``--requests`` again; the victim's median latency, and the flood's answers: statuses and the
   median latency of its 429s.

Prints both and writes JSON to ``benchmarks/results/refused_flood.json`` (``--out``).
Usage: python benchmarks/refused_flood.py [--requests 40] [--connections 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
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


def flood(url: str, key: str, path: str, images: int, side: int, stop, answers) -> None:
    """Send the flood's uploads until ``stop``; put (status or an error's name, seconds) for each on ``answers``.

    Runs in a process of its own, so the flooder's own Python work (building 32-file multipart
    bodies) does not share the victim's interpreter lock: what the victim sees is the server.
    """
    big = png(side)
    body = [("files", (f"{i}.png", big, "image/png")) for i in range(images)]
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status: int | str = c.post(path, files=body).status_code
            except httpx.HTTPError as exc:  # the server may close a refused upload's connection early
                status = type(exc).__name__
            answers.put((status, time.perf_counter() - t))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=40, help="victim requests per phase")
    ap.add_argument("--connections", type=int, default=3, help="flooding clients")
    ap.add_argument("--images", type=int, default=32, help="images per flood request")
    ap.add_argument("--side", type=int, default=2048, help="width and height of the flood's images")
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
            alone = victim_latencies(server.url, victim_key, path, args.requests)
            ctx = multiprocessing.get_context("spawn")
            stop, queue = ctx.Event(), ctx.Queue()
            procs = [
                ctx.Process(target=flood, args=(server.url, flood_key, path, args.images, args.side, stop, queue))
                for _ in range(args.connections)
            ]
            for p in procs:
                p.start()
            queue_first = queue.get(timeout=300)  # the flood is under way
            during = victim_latencies(server.url, victim_key, path, args.requests)
            stop.set()
            answers = [queue_first]
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
        },
        "victim_median_ms_alone": round(statistics.median(alone) * 1e3, 2),
        "victim_median_ms_during_flood": round(statistics.median(during) * 1e3, 2),
        "flood_answers": statuses,
        "flood_429_median_ms": round(statistics.median(refused) * 1e3, 2) if refused else None,
        "flood_429_max_ms": round(max(refused) * 1e3, 2) if refused else None,
        "victim_requests": args.requests,
    }
    print(
        f"flood: {args.connections} connections of a key with a used-up quota, {args.images} x {args.side}x{args.side} PNG per request "
        f"({result['flood']['body_bytes']:,} bytes); answers {statuses}"
    )
    print(
        f"victim one-image latency, median of {args.requests}: alone {result['victim_median_ms_alone']} ms, "
        f"during the flood {result['victim_median_ms_during_flood']} ms ({statistics.median(during) / statistics.median(alone):.2f}x)"
    )
    print(f"flood's 429s: median {result['flood_429_median_ms']} ms, max {result['flood_429_max_ms']} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
