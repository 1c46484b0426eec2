"""Runs the app under uvicorn (with the protocol of ``.connections``), the metrics listener, one graceful drain.

On the first SIGTERM/SIGINT the lifecycle drains once: readiness goes 503, new requests get 503 +
``Retry-After``, accepted requests finish for up to ``drain_timeout_s``; whatever is still unanswered
then gets 503 (never a cancelled connection). Only then does uvicorn stop, with a short graceful
timeout of its own that does not add to the drain, and the process exits 0. A second SIGINT forces
an immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import uvicorn

from .app import create_app
from .connections import protocol_class
from .lifecycle import EngineFactory, Lifecycle
from .metrics import start_metrics_listener
from .settings import ServeSettings

log = logging.getLogger("codedsmooth.server")

# After the drain, uvicorn closes idle connections and waits for the rest this long (seconds).
# The drain has answered every accepted request by then, so what is left is a client mid-body.
AFTER_DRAIN_GRACE_S = 0.5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_started or self._loop is None:
            # a second signal (or one before start-up): stop now, as uvicorn does
            return super().handle_exit(sig, frame)
        self._drain_started = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = self.lifecycle.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def uvicorn_config(app, settings: ServeSettings) -> uvicorn.Config:
    lifecycle: Lifecycle = app.state.lifecycle
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        http=protocol_class(settings, lifecycle),  # connection slots, header bounds and timeout: see .connections
        ws="none",  # no WebSocket routes: an upgrade request is answered as HTTP/1.1
        server_header=False,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=AFTER_DRAIN_GRACE_S,  # type: ignore[arg-type] - uvicorn accepts a float
        access_log=False,
    )


def run_server(settings: ServeSettings, engine_factory: EngineFactory | None = None, exit_when_done: bool = True) -> int:
    """Serve until a signal stops the server; returns the exit code.

    With ``exit_when_done`` (the CLI's case) the process ends right after the server has stopped:
    every answer is sent by then, and Python's teardown with torch loaded (joining the model
    thread, which may still be inside a call that outlived the drain, then unloading torch) takes
    a second or more on a busy machine, which would break the promise to exit within the drain
    timeout. Pass ``False`` to return instead (embedding in another program).
    """
    app = create_app(settings, engine_factory=engine_factory)
    lifecycle: Lifecycle = app.state.lifecycle
    try:
        metrics_listener = start_metrics_listener(lifecycle.metrics, settings.metrics_host, settings.metrics_port)
    except OSError as exc:  # e.g. a second server on this host with the default metrics port
        raise ValueError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc.strerror or exc}); pick another --metrics-port") from None
    server = DrainingServer(uvicorn_config(app, settings), lifecycle)
    try:
        server.run()
    finally:
        metrics_listener.shutdown()
    code = 0 if server.started else 1
    if lifecycle.model_busy:
        log.warning("a model call is still running after the drain (its requests were answered 503); not waiting for it")
    log.info("stopped (exit code %d)", code)
    if exit_when_done:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
