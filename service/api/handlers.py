"""The one place that maps any failure to an HTTP answer (JSON ``{"error": ...}``, see ``..errors``).

Routes use :class:`ServiceRoute`, which turns exceptions into answers inside the route, so even an
unexpected error never escapes to Starlette's outermost middleware (which re-raises it and resets
the keep-alive connection).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from codedsmooth.service.errors import CLIENT_CLOSED, ServiceError, clip, quoted

log = logging.getLogger("codedsmooth.service")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": clip(message)}, status_code=status, headers=headers)


def response_for(exc: BaseException, request: Request | None = None) -> Response:
    """The answer to any exception raised while handling a request."""
    if isinstance(exc, ServiceError):
        return error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, ClientDisconnect):
        return error_response(CLIENT_CLOSED, "client disconnected")
    if isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and request is not None:  # no such route (paths are exact: no redirects)
            path = request.url.path
            hint = "; paths take no trailing slash" if path.endswith("/") and path != "/" else ""
            message = f"no route {quoted(path)}{hint}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))
    if isinstance(exc, RequestValidationError):
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3]]
        return error_response(422, "; ".join(parts))
    where = f" on {request.method} {request.url.path}" if request is not None else ""
    log.error("unhandled error%s", where, exc_info=exc)
    return error_response(500, "internal server error")


class ServiceRoute(APIRoute):
    """An APIRoute whose handler answers every exception itself (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - mapped to a status right here
                return response_for(exc, request)

        return answer


def install_error_handlers(app: FastAPI) -> None:
    """Errors raised outside routes: unknown paths (404), wrong methods (405), anything else."""

    async def handle(request: Request, exc: Exception) -> Response:
        return response_for(exc, request)

    for exc_class in (ServiceError, ClientDisconnect, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(exc_class, handle)
