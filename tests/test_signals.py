"""Stop signals and start-up checks of the real server process (tests/slow_server.py holds the model).

SIGHUP drains as SIGTERM does; a second signal during the drain answers every accepted request
503 at once (never 500, no traceback) and the process exits; a busy port fails in one line before
the model loads. Synchronised on state only: the engine double's "entered" file, the queue-depth
and ready gauges, log lines and the process exit; never on sleeps.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import GOOD_ITEM, ServerProcess, free_port, held_server, hold_and_queue, wait_for_metric

from codedsmooth.service.http.server import startup_warnings
from codedsmooth.service.settings import ServeSettings

REQUESTS = 12


def _signal_scenario(checkpoint, gate: Path, monkeypatch, signals: list[int], drain_timeout_s: float):
    """Hold the first batch on the model thread, queue the rest, send ``signals`` (each later one
    once the drain is under way); the model is released only after the last signal."""
    srv = held_server(checkpoint, gate, monkeypatch, drain_timeout_s)
    try:
        srv.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                accepted = await hold_and_queue(client, srv, gate, REQUESTS)
                first = time.monotonic()
                srv.proc.send_signal(signals[0])
                await asyncio.to_thread(wait_for_metric, srv, "codedsmooth_model_ready", lambda v: v == 0)  # draining
                late = await client.post("/v1/predict", json={"inputs": [GOOD_ITEM]})
                for sig in signals[1:]:
                    srv.proc.send_signal(sig)
                last = time.monotonic()
                if len(signals) == 1:
                    (gate / "open").touch()
                answers = await asyncio.gather(*accepted, return_exceptions=True)
                return first, last, answers, late

        first, last, answers, late = asyncio.run(main())
        code = srv.proc.wait(drain_timeout_s + 10)
        exited = time.monotonic()
        output = srv.proc.stdout.read()
        print(output[-2500:])  # shown when an assertion fails: the server's own timeline
        return answers, late, code, exited - first, exited - last, output
    finally:
        (gate / "open").touch()
        srv.terminate()


def _statuses(answers) -> list:
    return [a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers]


def test_sighup_drains_like_sigterm(tiny_checkpoint, tmp_path, monkeypatch):
    answers, late, code, exit_s, _, output = _signal_scenario(
        tiny_checkpoint, tmp_path, monkeypatch, [signal.SIGHUP], drain_timeout_s=5
    )
    statuses = _statuses(answers)
    print(
        f"SIGHUP: {statuses.count(200)} of {len(statuses)} accepted requests answered 200; exit {code} after {exit_s:.2f}s"
    )
    assert statuses == [200] * REQUESTS
    assert late.status_code == 503 and late.headers.get("retry-after") and "error" in late.json()
    assert code == 0
    assert exit_s <= 5 + 1
    assert "SIGHUP: draining" in output and output.count("draining: refusing new requests") == 1
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGHUP)], ids=["int-int", "term-hup"]
)
def test_second_signal_during_drain_answers_503_at_once(tiny_checkpoint, tmp_path, monkeypatch, first, second):
    # The model never finishes its batch and the drain timeout is long: only the second signal ends it.
    answers, _, code, _, after_second_s, output = _signal_scenario(
        tiny_checkpoint, tmp_path, monkeypatch, [first, second], drain_timeout_s=30
    )
    statuses = _statuses(answers)
    print(
        f"{first.name} then {second.name}: statuses {sorted(set(map(str, statuses)))}; exit {code} {after_second_s:.2f}s after the second signal"
    )
    assert statuses == [503] * REQUESTS
    assert all(a.headers.get("retry-after") and "error" in a.json() for a in answers)
    assert code == 0
    assert after_second_s <= 3  # not the 30 s drain timeout
    assert "stopping now: answered" in output
    assert "Traceback" not in output and "Exception in ASGI application" not in output


def test_busy_port_fails_in_one_line_before_the_model_loads(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODEDSMOOTH_")}
        args = [
            sys.executable,
            "-m",
            "codedsmooth.cli",
            "--log-level",
            "info",
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            str(free_port()),
            "--checkpoint",
            str(tiny_checkpoint),
        ]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    print(r.stdout[-2000:], r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 2
    assert errors == [
        f"codedsmooth serve: error: cannot listen on 127.0.0.1:{port}: already in use (another server is listening there; pick another --port or stop it)"
    ]
    assert "loaded" not in r.stderr and "Traceback" not in r.stderr


def test_startup_warns_about_root_and_all_interfaces(tiny_checkpoint):
    exposed = startup_warnings(ServeSettings(host="0.0.0.0", port=8123))
    assert any("listening on all interfaces (0.0.0.0:8123)" in w for w in exposed)
    assert any("listening on all interfaces" in w for w in startup_warnings(ServeSettings(host="::")))
    assert not any("all interfaces" in w for w in startup_warnings(ServeSettings(host="127.0.0.1")))
    # the real server logs what applies to it (as root here or not)
    srv = ServerProcess(tiny_checkpoint, log_level="info", rci=False)
    try:
        srv.wait_ready()
    finally:
        srv.terminate()
    output = srv.proc.stdout.read()
    assert ("WARNING codedsmooth.server: running as root" in output) == (os.geteuid() == 0)
    assert "all interfaces" not in output
