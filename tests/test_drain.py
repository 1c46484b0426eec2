"""SIGTERM with work in flight, against the real server holding a slowed engine (tests/slow_server.py).

Synchronised on state only: the engine double's "entered" file, the queue-depth, in-flight and
ready gauges on the metrics port, and the process exit; never on sleeps.
"""

import asyncio
import signal
import time

import httpx
from helpers import GOOD_ITEM, held_server, hold_and_queue, wait_for_metric


def _drain_scenario(
    tiny_checkpoint,
    tmp_path,
    monkeypatch,
    drain_timeout_s: float,
    open_gate: bool,
    slow_batch_s: float,
    requests: int = 12,
):
    """Hold the first batch on the model thread, queue the rest, SIGTERM, then (maybe) release the model."""
    srv = held_server(tiny_checkpoint, tmp_path, monkeypatch, drain_timeout_s, slow_batch_s)
    try:
        srv.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                accepted = await hold_and_queue(
                    client, srv, tmp_path, requests
                )  # the first on the model thread, the rest queued
                sigterm = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(wait_for_metric, srv, "codedsmooth_model_ready", lambda v: v == 0)  # draining
                late = await client.post("/v1/predict", json={"inputs": [GOOD_ITEM]})
                ready = await client.get("/health/ready")
                if open_gate:
                    (tmp_path / "open").touch()
                answers = await asyncio.gather(*accepted)
                return sigterm, answers, late, ready

        sigterm, answers, late, ready = asyncio.run(main())
        code = srv.proc.wait(drain_timeout_s + 10)
        exit_s = time.monotonic() - sigterm
        output = srv.proc.stdout.read()
        print(output[-2500:])  # shown when an assertion fails: the server's own timeline of the drain
        return answers, late, ready, code, exit_s, output
    finally:
        (tmp_path / "open").touch()
        srv.terminate()


def test_sigterm_answers_every_accepted_request_refuses_new_ones_and_exits_in_time(
    tiny_checkpoint, tmp_path, monkeypatch
):
    answers, late, ready, code, exit_s, output = _drain_scenario(
        tiny_checkpoint, tmp_path, monkeypatch, drain_timeout_s=2, open_gate=True, slow_batch_s=0.1
    )
    codes = [r.status_code for r in answers]
    print(
        f"drain: {codes.count(200)} of {len(codes)} accepted requests answered 200; exit {code} after {exit_s:.2f}s (drain timeout 2 s)"
    )
    assert codes == [200] * len(answers)
    assert late.status_code == 503 and late.headers.get("retry-after") and "error" in late.json()
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert code == 0
    assert exit_s <= 2 + 1
    assert output.count("draining: refusing new requests") == 1  # the drain runs once
    assert "Traceback" not in output and " ERROR " not in output


def test_drain_timeout_answers_leftovers_503_and_exits_in_time(tiny_checkpoint, tmp_path, monkeypatch):
    # The model never finishes its first batch within the drain timeout: the accepted requests
    # still get an answer (503 + Retry-After), not a reset, and the process does not wait for the model.
    answers, late, ready, code, exit_s, output = _drain_scenario(
        tiny_checkpoint, tmp_path, monkeypatch, drain_timeout_s=1, open_gate=False, slow_batch_s=0
    )
    codes = [r.status_code for r in answers]
    print(
        f"drain timeout: {codes.count(503)} of {len(codes)} leftovers answered 503; exit {code} after {exit_s:.2f}s (drain timeout 1 s)"
    )
    assert codes == [503] * len(answers)
    assert all(r.headers.get("retry-after") and "error" in r.json() for r in answers)
    assert late.status_code == 503
    assert code == 0
    assert exit_s <= 1 + 1
    assert output.count("draining: refusing new requests") == 1
    assert "Traceback" not in output and "cancel" not in output.lower()
