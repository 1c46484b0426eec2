"""Runs the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

First signal: readiness goes 503, new requests get 503 + Retry-After, queued and
running requests finish (up to ``drain_timeout_s``), then uvicorn stops and the
process exits 0. A second SIGINT forces an immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from .app import ServiceState, create_app
from .settings import ServeSettings

log = logging.getLogger("codedsmooth.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServiceState):
        super().__init__(config)
        self.state = state
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
        self.state.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        log.info("draining: refusing new requests, finishing %d in flight", self.state.in_flight)
        start = time.monotonic()
        finished = await self.state.drain()
        end = time.monotonic() + 2.0
        while self.state.in_flight > 0 and time.monotonic() < end:  # answers being written
            await asyncio.sleep(0.01)
        log.info("drained in %.2fs (%s); stopping", time.monotonic() - start, "complete" if finished else "timed out")
        self.should_exit = True


def run_server(settings: ServeSettings) -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        access_log=False,
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return 0 if server.started else 1
