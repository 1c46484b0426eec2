"""Client connections below the ASGI app: slots, header bounds and timeout, the protocol's own answers.

The app cannot see a connection or a head before it is complete, so sockets that send nothing and
heads without end must be bounded here, in uvicorn's httptools protocol (subclassed by
:func:`protocol_class`). What it guarantees is described in docs/serving.md, "Connections".
"""

from __future__ import annotations

import json
import logging
import time

from codedsmooth.service.access.refusals import RefusalLog

log = logging.getLogger("codedsmooth.server")

ARRIVAL = "codedsmooth.arrival"  # scope["state"] key: time.monotonic() when the request's first byte was read
ADMITTED = "codedsmooth.connection_admitted"  # scope["state"] key: whether the request's connection holds a slot


class ConnectionSlots:
    """The open connections and the ``limit`` slots they compete for.

    A connection is any object with ``idle_since`` (``time.monotonic()``), ``answered`` (whether it
    has had an answer), ``evictable`` (no request in the app) and ``evict()`` (close it). Only the
    event loop's thread touches this.
    """

    def __init__(self, limit: int, metrics=None):
        self.limit = limit
        self.hard_limit = 2 * limit + 16
        self.metrics = metrics
        self.open: set = set()
        self.admitted: set = set()

    def opened(self, conn) -> bool:
        """Count ``conn`` and give it a free slot if there is one.

        At the hard limit of open sockets the oldest one that has never been answered and has no
        request in the app (a silent socket, or one still sending its first head) is closed to make
        room; only when there is none is ``conn`` refused (False: close it at once). So sockets that
        send nothing cannot lock out fresh clients, whatever their number.
        """
        if len(self.open) >= self.hard_limit:
            silent = [c for c in self.open if c.evictable and not c.answered]
            if not silent:
                return False
            victim = min(silent, key=lambda c: c.idle_since)
            self.closed(victim)
            victim.evict()
            if self.metrics is not None:
                self.metrics.connections_evicted.inc()
        self.open.add(conn)
        self._gauge()
        self.admit(conn, evict=False)
        return True

    def admit(self, conn, evict: bool = True) -> bool:
        """Whether ``conn`` holds a slot, giving it a free one or (``evict``) the longest-idle connection's."""
        if conn in self.admitted:
            return True
        if conn not in self.open:
            return False
        if len(self.admitted) >= self.limit:
            idle = [c for c in self.admitted if c.evictable] if evict else []
            if not idle:
                return False
            victim = min(idle, key=lambda c: (c.answered, c.idle_since))
            self.admitted.discard(victim)
            victim.evict()
            if self.metrics is not None:
                self.metrics.connections_evicted.inc()
        self.admitted.add(conn)
        return True

    def closed(self, conn) -> None:
        """Release ``conn``'s slot and count (idempotent)."""
        self.admitted.discard(conn)
        self.open.discard(conn)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.connections.set(len(self.open))


def error_bytes(status: int, message: str, default_headers=()) -> bytes:
    """A complete HTTP/1.1 error answer with the JSON error body that closes the connection."""
    from http import HTTPStatus

    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _HeadTooLarge(Exception):
    pass


def protocol_class(settings, lifecycle):
    """uvicorn's httptools protocol with the slots, header bounds and timeout, and arrival times above."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    slots = ConnectionSlots(settings.max_connections, lifecycle.metrics)
    metrics = lifecycle.metrics
    header_timeout_s = settings.header_timeout_s
    max_head = settings.max_header_bytes
    max_fields = settings.max_headers
    refusals = RefusalLog(
        log, logging.INFO
    )  # one line per (peer, status) per interval, counted in codedsmooth_requests_total

    class BoundedHttpProtocol(HttpToolsProtocol):
        _header_timer = None
        _head_bytes = 0  # bytes read of the head being received (counted per read)
        _head_parsed = 0  # bytes of its request line and fields the parser reported
        _fields = 0
        _in_head = True  # between requests or inside a head (not inside a body)
        _read_at = 0.0
        idle_since = 0.0
        answered = False

        # ---- slots ------------------------------------------------------------------

        @property
        def evictable(self) -> bool:
            """No request of this connection is in the app (none yet, or every answer is complete)."""
            return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

        def evict(self) -> None:
            log.info("closing the longest-idle connection to admit a new one (%d connections at most)", slots.limit)
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.idle_since = time.monotonic()
            if not slots.opened(self):
                log.warning("closing a new connection: %d are open already", len(slots.open))
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            slots.closed(self)
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.answered = True
            if not self.transport.is_closing() and self.evictable:
                self.idle_since = time.monotonic()

        # ---- header timeout ---------------------------------------------------------

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._awaiting_headers() and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers within %gs", header_timeout_s)
                self.transport.close()

        # ---- reading: header bounds and arrival --------------------------------------

        def data_received(self, data: bytes) -> None:
            self._read_at = time.monotonic()
            if self._awaiting_headers():
                self._arm()
            while data and not self.transport.is_closing():
                if not self._in_head:
                    self._feed(data)
                    break
                room = max_head - self._head_bytes
                part, data = data[:room], data[room:]
                self._head_bytes += len(part)
                if part:
                    self._feed(part)
                if data and self._in_head and not self.transport.is_closing():
                    self._refuse(431, f"request headers exceed {max_head} bytes")
            if not self._awaiting_headers():
                self._disarm()

        def _feed(self, data: bytes) -> None:
            """uvicorn's ``data_received``, answering parser errors with JSON (431 for the bounds, else 400)."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                log.debug(
                    "a protocol upgrade request was answered as HTTP/1.1 (WebSocket is off); its connection closes"
                )
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _HeadTooLarge):
                    self._refuse(431, str(cause))
                else:
                    self._refuse(400, "invalid HTTP request")

        def _refuse(self, status: int, message: str) -> None:
            peer = self.client[0] if self.client else "unknown"
            refusals.refused(f"peer {peer}", str(status), f"{message} ({status}); the connection was closed")
            metrics.count_request("unmatched", status)
            if self.cycle is None or self.cycle.response_complete:  # no answer under way that this one would cut into
                self.transport.write(error_bytes(status, message, self.server_state.default_headers))
            self.transport.close()

        # parser callbacks

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_parsed, self._fields = True, 0, 0
            self.scope["state"][ARRIVAL] = self._read_at

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._fields += 1
            if self._fields > max_fields:
                self._too_large(f"more than {max_fields} header fields")
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self._head_parsed += n
            if self._head_parsed > max_head:
                self._too_large(f"request headers exceed {max_head} bytes")

        def _too_large(self, message: str):
            raise _HeadTooLarge(message)  # inside the parser: it raises a parser error, answered in _feed

        def on_headers_complete(self) -> None:
            self._in_head = False
            upgrade = self.parser.should_upgrade()
            self.scope["state"][ADMITTED] = slots.admit(self)
            super().on_headers_complete()
            if upgrade and self.cycle is not None:
                self.cycle.keep_alive = False  # the parser stops reading this connection after the request

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

    return BoundedHttpProtocol
