"""Test helpers: real servers (``codedsmooth serve`` child processes on 127.0.0.1 with 2 torch threads),
waiting on observable state, and per-image outcomes (the independent worst case the report's cascade is checked against)."""

import asyncio
import gzip
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from codedsmooth.service.launcher import LocalServer, free_port, local_server


def metric_samples(server) -> dict:
    """{(sample name, sorted label items): value} of the server's /metrics, read from its metrics port.

    ``server``: a running server (its ``metrics_url``) or the metrics base URL itself.
    """
    base = getattr(server, "metrics_url", server)
    out = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(server, name: str, **labels) -> float:
    return metric_samples(server).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(probe, what: str, timeout: float = 60.0, interval: float = 0.01):
    """Read observable state with ``probe()`` until it is truthy and return it; the pause is only the polling interval."""
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not reached in {timeout:.0f}s")
        time.sleep(interval)


def wait_for_metric(server, name: str, predicate, timeout: float = 60.0, **labels) -> float:
    """Poll a metric until ``predicate(value)`` holds (state, not sleeps, is what tests wait on)."""
    seen = []

    def reached():
        seen.append(metric(server, name, **labels))
        return predicate(seen[-1])

    try:
        wait_until(reached, f"{name}{labels}", timeout)
    except TimeoutError:
        raise TimeoutError(f"{name}{labels} = {seen[-1]} did not reach the expected state in {timeout:.0f}s") from None
    return seen[-1]


def run_in_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process (a clean ``sys.modules``); its assertions must hold."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


class ServerProcess(LocalServer):
    def __init__(self, checkpoint, **settings):
        super().__init__(checkpoint, threads=settings.pop("threads", 2), **settings)


class LoggedServer(ServerProcess):
    """A server whose output is read continuously into ``lines`` (tests wait for log lines)."""

    def __init__(self, checkpoint, **settings):
        super().__init__(checkpoint, **settings)
        self.lines: list[str] = []
        threading.Thread(
            target=lambda: self.lines.extend(line.rstrip("\n") for line in self.proc.stdout), daemon=True
        ).start()

    def wait_line(self, text: str) -> str:
        return wait_until(
            lambda: next((line for line in self.lines if text in line), None), f"a log line with {text!r}", 30
        )


def running_server(checkpoint, **settings):
    return local_server(checkpoint, threads=settings.pop("threads", 2), **settings)


GOOD_ITEM = np.full((1, 8, 8), 0.5).tolist()  # one valid item for the 8x8 digits checkpoints of the tests
SLOW_SERVER = [sys.executable, str(Path(__file__).with_name("slow_server.py"))]  # serve with an engine held at a gate


def held_server(
    checkpoint, gate: Path, monkeypatch, drain_timeout_s: float, slow_batch_s: float = 0.0
) -> ServerProcess:
    """A server (not started) whose engine holds its first batch until ``gate/open`` exists (tests/slow_server.py)."""
    monkeypatch.setenv("SLOW_ENGINE_GATE", str(gate))
    monkeypatch.setenv("SLOW_BATCH_S", str(slow_batch_s))
    return ServerProcess(
        checkpoint,
        program=SLOW_SERVER,
        log_level="info",
        drain_timeout_s=drain_timeout_s,
        max_batch_size=4,
        max_delay_ms=0,
        max_queue_size=64,
        timeout_ms=60000,
        rci=False,
    )


async def hold_and_queue(client, server, gate: Path, requests: int) -> list:
    """Post one request and wait until the model thread holds it, then ``requests - 1`` more, queued behind it; their futures."""

    def post():
        return asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [GOOD_ITEM]}))

    accepted = [post()]
    await asyncio.to_thread(wait_until, (gate / "entered").exists, "the first batch on the model thread", 60, 0.005)
    accepted += [post() for _ in range(requests - 1)]
    await asyncio.to_thread(wait_for_metric, server, "codedsmooth_queue_depth", lambda v: v == requests - 1)
    return accepted


@torch.no_grad()
def correct_per_image(predict_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Boolean per image: ``predict_fn`` (logits or probabilities) puts its top score on the label."""
    out = [
        predict_fn(x[i : i + batch_size]).argmax(1).cpu() == y[i : i + batch_size].cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def worst_case(robust) -> torch.Tensor:
    """Per-image worst case over attacks: robust only where robust under every attack (logical AND)."""
    masks = [torch.as_tensor(r, dtype=torch.bool).cpu() for r in robust]
    if not masks:
        raise ValueError("worst_case needs at least one attack's per-image outcome")
    if len({m.shape for m in masks}) != 1:
        raise ValueError(f"per-image outcomes differ in shape: {[tuple(m.shape) for m in masks]}")
    return torch.stack(masks).all(0)


# The IDX format's type codes (third byte of the magic number), as LeCun's MNIST page lists them.
IDX_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (big-endian; gzipped when ``path`` ends in .gz), for the reader's tests."""
    array = np.asarray(array)
    code = IDX_TYPE_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    body = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    body += np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).tobytes()
    Path(path).write_bytes(gzip.compress(body) if str(path).endswith(".gz") else body)


__all__ = [
    "GOOD_ITEM",
    "SLOW_SERVER",
    "held_server",
    "hold_and_queue",
    "ServerProcess",
    "running_server",
    "free_port",
    "metric_samples",
    "metric",
    "wait_for_metric",
    "wait_until",
    "run_in_fresh_interpreter",
    "correct_per_image",
    "worst_case",
    "write_idx",
]


def write_card(checkpoint_dir, name: str, accuracy: float = 0.5) -> dict:
    """Write a small valid robustness card into ``checkpoint_dir`` (its ``robustness.json``); returns it as JSON."""
    import json

    from codedsmooth.models.card import CARD_FILE, RobustnessCard

    card = RobustnessCard.model_validate(
        {
            "source": "audit",
            "model": {"name": name, "url": "http://127.0.0.1:1"},
            "dataset": "digits",
            "eps": [0.1, 0.3],
            "samples": {"s": [3, 1, 4]},
            "measurements": [
                {
                    "attack": "square",
                    "threat": "score-based",
                    "setting": "RCI off",
                    "eps": 0.3,
                    "sample": "s",
                    "n": 3,
                    "robust_accuracy": accuracy,
                    "interval": [0.1, 0.9],
                    "queries_per_broken": {"median": 12, "p90": 40},
                    "queries": 300,
                    "rate_limited": 2,
                },
                {
                    "attack": "decision",
                    "threat": "decision-based",
                    "setting": "RCI off",
                    "eps": 0.3,
                    "sample": "s",
                    "n": 3,
                    "robust_accuracy": accuracy + 0.1,
                    "interval": [0.2, 0.95],
                },
                {
                    "attack": "square",
                    "threat": "score-based",
                    "setting": "RCI off",
                    "eps": 0.1,
                    "sample": "s",
                    "n": 3,
                    "robust_accuracy": 1.0,
                    "interval": [0.4, 1.0],
                },
            ],
            "rate_limited": 2,
            "command": "codedsmooth audit --url http://127.0.0.1:1",
            "date": "2026-12-01",
        }
    )
    (Path(checkpoint_dir) / CARD_FILE).write_text(card.to_json())
    return json.loads(card.to_json())
