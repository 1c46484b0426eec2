"""Runs the app under uvicorn (with the protocol of ``.connections``): the public socket bound before
the model loads, the metrics listener, one graceful drain.

SIGTERM, SIGINT and SIGHUP all stop the server the same way. On the first, the lifecycle drains
once: readiness goes 503, new requests get 503 + ``Retry-After``, accepted requests finish for up to
``drain_timeout_s``; whatever is still unanswered then gets 503 (never a cancelled connection). Only
then does uvicorn stop, with a short graceful timeout of its own that does not add to the drain, and
the process exits 0. A second signal during the drain cuts it short: every accepted request not yet
answered gets 503 at once, and the process exits 0 as above (it does not wait for a model call).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

import uvicorn

from codedsmooth.service.http.app import create_app
from codedsmooth.service.http.connections import protocol_class
from codedsmooth.service.lifecycle import EngineFactory, Lifecycle
from codedsmooth.service.metrics import start_metrics_listener
from codedsmooth.service.settings import ServeSettings

log = logging.getLogger("codedsmooth.server")

# After the drain, uvicorn closes idle connections and waits for the rest this long (seconds).
# The drain has answered every accepted request by then, so what is left is a client mid-body.
AFTER_DRAIN_GRACE_S = 0.5

# Signals that stop the server: the first drains, a second cuts the drain short. SIGHUP (a closed
# terminal, or an operator's reload habit) drains too: the server has no configuration to reload.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

# Addresses that listen on every interface.
ALL_INTERFACES = {"0.0.0.0", "::", ""}


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        """Route every stop signal to ``handle_exit`` while serving; restore the old handlers after.

        Unlike uvicorn's own, it also takes SIGHUP and does not re-raise the signals once the server
        has stopped: the drain has already handled them, and the exit code is ``run_server``'s.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: no logging or locks here, only hand-over to the event loop.
        if self._loop is None:  # before serve() started: nothing to drain
            self.should_exit = True
            return
        first = not self._drain_started
        self._drain_started = True
        self._loop.call_soon_threadsafe(self._start_drain if first else self._stop_now, signal.Signals(sig).name)

    def _start_drain(self, signal_name: str) -> None:
        log.info("%s: draining (a second signal stops at once)", signal_name)
        task = self.lifecycle.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))

    def _stop_now(self, signal_name: str) -> None:
        log.warning("%s again: stopping now; requests not yet answered get 503", signal_name)
        self.lifecycle.stop_now()


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
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # uvicorn accepts a float (its stubs say int)
        timeout_graceful_shutdown=AFTER_DRAIN_GRACE_S,  # type: ignore[arg-type]  # uvicorn accepts a float
        access_log=False,
    )


def bind_public_socket(host: str, port: int) -> socket.socket:
    """The public listening socket, bound now (before the model loads) so a busy port fails in a second.

    Raises ``ValueError`` with a one-line message when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
    )  # as uvicorn: rebinding past TIME_WAIT, not sharing a live port
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = (
            "already in use (another server is listening there; pick another --port or stop it)"
            if exc.errno == errno.EADDRINUSE
            else (exc.strerror or str(exc))
        )
        raise ValueError(f"cannot listen on {host}:{port}: {why}") from None
    except (socket.gaierror, UnicodeError) as exc:  # pragma: no cover - gaierror is an OSError on Unix
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def startup_warnings(settings: ServeSettings) -> list[str]:
    """What an operator should know about how this server is exposed (logged as warnings at start)."""
    warnings = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        warnings.append(
            "running as root: a flaw in any dependency would own the host; run as an unprivileged user (the Docker image runs as uid 10001)"
        )
    open_to_anyone = (
        ""
        if settings.api_keys_file
        else "; without --api-keys-file anyone who reaches it may query, as much as they like"
    )
    if settings.host in ALL_INTERFACES:
        warnings.append(
            f"listening on all interfaces ({settings.host or '0.0.0.0'}:{settings.port}): the API is reachable from other hosts{open_to_anyone}; "
            "expose it through a reverse proxy or firewall, or bind --host 127.0.0.1"
        )
    elif open_to_anyone and not _loopback(settings.host):
        warnings.append(
            f"listening on {settings.host}:{settings.port}, not a loopback address: the API is reachable from other hosts{open_to_anyone}"
        )
    return warnings


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def run_server(
    settings: ServeSettings,
    engine_factory: EngineFactory | None = None,
    exit_when_done: bool = True,
    listener: socket.socket | None = None,
) -> int:
    """Serve until a signal stops the server; returns the exit code.

    ``listener``: the public socket from ``bind_public_socket`` (bound here when not given), always
    before the model starts loading.

    With ``exit_when_done`` (the CLI's case) the process ends right after the server has stopped:
    every answer is sent by then, and Python's teardown with torch loaded (joining the model
    thread, which may still be inside a call that outlived the drain, then unloading torch) takes
    a second or more on a busy machine, which would break the promise to exit within the drain
    timeout. Pass ``False`` to return instead (embedding in another program).
    """
    if listener is None:
        listener = bind_public_socket(settings.host, settings.port)
    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    app = create_app(settings, engine_factory=engine_factory)
    lifecycle: Lifecycle = app.state.lifecycle
    try:
        metrics_listener = start_metrics_listener(lifecycle.metrics, settings.metrics_host, settings.metrics_port)
    except OSError as exc:  # e.g. a second server on this host with the default metrics port
        listener.close()
        raise ValueError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc.strerror or exc}); pick another --metrics-port"
        ) from None
    server = DrainingServer(uvicorn_config(app, settings), lifecycle)
    host, port = listener.getsockname()[:2]
    log.info(
        "bound http://%s:%d; accepting connections once the model has loaded and warmed up",
        f"[{host}]" if ":" in host else host,
        port,
    )
    try:
        server.run(sockets=[listener])
    finally:
        metrics_listener.shutdown()
    code = 0 if server.started else 1
    if lifecycle.model_busy:
        log.warning(
            "a model call is still running after the drain (its requests were answered 503); not waiting for it"
        )
    log.info("stopped (exit code %d)", code)
    if exit_when_done:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
