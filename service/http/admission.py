"""Admission of every HTTP request: arrival and deadlines, the connection limit, body bounds, status.

The middleware is the outermost layer of the app. It asks the lifecycle to admit the request
(``Lifecycle.admit`` stamps arrival and deadlines into ``scope["state"]["admission"]`` and counts it
in flight) and releases it with the status actually sent, whatever happened on the way. The
arrival is when the server's protocol read the request's first byte (``connections.ARRIVAL``),
and whether the request's connection holds one of the ``--max-connections`` slots is the
protocol's word too (``connections.ADMITTED``). With ``--api-keys-file`` the request's API key is
checked here, and a predict request's client is charged one item (``access.Access.hold``), both
from the request line and headers, before its body is read: a refused client costs no read, parse
or decode. Refusals of the request's input (400, 403, 408, 413, 415, 422) are counted in
``codedsmooth_rejected_total`` and logged through a rate-limited, aggregated ``RefusalLog``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match

from codedsmooth.service.access.control import CLIENT, HELD, charges_items
from codedsmooth.service.access.refusals import RefusalLog
from codedsmooth.service.api.handlers import error_response
from codedsmooth.service.errors import CLIENT_CLOSED, PayloadTooLarge, RequestTimeout, ServiceError, quoted
from codedsmooth.service.http.connections import ADMITTED, ARRIVAL
from codedsmooth.service.lifecycle import MODEL, Lifecycle

CLOSE = {"Connection": "close"}  # uvicorn closes the connection after the answer, unread bytes and all
log = logging.getLogger("codedsmooth.service")
# Answers that refuse a request's input or its client's rights, by the reason they are counted under in
# codedsmooth_rejected_total (401 and 429 are access control's: codedsmooth_client_refused_total).
REFUSALS = {
    400: "bad_request",
    403: "forbidden",
    408: "body_timeout",
    413: "too_large",
    415: "media_type",
    422: "invalid_input",
}
MAX_REMEMBERED = 1024  # request lines whose route AdmissionMiddleware remembers (names in paths vary without bound)


class AdmissionMiddleware:
    """Admits each HTTP request through the lifecycle and bounds its body.

    - stamps ``scope["state"]["admission"]`` (arrival, deadline, body deadline);
    - refuses a declared body over ``max_body_bytes`` with 413 before reading it, and a streamed one
      as soon as it passes the limit, both with ``Connection: close`` (the rest is never read);
    - answers a request on a connection without a slot 503 + ``Retry-After``, ``Connection: close``;
    - with API keys required, answers a request on any but the open paths without a known key 401
      + ``WWW-Authenticate`` before reading its body, and keeps its client in ``scope["state"][CLIENT]``;
      on a predict route, holds one item of the client's limits (``scope["state"][HELD]``) or answers
      429 before reading the body, and gives the hold back if no charge took it over;
    - a body that has not fully arrived by the body deadline gets 408 and the connection closes;
    - counts the request in flight and records its status (499 when the client left first) and,
      with a model repository, the model it was routed to; lets go of that model;
    - counts and logs (rate-limited, aggregated) the answers of ``REFUSALS``.
    """

    def __init__(self, app, lifecycle: Lifecycle, routes: Sequence[BaseRoute] = ()):
        """``routes``: the app's routes, to count a request answered here before routing under the route it named."""
        self.app = app
        self.lifecycle = lifecycle
        self.routes = routes
        self._endpoints: dict[tuple[str, str, str], str] = {}  # (method, root path, path) -> _endpoint's answer
        self.max_bytes = lifecycle.settings.max_body_bytes
        self.refusals = RefusalLog(log, logging.INFO)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lc = self.lifecycle
        state = scope.setdefault("state", {})
        admission = lc.admit(state.get(ARRIVAL))
        state["admission"] = admission
        status: int | None = None
        answer = b""  # the first bytes of a refusal's body (its JSON error), for the log
        disconnected = False
        body_done = False
        seen = 0

        async def recording_send(message):
            nonlocal status, answer
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status in REFUSALS and not answer:
                answer = message.get("body", b"")[:600]
            await send(message)

        async def guarded_receive():
            nonlocal seen, body_done, disconnected
            if body_done:
                message = await receive()  # after the body: only a disconnect can come; no timeout
            else:
                remaining = admission.body_deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    message = await asyncio.wait_for(receive(), remaining)
                except asyncio.TimeoutError:
                    raise RequestTimeout(
                        f"request body not received within {admission.body_deadline - admission.arrival:g} s"
                    ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"body exceeds the limit of {self.max_bytes} bytes", CLOSE)
                if not message.get("more_body", False):
                    body_done = True
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            if not state.get(ADMITTED, True):  # the connection holds no slot (see connections.ConnectionSlots)
                lc.metrics.rejected.labels("connections").inc()
                message = f"too many connections (at most {lc.settings.max_connections}); retry later"
                return await error_response(503, message, {"Retry-After": "1", "Connection": "close"})(
                    scope, receive, recording_send
                )
            access = lc.access
            if access is not None and not access.is_open(scope["path"]):
                try:
                    # keys are hashed as UTF-8 text (keys.py): read the header's bytes as UTF-8, not latin-1
                    client = state[CLIENT] = access.authenticate(
                        _headers(scope, b"authorization", "utf-8"), scope["method"], scope["path"]
                    )
                    if charges_items(scope["method"], scope["path"]):
                        state[HELD] = await access.hold(client)  # 429 here for a client without room for one item
                except ServiceError as exc:
                    # a refused request's body is never read: close the connection rather than drain it
                    headers = {**exc.headers, **CLOSE} if _has_body(scope) else exc.headers
                    return await error_response(exc.status, exc.message, headers)(scope, receive, recording_send)
            declared = _header(scope, b"content-length")
            if declared is not None:
                if not (declared.isascii() and declared.isdigit()):
                    return await error_response(400, "Content-Length is not a decimal integer")(
                        scope, receive, recording_send
                    )
                if int(declared) > self.max_bytes:
                    return await error_response(
                        413, f"body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes", CLOSE
                    )(scope, receive, recording_send)
            await self.app(scope, guarded_receive, recording_send)
        finally:
            held = state.get(HELD)
            if held is not None and not held.settled and lc.access is not None:
                await lc.access.release(held)  # answered before its items were charged: a bad body, an unknown model
            if disconnected and (status is None or status >= 500):
                status = CLIENT_CLOSED
            lc.release(admission, self._endpoint(scope), status or 500, state.get(MODEL))
            if status in REFUSALS:
                self._refused(scope, status, answer)

    def _endpoint(self, scope) -> str:
        """:func:`_endpoint`, remembered by request line for the requests answered before routing (a refused flood repeats
        one line: it costs a lookup, not a match against every route); at most ``MAX_REMEMBERED`` lines."""
        if scope.get("route") is not None:
            return _endpoint(scope, self.routes)
        line = (scope["method"], scope.get("root_path", ""), scope["path"])
        endpoint = self._endpoints.get(line)
        if endpoint is None:
            if len(self._endpoints) >= MAX_REMEMBERED:
                self._endpoints.clear()
            endpoint = self._endpoints[line] = _endpoint(scope, self.routes)
        return endpoint

    def _refused(self, scope, status: int, answer: bytes) -> None:
        """Count a refusal of the request's input and log it, one line per (client or peer, status) per interval."""
        self.lifecycle.metrics.rejected.labels(reason=REFUSALS[status]).inc()
        client = scope["state"].get(CLIENT)
        peer = scope.get("client")
        who = f"client {client.name}" if client is not None else f"peer {peer[0] if peer else 'unknown'}"

        def detail() -> str:
            return f"{scope['method']} {quoted(scope['path'])}: {_error_text(answer)} ({status})"

        self.refusals.refused(who, str(status), detail)


def _endpoint(scope, routes: Sequence[BaseRoute]) -> str:
    """The route a request is counted under: the one it reached, or, when admission answered it before routing
    (401, a 429 on admission's hold), the route its request line names, so a refusal is counted where it was aimed."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def _error_text(body: bytes) -> str:
    """The message of a JSON error body (as ``api.handlers.error_response`` writes it), or what it starts with."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


def _headers(scope, name: bytes, encoding: str = "latin-1") -> list[str]:
    return [value.decode(encoding, "replace") for key, value in scope.get("headers") or () if key == name]


def _has_body(scope) -> bool:
    """Whether the request declares a body (a non-zero Content-Length, or any Transfer-Encoding)."""
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() not in ("", "0"))


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None
