"""ASGI middleware: body size limit (413 before the body is read) and per-request metrics."""

from __future__ import annotations

import json
import time

from .errors import PayloadTooLarge
from .metrics import Metrics


async def send_json_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes``: by Content-Length at once, else while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await send_json_error(send, 400, "Content-Length is not an integer")
            if too_big:
                return await send_json_error(send, 413, f"body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Counts requests by route template and status, times them, and tracks requests in flight."""

    def __init__(self, app, metrics: Metrics, tracker):
        self.app = app
        self.metrics = metrics
        self.tracker = tracker  # has an ``in_flight`` counter (the server waits for it on shutdown)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        scope.setdefault("state", {})["arrival"] = start
        status = 500
        self.tracker.in_flight += 1
        self.metrics.in_flight.inc()

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.tracker.in_flight -= 1
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
